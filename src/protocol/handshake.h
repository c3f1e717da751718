// Parsing of the JSON half of the Firecracker uffd handshake (DESIGN.md §2).
//
// Firecracker describes guest memory to the uffd server as a compact JSON array
// of regions sent once over a Unix stream socket, with no length prefix and no
// terminator. This header turns those bytes into typed GuestRegion values and
// answers "has the whole array arrived yet?" for the socket reader. It knows
// nothing about sockets or fds (see protocol/handshake_socket.h for that).
//
// Every function here is a pure function of its arguments: safe to call
// concurrently from any number of threads. No function throws; failures are
// returned as Error values whose message names the region index and field.
// Every error message and scan reason is printable ASCII (0x20-0x7e): input
// bytes quoted in them are escaped as common/text_escape.h's
// escape_untrusted() does ("\xff"), so a message can go into any log line or
// JSON reply as it is.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "guest/region.h"

namespace faultline::protocol {

// Which Firecracker generation the JSON came from, judged by the page-size
// fields present in the regions.
enum class HandshakeFormat {
  kNoPageSize,        // v1.1-1.6: no page-size field; pages are 4 KiB
  kPageSizeKibOnly,   // v1.7-1.11: "page_size_kib" only (holding bytes)
  kBothFields,        // v1.12+: "page_size" and "page_size_kib" (both bytes)
  kPageSizeOnly,      // "page_size" alone: no Firecracker release sends this;
                      // accepted for hand-written clients and test tools
};

// Short stable name, e.g. "v1.12+ (page_size and page_size_kib)". Never null.
const char* to_string(HandshakeFormat format);

struct ParsedHandshake {
  std::vector<GuestRegion> regions;  // in the order sent; never empty
  HandshakeFormat format;
};

// Whether `buf` holds a complete top-level JSON array yet.
enum class Completeness {
  kIncomplete,  // more bytes may complete it
  kComplete,    // a whole array, followed by nothing but JSON whitespace
  kInvalid,     // no continuation can make this a single JSON array
};

// Bracket-depth scan that skips over string contents (including escaped
// quotes), so '[' or ']' inside a string never count. kInvalid when the first
// non-whitespace byte is not '[', when a closing bracket does not match its
// opener, or when non-whitespace bytes follow the closing ']'. kComplete does
// not mean the JSON is valid (e.g. "[1,,]" is complete); only
// parse_handshake_json() decides that.
Completeness json_array_completeness(std::string_view buf);

// Like json_array_completeness(), but for kInvalid also returns a sentence
// saying where and why (e.g. "byte 0 is 'x', not '['").
// `elements` counts the top-level array elements begun so far (each value
// that starts at depth 1), so that a region limit can be enforced while the
// bytes arrive, before anything is parsed.
struct CompletenessScan {
  Completeness state;
  std::string reason;   // empty unless state == kInvalid
  size_t elements = 0;  // top-level elements begun so far
};
CompletenessScan scan_json_array(std::string_view buf);

// Parses the handshake JSON.
//
// Accepts: a non-empty array of objects, each with unsigned-integer fields
// base_host_virt_addr, size (non-zero) and offset, and optionally page_size
// and/or page_size_kib. Both page-size fields hold BYTES (4096 or 2097152)
// whatever the name says; absent means 4096; when both are present they must
// agree. Unknown fields are ignored. All regions must carry the same set of
// page-size fields (Firecracker serializes every region from one struct).
// base_host_virt_addr and size must be multiples of the region's page size,
// and neither base+size nor offset+size may overflow 64 bits.
//
// Does not check that regions are disjoint or that offsets are cumulative:
// that is a property of the guest layout, checked where the layout is built.
Result<ParsedHandshake> parse_handshake_json(std::string_view json);

}  // namespace faultline::protocol
