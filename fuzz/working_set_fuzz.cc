// Fuzz target: the working-set file (--prefetch FILE), which an operator
// passes but which may come from anywhere (a copied snapshot directory).
//
// Input: byte 0 chooses how the rest is read, so that the fuzzer gets past
// the two checks random bytes never pass: bit 0 rewrites the trailing CRC to
// match, bit 1 takes the memory-file size from the file's own header
// (otherwise 64 MiB). The rest is the file.
// For any input: parse_working_set() returns; an accepted set has only
// page-aligned offsets inside the snapshot and serializes back to exactly
// the same bytes; every error is printable ASCII and logs cleanly.
#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz/fuzz_check.h"
#include "snapshot/working_set.h"

using namespace faultline;
using faultline::fuzz::printable_ascii;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  std::string file(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((mode & 1) && file.size() >= 4) {
    const auto crc = static_cast<uint32_t>(
        ::crc32(0L, reinterpret_cast<const Bytef*>(file.data()), static_cast<uInt>(file.size() - 4)));
    std::memcpy(file.data() + file.size() - 4, &crc, 4);
  }
  uint64_t memory_size = 64ull << 20;
  if ((mode & 2) && file.size() >= 24) std::memcpy(&memory_size, file.data() + 16, 8);

  auto set = parse_working_set(file, memory_size);
  if (set) {
    FUZZ_CHECK(set->page_size == 4096 || set->page_size == 2u << 20);
    FUZZ_CHECK(set->memory_file_size == memory_size);
    for (uint64_t o : set->offsets) FUZZ_CHECK(o % set->page_size == 0 && o < memory_size);
    FUZZ_CHECK(serialize_working_set(*set) == file, "an accepted file must be exactly what the writer writes");
  } else {
    FUZZ_CHECK(printable_ascii(set.error().message), set.error().message);
    fuzz::check_logged_in_both_formats("startup_failed", set.error().message);
  }
  return 0;
}
