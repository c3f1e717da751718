#include "common/text_escape.h"

#include <cstdint>

namespace faultline {

namespace {

constexpr char kHex[] = "0123456789abcdef";

void append_u_escape(std::string& out, uint32_t code_unit) {
  out += "\\u";
  out += kHex[(code_unit >> 12) & 0xf];
  out += kHex[(code_unit >> 8) & 0xf];
  out += kHex[(code_unit >> 4) & 0xf];
  out += kHex[code_unit & 0xf];
}

bool in(unsigned char c, unsigned char lo, unsigned char hi) { return c >= lo && c <= hi; }

}  // namespace

size_t utf8_sequence_length(std::string_view bytes) {
  if (bytes.empty()) return 0;
  const auto b = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  // Unicode 15, table 3-7 (well-formed UTF-8 byte sequences). The narrowed
  // second-byte ranges exclude overlong forms (E0, F0), UTF-16 surrogates
  // (ED) and code points above U+10FFFF (F4); C0, C1 and F5-FF never start one.
  size_t len;
  unsigned char lo = 0x80, hi = 0xbf;
  if (in(c, 0xc2, 0xdf)) {
    len = 2;
  } else if (c == 0xe0) {
    len = 3, lo = 0xa0;
  } else if (in(c, 0xe1, 0xec) || in(c, 0xee, 0xef)) {
    len = 3;
  } else if (c == 0xed) {
    len = 3, hi = 0x9f;
  } else if (c == 0xf0) {
    len = 4, lo = 0x90;
  } else if (in(c, 0xf1, 0xf3)) {
    len = 4;
  } else if (c == 0xf4) {
    len = 4, hi = 0x8f;
  } else {
    return 0;
  }
  if (bytes.size() < len || !in(b(1), lo, hi)) return 0;
  for (size_t i = 2; i < len; ++i) {
    if (!in(b(i), 0x80, 0xbf)) return 0;
  }
  return len;
}

bool is_valid_utf8(std::string_view bytes) {
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = utf8_sequence_length(bytes.substr(i));
    if (n == 0) return false;
    i += n;
  }
  return true;
}

void append_json_quoted(std::string& out, std::string_view bytes) {
  out.reserve(out.size() + bytes.size() + 2);
  out += '"';
  for (size_t i = 0; i < bytes.size();) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7f) {
            append_u_escape(out, c);
          } else {
            out += static_cast<char>(c);
          }
      }
      ++i;
      continue;
    }
    const size_t n = utf8_sequence_length(bytes.substr(i));
    if (n == 0) {
      append_u_escape(out, 0xfffd);
      ++i;
      continue;
    }
    const auto c1 = static_cast<unsigned char>(bytes[i + 1]);
    if (c == 0xc2 && c1 < 0xa0) {
      append_u_escape(out, c1);  // C2 80..9F encode the C1 controls U+0080..U+009F
    } else if (c == 0xe2 && c1 == 0x80 && (bytes[i + 2] == '\xa8' || bytes[i + 2] == '\xa9')) {
      append_u_escape(out, bytes[i + 2] == '\xa8' ? 0x2028 : 0x2029);
    } else {
      out.append(bytes.data() + i, n);
    }
    i += n;
  }
  out += '"';
}

std::string json_quote(std::string_view bytes) {
  std::string out;
  append_json_quoted(out, bytes);
  return out;
}

std::string hex_lower(std::span<const uint8_t> bytes) {
  std::string out;
  out.reserve(2 * bytes.size());
  for (const uint8_t b : bytes) {
    out += kHex[b >> 4];
    out += kHex[b & 0xf];
  }
  return out;
}

std::string escape_untrusted(std::string_view bytes, size_t max_bytes) {
  const bool cut = bytes.size() > max_bytes;
  if (cut) bytes = bytes.substr(0, max_bytes);
  std::string out;
  out.reserve(bytes.size() + 8);
  for (char ch : bytes) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c >= 0x20 && c < 0x7f) {
          out += ch;
        } else {
          out += "\\x";
          out += kHex[c >> 4];
          out += kHex[c & 0xf];
        }
    }
  }
  if (cut) out += "...";
  return out;
}

}  // namespace faultline
