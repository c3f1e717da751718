// PageSource: where snapshot bytes come from.
//
// faultline reads snapshot pages into its own buffers (pread), never through a
// mapping of the file: a file truncated while serving then gives a short read
// and a clear error instead of a SIGBUS that would kill the daemon, and the
// install ioctl afterwards copies from memory, so it never waits on storage.
//
// Thread-safety: implementations are safe for concurrent read() calls.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline {

// Which file, exactly, a file descriptor reads: what a file kept beside a
// snapshot (the zero-page index) is bound to. Taken with fstat() on the open
// fd, never from a path, so it describes the bytes being served even if the
// path is replaced. ctime is part of it because no user can set it back:
// every write or utimensat() moves it to "now", while mtime can be restored.
struct FileIdentity {
  uint64_t device = 0;  // st_dev
  uint64_t inode = 0;   // st_ino
  uint64_t size = 0;    // st_size
  uint64_t mtime_ns = 0;
  uint64_t ctime_ns = 0;
  friend bool operator==(const FileIdentity&, const FileIdentity&) = default;
};

// What a source holds at an offset, and for how far it stays the same.
struct SourceExtent {
  enum class Kind {
    kData,  // bytes that must be read
    kZero,  // known to be all zero: installed without reading
  };
  Kind kind = Kind::kData;
  // Which layer of a layered source holds the bytes (0 for a plain file).
  uint32_t layer = 0;
  // Bytes from the asked offset to the end of this extent (same kind, same
  // layer and, for an image, same frame): what one read() can cover cheaply.
  uint64_t length = 0;
};

// A range of the source's bytes.
struct SourceRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// What read-ahead did (PageSource::read_ahead). For an image, a unit is a
// frame.
struct ReadAheadStats {
  uint64_t loaded = 0;          // units loaded ahead of the reader
  uint64_t used = 0;            // of those, still in memory when the reader got there
  uint64_t evicted_unused = 0;  // of those, gone from memory before the reader got there
  uint64_t failed = 0;          // loads that failed (not fatal: the reader meets the error itself)
  int fetches = 0;              // loads in flight at most (its threads)
};

struct ReadAheadOptions {
  // Most loads in flight at once (threads of the read-ahead).
  int fetches = 12;
  // Once this reads true no load starts any more: the reader is gone (its
  // session is stopping). Null: only stop() ends the read-ahead early.
  // REQUIRES: outlives the read-ahead.
  const std::atomic<bool>* cancelled = nullptr;
  // Each load gives up after this long, a store read in flight too
  // (common/deadline.h): a read-ahead waits for a store no longer than a
  // fault would (the session's store deadline). Zero: no limit but the
  // store client's own timeouts and retries.
  std::chrono::milliseconds load_deadline{0};
};

// A read-ahead running for one reader of a plan. It owns its threads: the
// destructor stops them and joins them, so none outlives it.
//
// Thread-safety: every method is safe from any thread.
class ReadAhead {
 public:
  virtual ~ReadAhead() = default;
  // The reader is done with the plan's entries [from, to) (read, or skipped
  // for good): what only they needed no longer holds back the read-ahead.
  // Entries may be reported in any order, each once.
  virtual void consumed(size_t from, size_t to) = 0;
  // Stops the threads and joins them; a load in flight stops with them (an
  // object store's request is cancelled within about a second); afterwards
  // stats() is final. Idempotent; the destructor does it too.
  virtual void stop() = 0;
  virtual ReadAheadStats stats() const = 0;
};

class PageSource {
 public:
  virtual ~PageSource() = default;
  // Fills `out` with the bytes at [offset, offset + out.size()). A read past
  // the current end (the file shrank) is an error, never zero-filled. An
  // error with `retryable` set may succeed later (the session retries it up
  // to a deadline); any other error is final.
  virtual Status read(uint64_t offset, std::span<uint8_t> out) const = 0;
  // Like read(), but only from memory (the page cache): returns false,
  // having read nothing useful, when the bytes would have to come from
  // storage. Lets a thread that must never wait on I/O serve cached pages.
  virtual Result<bool> read_if_cached(uint64_t offset, std::span<uint8_t> out) const {
    (void)offset;
    (void)out;
    return false;
  }
  // Reads a demand fault's window [offset, offset + out.size()): the first
  // page (`page_size` bytes at `offset`) and then the pages after it for as
  // long as they come without another load from storage: zero, in the same
  // unit as the first page (an image's frame), or in memory already. So a
  // fault never waits for a load made only for its neighbours (the kernel's
  // fault-around likewise maps only pages already in the page cache).
  // Returns the bytes read: whole pages from the start of `out`, the first
  // page at least; or 0 with `cached_only` when the first page itself would
  // need a load (nothing is loaded then). The default: a plain file, where
  // the whole window is one cheap read (read_if_cached() with `cached_only`).
  // REQUIRES: offset and out.size() are multiples of page_size, out not empty.
  virtual Result<uint64_t> read_window(uint64_t offset, std::span<uint8_t> out, uint64_t page_size,
                                       bool cached_only) const {
    (void)page_size;
    if (cached_only) {
      auto cached = read_if_cached(offset, out);
      if (!cached) return std::unexpected(cached.error());
      return *cached ? out.size() : 0;
    }
    if (auto s = read(offset, out); !s) return std::unexpected(s.error());
    return out.size();
  }
  // What the source holds at `offset`. The default knows nothing: all data.
  // REQUIRES: offset < size().
  virtual SourceExtent extent(uint64_t offset) const { return {SourceExtent::Kind::kData, 0, size() - offset}; }
  // Whether every byte of [offset, offset + length) is known to be zero
  // without reading it. False when unsure: a page wrongly called zero would
  // be a silent wrong page, one wrongly called data only costs a read.
  virtual bool known_zero(uint64_t offset, uint64_t length) const {
    (void)offset;
    (void)length;
    return false;
  }
  // A hint: the ranges of `plan` will be read in this order (a working-set
  // prefetch), so the source may load what they need ahead of the reads,
  // with at most options.fetches loads in flight and never so far ahead that
  // what it loaded is pushed out before it is read. Errors stay with the
  // reads: a load ahead that fails is only counted. The reader reports its
  // progress with ReadAhead::consumed() (positions are indexes into `plan`;
  // an entry of length 0 needs nothing). Null: nothing to do ahead (the
  // default; a local file, whose reads are cheap). REQUIRES: the source
  // outlives the returned read-ahead.
  virtual std::unique_ptr<ReadAhead> read_ahead(std::vector<SourceRange> plan, const ReadAheadOptions& options) const {
    (void)plan;
    (void)options;
    return nullptr;
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

  // The identity of the open file now (fstat of the fd being served).
  Result<FileIdentity> identity() const;
  // The fd being served, for watching it (source/file_watch.h). Reads go
  // through read(); the fd stays owned by this object.
  int watch_fd() const { return fd_.get(); }

 private:
  MemoryFile(std::string path, UniqueFd fd, uint64_t size) : path_(std::move(path)), fd_(std::move(fd)), size_(size) {}
  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
};

}  // namespace faultline
