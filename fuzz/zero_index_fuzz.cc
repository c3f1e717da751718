// Fuzz target: the zero-page index file (MEMORY.zeroidx), which decides that
// a page is served as zeros without reading it: a parser that accepted a
// wrong bitmap would serve silent wrong pages.
//
// Input: byte 0 chooses how the rest is read: bit 0 rewrites the trailing CRC
// to match; bit 1 takes the identity the file must match from the file's own
// header (otherwise a fixed one), so the fuzzer reaches the bitmap checks.
// For any input: ZeroIndex::parse() returns; an accepted index serializes
// back to exactly the same bytes, counts exactly the zero pages is_zero()
// reports, agrees with a page source built from its own bitmap under
// check_sample(), reports no page zero once disabled; every error is
// printable ASCII and logs cleanly.
#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz/fuzz_check.h"
#include "snapshot/zero_index.h"

using namespace faultline;
using faultline::fuzz::printable_ascii;

namespace {

// A memory file whose pages are zero exactly where `zero(page)` says.
class BitmapSource final : public PageSource {
 public:
  BitmapSource(const ZeroIndex& index, bool all_zero) : index_(index), all_zero_(all_zero) {}
  Status read(uint64_t offset, std::span<uint8_t> out) const override {
    const bool zero = all_zero_ || index_.is_zero(offset, 4096);
    std::memset(out.data(), zero ? 0 : 0x5a, out.size());
    return {};
  }
  uint64_t size() const override { return index_.identity().size; }
  const std::string& describe() const override { return name_; }

 private:
  const ZeroIndex& index_;
  bool all_zero_;
  std::string name_ = "bitmap";
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  std::string file(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((mode & 1) && file.size() >= 4) {
    const auto crc = static_cast<uint32_t>(
        ::crc32(0L, reinterpret_cast<const Bytef*>(file.data()), static_cast<uInt>(file.size() - 4)));
    std::memcpy(file.data() + file.size() - 4, &crc, 4);
  }
  FileIdentity identity{2049, 131, 64ull << 20, 1700000000000000000ull, 1700000000000000001ull};
  if ((mode & 2) && file.size() >= 56) {
    std::memcpy(&identity.size, file.data() + 16, 8);
    std::memcpy(&identity.device, file.data() + 24, 8);
    std::memcpy(&identity.inode, file.data() + 32, 8);
    std::memcpy(&identity.mtime_ns, file.data() + 40, 8);
    std::memcpy(&identity.ctime_ns, file.data() + 48, 8);
  }

  auto index = ZeroIndex::parse(file, identity);
  if (!index) {
    FUZZ_CHECK(printable_ascii(index.error().message), index.error().message);
    fuzz::check_logged_in_both_formats("zero_index_built", index.error().message);
    return 0;
  }
  FUZZ_CHECK(index->identity() == identity);
  FUZZ_CHECK(index->pages() == identity.size / 4096);
  FUZZ_CHECK(index->zero_pages() <= index->pages());
  FUZZ_CHECK(index->serialize() == file, "an accepted index must be exactly what save() writes");
  if (index->pages() <= (1u << 16)) {
    uint64_t zero = 0;
    for (uint64_t p = 0; p < index->pages(); ++p) zero += index->is_zero(p * 4096, 4096);
    FUZZ_CHECK(zero == index->zero_pages(), "zero_pages() must count what is_zero() serves");
  }
  FUZZ_CHECK(!index->is_zero(index->pages() * 4096, 4096), "no page past the end is zero");
  const BitmapSource faithful(*index, false);
  auto agree = index->check_sample(faithful, 8, mode);
  FUZZ_CHECK(agree.has_value(), agree ? "" : agree.error().message);
  const BitmapSource zeros(*index, true);
  auto disagree = index->check_sample(zeros, 8, mode);
  FUZZ_CHECK(disagree.has_value() == (index->zero_pages() == index->pages()),
             "a sample must catch data pages that read zero");
  index->disable();
  for (uint64_t p = 0; p < std::min<uint64_t>(index->pages(), 64); ++p) FUZZ_CHECK(!index->is_zero(p * 4096, 4096));
  return 0;
}
