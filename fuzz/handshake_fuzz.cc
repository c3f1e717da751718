// Fuzz target: the JSON half of the Firecracker handshake (the bytes any
// process that can connect to --socket controls).
//
// For any input: scan_json_array() and parse_handshake_json() return (no
// exception, no crash); every error message and scan reason is printable
// ASCII of bounded length; an accepted handshake has only regions the server
// can serve (documented properties) and is one the socket reader would have
// completed; and the error, as the daemon logs it in handshake_failed, gives
// one clean line in both log formats (where the daemon-aborting bug was).
#include <cstdint>
#include <string>

#include "fuzz/fuzz_check.h"
#include "protocol/handshake.h"

using namespace faultline;
using faultline::fuzz::printable_ascii;
using namespace faultline::protocol;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);

  const CompletenessScan scan = scan_json_array(in);
  FUZZ_CHECK((scan.state == Completeness::kInvalid) == !scan.reason.empty());
  FUZZ_CHECK(printable_ascii(scan.reason), scan.reason);
  FUZZ_CHECK(json_array_completeness(in) == scan.state);

  auto parsed = parse_handshake_json(in);
  if (parsed) {
    FUZZ_CHECK(!parsed->regions.empty());
    for (const GuestRegion& r : parsed->regions) {
      FUZZ_CHECK(r.page_size == kPageSize4K || r.page_size == kPageSize2M);
      FUZZ_CHECK(r.size > 0 && r.size % r.page_size == 0);
      FUZZ_CHECK(r.base_host_virt_addr % r.page_size == 0);
      FUZZ_CHECK(r.base_host_virt_addr <= UINT64_MAX - r.size);
      FUZZ_CHECK(r.offset <= UINT64_MAX - r.size);
    }
    // The socket reader hands the parser only what the scan called complete:
    // an input the parser accepts but the scan does not would be refused
    // (or waited on) for reasons the error could not explain.
    FUZZ_CHECK(scan.state == Completeness::kComplete, "parser accepts what the scan calls " +
                                                          std::string(scan.state == Completeness::kInvalid
                                                                          ? "invalid: " + scan.reason
                                                                          : "incomplete"));
    fuzz::check_logged_in_both_formats("session_start", to_string(parsed->format));
  } else {
    const std::string& message = parsed.error().message;
    FUZZ_CHECK(printable_ascii(message), message);
    FUZZ_CHECK(message.size() <= 2048, message.substr(0, 200));
    fuzz::check_logged_in_both_formats("handshake_failed", message);
  }
  // The raw bytes themselves, as any field of any line could hold them.
  fuzz::check_logged_in_both_formats(in.substr(0, 64), in);
  return 0;
}
