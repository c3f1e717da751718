// Mapping: sole owner of one mmap()ed range.
//
// Unmaps on destruction. Move-only. Not thread-safe; the memory it maps may be
// used from any thread while the owner is alive.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "common/error.h"

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
