#include "protocol/handshake.h"

#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/text_escape.h"

namespace faultline::protocol {
namespace {

using nlohmann::json;

bool is_json_whitespace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// A printable rendering of one byte for error messages.
std::string describe_byte(char c) {
  auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02x", u);
  return hex;
}

// A JSON value as it appeared, for error messages. Containers are summarized,
// not dumped: nlohmann's serializer recurses once per nesting level, so
// dumping a hostile "[[[[...]]]]" would overflow the stack. Strings are
// quoted with escape_untrusted() (printable ASCII, cut at 64 bytes so a 1 MiB
// value cannot flood a log line); the other scalars dump as plain ASCII.
std::string describe_value(const json& value) {
  constexpr size_t kMaxShown = 64;
  if (value.is_array()) return "an array of " + std::to_string(value.size()) + " elements";
  if (value.is_object()) return "an object with " + std::to_string(value.size()) + " fields";
  if (value.is_string()) return "\"" + escape_untrusted(value.get_ref<const std::string&>(), kMaxShown) + "\"";
  return escape_untrusted(value.dump(-1, ' ', false, json::error_handler_t::replace), kMaxShown);
}

// nlohmann's parse error ends with "; last read: '<the token so far>'",
// holding raw input bytes (invalid UTF-8 included) and as long as the token
// (a whole 1 MiB string). Keep its own sentence, and show only the end of the
// token, where the error is, escaped.
std::string describe_parse_error(std::string_view what) {
  constexpr std::string_view kLastRead = "; last read: '";
  constexpr size_t kTokenShown = 48;
  const size_t at = what.find(kLastRead);
  if (at == std::string_view::npos) return escape_untrusted(what, 256);
  std::string_view token = what.substr(at + kLastRead.size());
  if (!token.empty() && token.back() == '\'') token.remove_suffix(1);
  std::string out = escape_untrusted(what.substr(0, at), 256);
  out += "; last read: '";
  if (token.size() > kTokenShown) {
    out += "...";
    token = token.substr(token.size() - kTokenShown);
  }
  out += escape_untrusted(token, kTokenShown);
  out += "'";
  return out;
}

std::string region_field(size_t index, const char* field) {
  return "region " + std::to_string(index) + ": field \"" + field + "\"";
}

// Reads one unsigned integer field. nlohmann stores non-negative integer
// literals that fit in 64 bits as number_unsigned; negatives become
// number_integer, and fractions, exponents and literals above UINT64_MAX
// become number_float, so is_number_unsigned() is exactly "a u64 literal".
Result<std::optional<uint64_t>> read_u64(const json& region, size_t index, const char* field) {
  auto it = region.find(field);
  if (it == region.end()) return std::optional<uint64_t>{};
  if (!it->is_number_unsigned()) {
    return fail(region_field(index, field) + " must be an unsigned 64-bit integer, got " +
                describe_value(*it));
  }
  return std::optional<uint64_t>{it->get<uint64_t>()};
}

Result<uint64_t> read_required_u64(const json& region, size_t index, const char* field) {
  auto value = read_u64(region, index, field);
  if (!value) return std::unexpected(value.error());
  if (!value->has_value()) return fail(region_field(index, field) + " is missing");
  return **value;
}

Status check_page_size(uint64_t value, size_t index, const char* field) {
  if (value == kPageSize4K || value == kPageSize2M) return {};
  // Firecracker writes bytes even into page_size_kib, so 4 (a literal KiB
  // value) is as wrong as any other number: say so, since that is the likely
  // mistake of a hand-written client.
  return fail(region_field(index, field) + " is " + std::to_string(value) +
              "; allowed values are 4096 and 2097152 (bytes, even for page_size_kib)");
}

const char* describe_fields(HandshakeFormat format) {
  switch (format) {
    case HandshakeFormat::kNoPageSize: return "no page-size field";
    case HandshakeFormat::kPageSizeKibOnly: return "page_size_kib only";
    case HandshakeFormat::kBothFields: return "page_size and page_size_kib";
    case HandshakeFormat::kPageSizeOnly: return "page_size only";
  }
  return "unknown fields";
}

Result<GuestRegion> parse_region(const json& value, size_t index, HandshakeFormat* format) {
  if (!value.is_object()) {
    return fail("region " + std::to_string(index) + " is not a JSON object (got " +
                describe_value(value) + ")");
  }
  GuestRegion region;
  auto base = read_required_u64(value, index, "base_host_virt_addr");
  if (!base) return std::unexpected(base.error());
  auto size = read_required_u64(value, index, "size");
  if (!size) return std::unexpected(size.error());
  auto offset = read_required_u64(value, index, "offset");
  if (!offset) return std::unexpected(offset.error());
  auto page_size = read_u64(value, index, "page_size");
  if (!page_size) return std::unexpected(page_size.error());
  auto page_size_kib = read_u64(value, index, "page_size_kib");
  if (!page_size_kib) return std::unexpected(page_size_kib.error());

  region.base_host_virt_addr = *base;
  region.size = *size;
  region.offset = *offset;

  if (region.size == 0) {
    return fail(region_field(index, "size") + " is 0; a guest memory region is never empty");
  }

  if (page_size->has_value()) {
    if (auto ok = check_page_size(**page_size, index, "page_size"); !ok) return std::unexpected(ok.error());
  }
  if (page_size_kib->has_value()) {
    if (auto ok = check_page_size(**page_size_kib, index, "page_size_kib"); !ok) {
      return std::unexpected(ok.error());
    }
  }
  if (page_size->has_value() && page_size_kib->has_value() && **page_size != **page_size_kib) {
    return fail("region " + std::to_string(index) + ": fields \"page_size\" (" +
                std::to_string(**page_size) + ") and \"page_size_kib\" (" +
                std::to_string(**page_size_kib) + ") disagree; since v1.12 Firecracker writes the same byte count into both");
  }
  // Absent page-size fields mean 4 KiB: Firecracker before v1.7 had no huge
  // page support, so its guests only ever used base pages.
  region.page_size = page_size->value_or(page_size_kib->value_or(kPageSize4K));

  if (region.base_host_virt_addr > UINT64_MAX - region.size) {
    return fail(region_field(index, "size") + " (" + std::to_string(region.size) +
                ") added to \"base_host_virt_addr\" (" + std::to_string(region.base_host_virt_addr) +
                ") overflows 64 bits");
  }
  if (region.offset > UINT64_MAX - region.size) {
    return fail(region_field(index, "size") + " (" + std::to_string(region.size) +
                ") added to \"offset\" (" + std::to_string(region.offset) + ") overflows 64 bits");
  }
  // Firecracker mmaps every region (MAP_HUGETLB|MAP_HUGE_2MB for 2 MiB pages),
  // so base and size are page multiples; anything else cannot be served with
  // whole-page UFFDIO_COPY and means the JSON is not describing real memory.
  if (region.base_host_virt_addr % region.page_size != 0) {
    return fail(region_field(index, "base_host_virt_addr") + " (" +
                std::to_string(region.base_host_virt_addr) + ") is not a multiple of the page size " +
                std::to_string(region.page_size));
  }
  if (region.size % region.page_size != 0) {
    return fail(region_field(index, "size") + " (" + std::to_string(region.size) +
                ") is not a multiple of the page size " + std::to_string(region.page_size));
  }

  HandshakeFormat region_format =
      page_size->has_value()
          ? (page_size_kib->has_value() ? HandshakeFormat::kBothFields : HandshakeFormat::kPageSizeOnly)
          : (page_size_kib->has_value() ? HandshakeFormat::kPageSizeKibOnly : HandshakeFormat::kNoPageSize);
  if (index == 0) {
    *format = region_format;
  } else if (region_format != *format) {
    // Firecracker serializes all regions from one struct, so mixed fields mean
    // the JSON was not written by Firecracker and the format cannot be trusted.
    return fail("region " + std::to_string(index) + ": page-size fields (" +
                describe_fields(region_format) + ") differ from region 0 (" +
                describe_fields(*format) + ")");
  }
  return region;
}

Result<ParsedHandshake> parse_document(std::string_view text) {
  // nlohmann stops reading at a NUL byte and skips a leading UTF-8 byte order
  // mark, so it accepted "[...]\0junk" and "\xef\xbb\xbf[...]", which the
  // socket reader's scan_json_array() rejects (found by fuzz/handshake_fuzz.cc).
  // Firecracker sends neither: refuse both here too, so that one definition
  // of a handshake holds everywhere.
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return fail("handshake JSON holds a NUL byte at byte " + std::to_string(nul) + "; JSON text never does");
  }
  if (text.starts_with("\xef\xbb\xbf")) {
    return fail("handshake JSON starts with a UTF-8 byte order mark; Firecracker sends none");
  }
  json document;
  try {
    document = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return fail("handshake is not valid JSON: " + describe_parse_error(e.what()));
  }
  if (!document.is_array()) {
    return fail(std::string("handshake JSON must be an array of regions, got ") + document.type_name());
  }
  if (document.empty()) {
    return fail("handshake JSON is an empty array; Firecracker always sends at least one region");
  }
  ParsedHandshake parsed{{}, HandshakeFormat::kNoPageSize};
  parsed.regions.reserve(document.size());
  for (size_t i = 0; i < document.size(); ++i) {
    auto region = parse_region(document[i], i, &parsed.format);
    if (!region) return std::unexpected(region.error());
    parsed.regions.push_back(*region);
  }
  return parsed;
}

}  // namespace

