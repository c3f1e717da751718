// ZeroIndex: which 4 KiB pages of a memory snapshot are all zero, found once
// and kept beside the snapshot (FILE.zeroidx), so that those pages are
// installed without reading them (UFFDIO_ZEROPAGE maps the kernel's shared
// zero page: no copy, no memory until the guest writes).
//
// A page the index wrongly calls zero would be served as zeros where the
// snapshot has data: a silent wrong page. So an index is bound to the exact
// file being served, not to a path:
//   - its header holds the FileIdentity (device, inode, size, mtime, ctime)
//     of the file it was built from, taken from the open fd
//     (MemoryFile::identity()); load() refuses any other identity;
//   - check_sample() reads a random sample of pages of the open file and
//     checks that the index agrees with their content (the server runs it
//     when it loads an index: identities can collide, e.g. a write within the
//     same timestamp tick, or an inode number reused);
//   - disable() turns it off for good when the file changes while it is in
//     use (source/file_watch.h tells the server).
//
// File format, version 2 (little-endian):
//   0    8  magic "FLZIDX\r\n"
//   8    4  version = 2
//   12   4  granule = 4096
//   16   8  memory file size (bytes)
//   24   8  memory file device (st_dev)
//   32   8  memory file inode
//   40   8  memory file mtime (ns since the epoch)
//   48   8  memory file ctime (ns since the epoch)
//   56   n  bitmap, n = ceil(pages / 8), pages = size / 4096 (a partial last
//           page is never zero); bit i (byte i/8, bit i%8) set = page i is all
//           zero; bits past the last page are 0
//   56+n 4  crc32 (zlib) of every byte before it
// Version 1 (size, mtime, inode taken with stat() on the path) is no longer
// read: such a file is rebuilt.
//
// Thread-safety: immutable after build/load/parse, except for disable(),
// which any thread may call at any time; is_zero() is safe concurrently with
// it (one relaxed atomic load, so the fault path stays lock-free).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "source/page_source.h"

namespace faultline {

inline constexpr uint32_t kZeroIndexVersion = 2;

class ZeroIndex {
 public:
  // Scans the source in large sequential reads. `identity` is the identity of
  // the file the source reads, taken BEFORE the scan.
  static Result<ZeroIndex> build(const PageSource& source, const FileIdentity& identity);
  // build() for a snapshot nobody serves yet (`faultline zero-index`): takes
  // the identity from the open fd, scans while a FileWatch guards the file,
  // and fails if the file was written meanwhile (the index could be wrong).
  static Result<ZeroIndex> build_from(const MemoryFile& file);
  // Validates the bytes of an index file (format above) against the identity
  // of the file being served. Any bytes are safe input.
  static Result<ZeroIndex> parse(std::string_view bytes, const FileIdentity& identity);
  // Reads `path` and parse()s it.
  static Result<ZeroIndex> load(const std::string& path, const FileIdentity& identity);
  // The file's bytes: parse(serialize(), identity()) gives this index back.
  std::string serialize() const;
  // Writes atomically (a temporary file renamed over `path`).
  Status save(const std::string& path) const;

  ZeroIndex(ZeroIndex&& other) noexcept;
  ZeroIndex& operator=(ZeroIndex&& other) noexcept;
  ZeroIndex(const ZeroIndex&) = delete;
  ZeroIndex& operator=(const ZeroIndex&) = delete;

  struct SampleResult {
    uint64_t zero_pages_read = 0;  // pages the index calls zero, read and found zero
    uint64_t data_pages_read = 0;  // pages it calls non-zero, read and found non-zero
  };
  // Reads up to `per_class` pages the index calls zero and up to `per_class`
  // it calls non-zero, chosen at random from `seed`, from `source` (the open
  // file being served). An error names the first page whose content
  // disagrees with the index (or a read that failed).
  Result<SampleResult> check_sample(const PageSource& source, uint64_t per_class, uint64_t seed) const;

  // Whether every byte of [offset, offset + length) is zero in the snapshot.
  // Always false once disable() was called.
  // REQUIRES: 4 KiB-aligned offset and length.
  bool is_zero(uint64_t offset, uint64_t length) const;
  // The file changed: from now on no page is known to be zero. Idempotent.
  void disable() const { disabled_.store(true, std::memory_order_relaxed); }
  bool disabled() const { return disabled_.load(std::memory_order_relaxed); }

  uint64_t zero_pages() const { return zero_pages_; }
  uint64_t pages() const { return pages_; }
  const FileIdentity& identity() const { return identity_; }

 private:
  ZeroIndex() = default;
  bool bit(uint64_t page) const { return (bits_[page / 64] >> (page % 64)) & 1; }

  FileIdentity identity_;
  uint64_t pages_ = 0;
  uint64_t zero_pages_ = 0;
  std::vector<uint64_t> bits_;
  mutable std::atomic<bool> disabled_{false};
};

}  // namespace faultline
