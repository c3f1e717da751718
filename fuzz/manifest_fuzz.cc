// Fuzz target: the image manifest (DIR/images/NAME), which may come from any
// store, copied or downloaded: untrusted input.
//
// Input: byte 0 chooses how the rest is read; bit 0 rewrites the header's
// body length and the SHA-256 trailer to match, so that the fuzzer gets past
// the two checks random bytes never pass and reaches the body parser. The
// rest is the file.
// For any input: parse_manifest() returns; an accepted manifest is
// consistent (it serializes, and that parses back to the same manifest);
// every error is printable ASCII and logs cleanly.
#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz/fuzz_check.h"
#include "image/manifest.h"

using namespace faultline;
using namespace faultline::image;
using faultline::fuzz::printable_ascii;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  std::string file(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((mode & 1) && file.size() >= 80) {
    const uint64_t body = file.size() - 80;
    for (int i = 0; i < 8; ++i) file[40 + i] = static_cast<char>(body >> (8 * i));
    const BlobId sum = BlobId::of(std::string_view(file).substr(0, file.size() - 32));
    std::memcpy(file.data() + file.size() - 32, sum.bytes.data(), 32);
  }
  auto m = parse_manifest(file, "image fuzz (fuzz)");
  if (m) {
    FUZZ_CHECK(m->page_size == kSmallPage || m->page_size == kHugePage);
    FUZZ_CHECK(m->guest_bytes % m->page_size == 0);
    auto again = serialize_manifest(*m);
    FUZZ_CHECK(again.has_value(), "an accepted manifest must serialize");
    auto back = parse_manifest(*again, "again");
    FUZZ_CHECK(back.has_value() && *back == *m, "a serialized manifest must parse back to itself");
  } else {
    FUZZ_CHECK(printable_ascii(m.error().message), m.error().message);
    fuzz::check_logged_in_both_formats("image_error", m.error().message);
  }
  return 0;
}
