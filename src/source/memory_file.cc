#include <fcntl.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "source/page_source.h"

namespace faultline {

Result<std::shared_ptr<MemoryFile>> MemoryFile::open(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open memory file " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat memory file " + path);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) return fail("memory file " + path + " is not a regular file");
  if (st.st_size == 0) return fail("memory file " + path + " is empty");
  return std::shared_ptr<MemoryFile>(new MemoryFile(path, std::move(fd), static_cast<uint64_t>(st.st_size)));
}

Result<FileIdentity> MemoryFile::identity() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return fail_errno("cannot stat memory file " + path_);
  const auto ns = [](const timespec& t) {
    return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + static_cast<uint64_t>(t.tv_nsec);
  };
  return FileIdentity{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                      static_cast<uint64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim)};
}

Status MemoryFile::read(uint64_t offset, std::span<uint8_t> out) const {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd_.get(), out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("reading " + std::to_string(out.size()) + " bytes at offset " + std::to_string(offset) +
                        " of memory file " + path_ + " failed");
    }
    if (n == 0) {
      struct stat st {};
      ::fstat(fd_.get(), &st);
      return fail("memory file " + path_ + " was truncated while serving: needed bytes up to " +
                  std::to_string(offset + out.size()) + " but it now holds " + std::to_string(st.st_size));
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

}  // namespace faultline

namespace faultline {

Result<bool> MemoryFile::read_if_cached(uint64_t offset, std::span<uint8_t> out) const {
  iovec iov{out.data(), out.size()};
  for (;;) {
    // RWF_NOWAIT: fail with EAGAIN instead of waiting for storage.
    const ssize_t n = ::preadv2(fd_.get(), &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n == static_cast<ssize_t>(out.size())) return true;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EOPNOTSUPP)) return false;
    if (n < 0) return fail_errno("reading memory file " + path_ + " failed");
    // Short: partly cached, or the file shrank. read() tells which.
    return false;
  }
}

}  // namespace faultline