const char* to_string(HandshakeFormat format) {
  switch (format) {
    case HandshakeFormat::kNoPageSize: return "v1.1-1.6 (no page-size field)";
    case HandshakeFormat::kPageSizeKibOnly: return "v1.7-1.11 (page_size_kib)";
    case HandshakeFormat::kBothFields: return "v1.12+ (page_size and page_size_kib)";
    case HandshakeFormat::kPageSizeOnly: return "non-Firecracker (page_size only)";
  }
  return "unknown handshake format";
}

CompletenessScan scan_json_array(std::string_view buf) {
  size_t i = 0;
  while (i < buf.size() && is_json_whitespace(buf[i])) ++i;
  if (i == buf.size()) return {Completeness::kIncomplete, {}};
  if (buf[i] != '[') {
    return {Completeness::kInvalid,
            "byte " + std::to_string(i) + " is " + describe_byte(buf[i]) + ", not the '[' that starts the region array"};
  }
  // Closers expected, innermost last. Tracking the kind (not just a depth)
  // catches "[}" early instead of waiting for the timeout.
  std::string expected_closers;
  bool in_string = false;
  bool escaped = false;
  size_t elements = 0;
  bool element_expected = false;  // at depth 1, the next value begins an element
  for (; i < buf.size(); ++i) {
    char c = buf[i];
    if (expected_closers.size() == 1 && !in_string) {
      if (c == ',') {
        element_expected = true;
      } else if (element_expected && c != ']' && !is_json_whitespace(c)) {
        ++elements;
        element_expected = false;
      }
    }
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[') {
      expected_closers.push_back(']');
      if (expected_closers.size() == 1) element_expected = true;
    } else if (c == '{') {
      expected_closers.push_back('}');
    } else if (c == ']' || c == '}') {
      if (expected_closers.back() != c) {
        return {Completeness::kInvalid, "byte " + std::to_string(i) + " is " + describe_byte(c) +
                                            " but '" + expected_closers.back() + "' was expected"};
      }
      expected_closers.pop_back();
      if (expected_closers.empty()) {
        for (size_t j = i + 1; j < buf.size(); ++j) {
          if (!is_json_whitespace(buf[j])) {
            return {Completeness::kInvalid, "byte " + std::to_string(j) + " is " + describe_byte(buf[j]) +
                                                " after the end of the region array at byte " + std::to_string(i)};
          }
        }
        return {Completeness::kComplete, {}, elements};
      }
    }
  }
  return {Completeness::kIncomplete, {}, elements};
}

Completeness json_array_completeness(std::string_view buf) { return scan_json_array(buf).state; }

Result<ParsedHandshake> parse_handshake_json(std::string_view json) {
  // nlohmann reports errors by throwing; nothing may escape this API, and an
  // allocation failure on a hostile input is just another bad handshake.
  try {
    return parse_document(json);
  } catch (const std::exception& e) {
    return fail("handshake JSON could not be processed: " + escape_untrusted(e.what(), 256));
  }
}

}  // namespace faultline::protocol
