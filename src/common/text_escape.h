// Rendering untrusted bytes as text that cannot break the line, the JSON
// document or the terminal it lands in.
//
// Clients send faultline arbitrary bytes (a handshake, a control request), and
// those bytes end up inside error messages, log lines and JSON replies. Every
// function here accepts ANY byte sequence (invalid UTF-8, NUL, control bytes,
// overlong encodings, surrogates) and never throws for its content; the only
// exception any of them can raise is std::bad_alloc from growing a string.
//
// Two renderings:
//
// 1. JSON string contents (append_json_quoted, json_quote), used for log
//    values and anything a JSON parser will read. The output is valid UTF-8
//    holding no raw control character:
//      - '"' and '\' are escaped as \" and \\;
//      - \b \f \n \r \t stay those escapes; every other byte 0x00-0x1f and
//        0x7f becomes \u00XX (lowercase hex);
//      - well-formed UTF-8 (Unicode table 3-7: shortest form, no surrogates,
//        at most U+10FFFF) is copied as it is, except the C1 controls
//        U+0080-U+009F and the line/paragraph separators U+2028, U+2029,
//        which some log tools treat as line breaks: they become \u0080 ...
//        \u009f, \u2028, \u2029;
//      - every byte that does not begin a well-formed sequence becomes the
//        escape \ufffd (U+FFFD REPLACEMENT CHARACTER), one per byte, and
//        decoding resumes at the next byte.
//    A JSON parser therefore reads back exactly the input when the input is
//    well-formed UTF-8, and U+FFFD where it was not.
//
// 2. Printable ASCII (escape_untrusted), used to quote client bytes inside
//    error messages: bytes 0x20-0x7e stay (but '\' and '"' become \\ and \"),
//    \n \r \t stay those escapes, and every other byte becomes \xNN (lowercase
//    hex), so the byte values survive for whoever debugs the client. Valid
//    non-ASCII UTF-8 is escaped too: an error message built this way is pure
//    printable ASCII and safe anywhere.
//
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace faultline {

// Appends `bytes` to `out` as a complete JSON string literal, quotes included.
void append_json_quoted(std::string& out, std::string_view bytes);

// `bytes` as a JSON string literal, quotes included: the one non-throwing way
// to put client-provided bytes into JSON text.
std::string json_quote(std::string_view bytes);

// `bytes` as printable ASCII (rendering 2 above), without surrounding quotes.
// At most `max_bytes` input bytes are rendered; when more were given, "..."
// is appended.
std::string escape_untrusted(std::string_view bytes, size_t max_bytes = 128);

// `bytes` as lower-case hexadecimal, two digits per byte (a digest, a blob name).
std::string hex_lower(std::span<const uint8_t> bytes);

// Length of the well-formed UTF-8 sequence starting at bytes[0] (1-4), or 0
// when bytes[0] does not start one (or bytes is empty).
size_t utf8_sequence_length(std::string_view bytes);

// Whether every byte of `bytes` is part of a well-formed UTF-8 sequence.
bool is_valid_utf8(std::string_view bytes);

}  // namespace faultline
