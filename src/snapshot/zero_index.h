// ZeroIndex: which 4 KiB pages of a memory snapshot are all zero, found once
// and kept beside the snapshot (FILE.zeroidx), so that those pages are
// installed without reading them (UFFDIO_ZEROPAGE maps the kernel's shared
// zero page: no copy, no memory until the guest writes).
//
// File format, version 1 (little-endian):
//   0   8   magic "FLZIDX\r\n"
//   8   4   version = 1
//   12  4   granule = 4096
//   16  8   memory file size
//   24  8   memory file mtime (ns since the epoch)
//   32  8   memory file inode
//   40  n   bitmap, bit i (byte i/8, bit i%8) set = page i is all zero
//   40+n 4  crc32 (zlib) of every byte before it
// An index whose size, mtime or inode do not match the snapshot is stale and
// rebuilt; a damaged one is rejected.
//
// Thread-safety: immutable after build/load; safe for concurrent reads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "source/page_source.h"

namespace faultline {

struct FileIdentity {
  uint64_t size = 0;
  uint64_t mtime_ns = 0;
  uint64_t inode = 0;
  friend bool operator==(const FileIdentity&, const FileIdentity&) = default;
};
Result<FileIdentity> identify_file(const std::string& path);

class ZeroIndex {
 public:
  // Scans the source in large sequential reads.
  static Result<ZeroIndex> build(const PageSource& source, FileIdentity identity);
  // Loads and validates an index file against the snapshot's identity.
  static Result<ZeroIndex> load(const std::string& path, const FileIdentity& identity);
  Status save(const std::string& path) const;

  // Whether every byte of [offset, offset + length) is zero in the snapshot.
  // REQUIRES: 4 KiB-aligned offset and length.
  bool is_zero(uint64_t offset, uint64_t length) const;
  uint64_t zero_pages() const { return zero_pages_; }
  uint64_t pages() const { return pages_; }

 private:
  FileIdentity identity_;
  uint64_t pages_ = 0;
  uint64_t zero_pages_ = 0;
  std::vector<uint64_t> bits_;
};

}  // namespace faultline
