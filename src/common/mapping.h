// Mapping: sole owner of one mmap()ed range.
//
// Unmaps on destruction. Move-only. Not thread-safe; the memory it maps may be
// used from any thread while the owner is alive.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline {

class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t length) : addr_(addr), length_(length) {}
  ~Mapping() { reset(); }

  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), length_(std::exchange(o.length_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      length_ = std::exchange(o.length_, 0);
    }
    return *this;
  }

  // mmap() wrapper: returns an owned mapping or the errno as an Error.
  static Result<Mapping> map(size_t length, int prot, int flags, int fd = -1, off_t offset = 0) {
    void* p = ::mmap(nullptr, length, prot, flags, fd, offset);
    if (p == MAP_FAILED) return fail_errno("mmap of " + std::to_string(length) + " bytes failed");
    return Mapping(p, length);
  }

  enum class Access { kReadOnly, kReadWrite };

  // The whole file at `path`, mapped shared (no copy; with kReadWrite, writes
  // reach the file); an error naming the path when it cannot be opened,
  // stat'ed or mapped (an empty file cannot be mapped).
  static Result<Mapping> map_file(const std::string& path, Access access = Access::kReadOnly) {
    const bool rw = access == Access::kReadWrite;
    UniqueFd fd(::open(path.c_str(), (rw ? O_RDWR : O_RDONLY) | O_CLOEXEC));
    if (!fd) return fail_errno("cannot open " + path);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat " + path);
    auto m = map(static_cast<size_t>(st.st_size), PROT_READ | (rw ? PROT_WRITE : 0), MAP_SHARED, fd.get());
    if (!m) return fail(path + ": " + m.error().message, m.error().code);
    return m;
  }

  void* get() const { return addr_; }
  uint8_t* bytes() const { return static_cast<uint8_t*>(addr_); }
  uint64_t address() const { return reinterpret_cast<uint64_t>(addr_); }
  size_t size() const { return length_; }
  bool valid() const { return addr_ != nullptr; }

  void reset() {
    if (addr_ != nullptr) ::munmap(addr_, length_);
    addr_ = nullptr;
    length_ = 0;
  }

 private:
  void* addr_ = nullptr;
  size_t length_ = 0;
};

}  // namespace faultline
