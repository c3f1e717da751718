// Working-set files: the pages a VM touched after restore, in first-touch
// order, recorded by `faultline serve --record` and replayed by `--prefetch`.
//
// Format, version 1 (all integers little-endian):
//   offset  size  field
//   0       8     magic "FLWSET\r\n" (the CR LF catches text-mode mangling)
//   8       4     version = 1
//   12      4     page_size: bytes per page (4096 or 2097152)
//   16      8     memory_file_size: size of the snapshot the set was recorded on
//   24      8     count
//   32      8*n   offsets: byte offset of each page in the memory file, first touch first
//   32+8n   4     crc32 (zlib) of every byte before it
// A file that fails any check (magic, version, size, checksum, offsets
// aligned and inside the snapshot, snapshot size) is rejected with an error
// naming the check: a damaged file never becomes a wrong page (and even a
// valid one only says which snapshot pages to install early).
//
// Thread-safety: free functions with no shared state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace faultline {

struct WorkingSet {
  uint32_t page_size = 4096;
  uint64_t memory_file_size = 0;
  std::vector<uint64_t> offsets;  // first-touch order
};

inline constexpr uint32_t kWorkingSetVersion = 1;

// Writes atomically and durably (common/atomic_file.h: a fresh O_EXCL|O_NOFOLLOW
// temporary file, fsynced, renamed over `path`).
Status write_working_set(const std::string& path, const WorkingSet& set);
// Reads and validates. `memory_file_size` is the snapshot it will be used on.
Result<WorkingSet> read_working_set(const std::string& path, uint64_t memory_file_size);
// Validates an in-memory image of the file (for tests of every corruption).
Result<WorkingSet> parse_working_set(const std::string& bytes, uint64_t memory_file_size);
std::string serialize_working_set(const WorkingSet& set);

}  // namespace faultline
