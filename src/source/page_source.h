// PageSource: where snapshot bytes come from.
//
// faultline reads snapshot pages into its own buffers (pread), never through a
// mapping of the file: a file truncated while serving then gives a short read
// and a clear error instead of a SIGBUS that would kill the daemon, and the
// install ioctl afterwards copies from memory, so it never waits on storage.
//
// Thread-safety: implementations are safe for concurrent read() calls.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline {

class PageSource {
 public:
  virtual ~PageSource() = default;
  // Fills `out` with the bytes at [offset, offset + out.size()). A read past
  // the current end (the file shrank) is an error, never zero-filled.
  virtual Status read(uint64_t offset, std::span<uint8_t> out) const = 0;
  // Like read(), but only from memory (the page cache): returns false,
  // having read nothing useful, when the bytes would have to come from
  // storage. Lets a thread that must never wait on I/O serve cached pages.
  virtual Result<bool> read_if_cached(uint64_t offset, std::span<uint8_t> out) const {
    (void)offset;
    (void)out;
    return false;
  }
  // Size in bytes when the source was opened.
  virtual uint64_t size() const = 0;
  virtual const std::string& describe() const = 0;
};

// A memory snapshot file on a local filesystem.
class MemoryFile final : public PageSource {
 public:
  static Result<std::shared_ptr<MemoryFile>> open(const std::string& path);

  Status read(uint64_t offset, std::span<uint8_t> out) const override;
  Result<bool> read_if_cached(uint64_t offset, std::span<uint8_t> out) const override;
  uint64_t size() const override { return size_; }
  const std::string& describe() const override { return path_; }

 private:
  MemoryFile(std::string path, UniqueFd fd, uint64_t size) : path_(std::move(path)), fd_(std::move(fd)), size_(size) {}
  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
};

}  // namespace faultline
