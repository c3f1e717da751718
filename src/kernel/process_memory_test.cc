// Reading another process's memory: whole runs, from a child whose bytes
// differ from ours, through process_vm_readv and /proc/PID/mem, and errors
// that say which pid, address and length could not be read.
#include "kernel/process_memory.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace faultline::kernel {
namespace {

constexpr uint64_t kBytes = 8ull << 20;  // one 8 MiB read: a large iovec

uint8_t pattern(uint64_t i, uint8_t seed) { return static_cast<uint8_t>((i * 131 + (i >> 12) * 7 + seed) & 0xff); }

// A child process that rewrote `bytes` with pattern seed 2 after the fork
// (copy-on-write: our copy keeps seed 1) and waits until it is killed.
class ChildWithOtherBytes {
 public:
  explicit ChildWithOtherBytes(uint8_t* bytes) {
    int ready[2];
    EXPECT_EQ(::pipe(ready), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      for (uint64_t i = 0; i < kBytes; ++i) bytes[i] = pattern(i, 2);
      char c = 1;
      (void)!::write(ready[1], &c, 1);
      for (;;) ::pause();
    }
    ::close(ready[1]);
    char c = 0;
    EXPECT_EQ(::read(ready[0], &c, 1), 1);
    ::close(ready[0]);
  }
  ~ChildWithOtherBytes() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

TEST(ReadProcessMemory, ReadsAChildsBytesNotOurs) {
  void* p = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* bytes = static_cast<uint8_t*>(p);
  for (uint64_t i = 0; i < kBytes; ++i) bytes[i] = pattern(i, 1);
  ChildWithOtherBytes child(bytes);
  ASSERT_GT(child.pid(), 0);
  for (MemoryReadMethod method : {MemoryReadMethod::kAuto, MemoryReadMethod::kProcessVmReadv,
                                  MemoryReadMethod::kProcMem}) {
    std::vector<uint8_t> out(kBytes);
    auto st = read_process_memory(child.pid(), reinterpret_cast<uint64_t>(p), out, method);
    ASSERT_TRUE(st) << st.error().describe();
    uint64_t wrong = 0;
    for (uint64_t i = 0; i < kBytes; ++i) wrong += out[i] != pattern(i, 2);
    EXPECT_EQ(wrong, 0u) << "method " << static_cast<int>(method);
  }
  ::munmap(p, kBytes);
}

TEST(ReadProcessMemory, ARangeThatEndsInAHoleIsAnErrorNamingPidAddressAndLength) {
  // Three pages, the last unmapped: the read gets two pages, then fails.
  void* p = ::mmap(nullptr, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  ASSERT_EQ(::munmap(static_cast<uint8_t*>(p) + 2 * 4096, 4096), 0);
  std::memset(p, 7, 2 * 4096);
  const uint64_t address = reinterpret_cast<uint64_t>(p);
  char hex[24];
  std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(address));
  for (MemoryReadMethod method : {MemoryReadMethod::kProcessVmReadv, MemoryReadMethod::kProcMem}) {
    std::vector<uint8_t> out(3 * 4096);
    auto st = read_process_memory(::getpid(), address, out, method);
    ASSERT_FALSE(st) << "method " << static_cast<int>(method);
    const std::string text = st.error().describe();
    EXPECT_NE(text.find("process " + std::to_string(::getpid())), std::string::npos) << text;
    EXPECT_NE(text.find(hex), std::string::npos) << text;
    EXPECT_NE(text.find("12288 bytes"), std::string::npos) << text;
    EXPECT_NE(text.find("stopped after 8192 bytes"), std::string::npos) << text;
    // The kernel's own errno: EFAULT from process_vm_readv, EIO from /proc/PID/mem.
    EXPECT_EQ(st.error().code, method == MemoryReadMethod::kProcMem ? EIO : EFAULT) << text;
  }
  ::munmap(p, 2 * 4096);
}

TEST(ReadProcessMemory, OnlyARefusalOfProcessVmReadvFallsBackToProcMem) {
  EXPECT_TRUE(process_vm_readv_refused(EPERM));
  EXPECT_TRUE(process_vm_readv_refused(ENOSYS));
  // These /proc/PID/mem would report as well: falling back would only hide them.
  EXPECT_FALSE(process_vm_readv_refused(EFAULT));
  EXPECT_FALSE(process_vm_readv_refused(ESRCH));
  EXPECT_FALSE(process_vm_readv_refused(ENOMEM));
}

TEST(ReadProcessMemory, AnEmptyReadSucceedsWithoutTouchingTheProcess) {
  std::vector<uint8_t> none;
  EXPECT_TRUE(read_process_memory(::getpid(), 0, none));
}

}  // namespace
}  // namespace faultline::kernel
