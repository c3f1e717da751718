#include "kernel/process_memory.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "common/unique_fd.h"

namespace faultline::kernel {
namespace {

std::string hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
  return text;
}

std::string describe_range(pid_t pid, uint64_t address, uint64_t length) {
  return "process " + std::to_string(pid) + " memory [" + hex(address) + ", +" +
         std::to_string(length) + " bytes)";
}

// Returns how many bytes it read before the first failure (errno set) or
// the whole length.
uint64_t read_with_process_vm_readv(pid_t pid, uint64_t address, std::span<uint8_t> out) {
  uint64_t done = 0;
  while (done < out.size()) {
    // One iovec each side covering the rest: the kernel copies page by page
    // and stops at the first remote page it cannot read, returning how much
    // it copied (a partial read), so the loop retries from there and the
    // retry reports the errno of that page.
    iovec local{out.data() + done, out.size() - done};
    iovec remote{reinterpret_cast<void*>(address + done), out.size() - done};
    const ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return done;
    }
    if (n == 0) {
      errno = EFAULT;  // no progress and no error: treat as unreadable
      return done;
    }
    done += static_cast<uint64_t>(n);
  }
  return done;
}

Status read_with_proc_mem(pid_t pid, uint64_t address, std::span<uint8_t> out) {
  const std::string path = "/proc/" + std::to_string(pid) + "/mem";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open " + path + " to read " + describe_range(pid, address, out.size()));
  uint64_t done = 0;
  while (done < out.size()) {
    // Offsets are addresses; user addresses are below 2^63, so off_t holds them.
    const ssize_t n = ::pread(fd.get(), out.data() + done, out.size() - done, static_cast<off_t>(address + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EFAULT;
      return fail_errno("reading " + describe_range(pid, address, out.size()) + " through " + path +
                        " stopped after " + std::to_string(done) + " bytes");
    }
    done += static_cast<uint64_t>(n);
  }
  return {};
}

}  // namespace

bool process_vm_readv_refused(int error) { return error == EPERM || error == ENOSYS; }

Status read_process_memory(pid_t pid, uint64_t address, std::span<uint8_t> out, MemoryReadMethod method) {
  if (out.empty()) return {};
  if (address + out.size() < address) {
    return fail("cannot read " + describe_range(pid, address, out.size()) + ": the range wraps around", EINVAL);
  }
  if (method == MemoryReadMethod::kProcMem) return read_with_proc_mem(pid, address, out);
  const uint64_t done = read_with_process_vm_readv(pid, address, out);
  if (done == out.size()) return {};
  const int error = errno;
  // Refused at the first call (nothing read): the same bytes through /proc/PID/mem.
  if (method == MemoryReadMethod::kAuto && done == 0 && process_vm_readv_refused(error)) {
    return read_with_proc_mem(pid, address, out);
  }
  return std::unexpected(Error{error, "reading " + describe_range(pid, address, out.size()) +
                                          " with process_vm_readv stopped after " + std::to_string(done) +
                                          " bytes (at " + hex(address + done) + ")"});
}

}  // namespace faultline::kernel
