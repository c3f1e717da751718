#include "client/byte_size.h"

#include <cctype>
#include <cmath>
#include <cstdlib>

namespace faultline::client {

Result<uint64_t> parse_byte_size(std::string_view text) {
  const std::string original(text);
  size_t digits = 0;
  while (digits < text.size() && (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.')) {
    ++digits;
  }
  if (digits == 0) return fail("size '" + original + "' does not start with a number");
  const std::string number(text.substr(0, digits));
  char* end = nullptr;
  const double value = std::strtod(number.c_str(), &end);
  if (end != number.c_str() + number.size()) return fail("size '" + original + "' has a malformed number");
  std::string_view unit = text.substr(digits);
  uint64_t multiplier = 1;
  if (!unit.empty()) {
    switch (std::toupper(static_cast<unsigned char>(unit.front()))) {
      case 'K': multiplier = 1ull << 10; break;
      case 'M': multiplier = 1ull << 20; break;
      case 'G': multiplier = 1ull << 30; break;
      case 'T': multiplier = 1ull << 40; break;
      case 'B': multiplier = 1; break;
      default: return fail("size '" + original + "' has an unknown unit (use K, M, G or T)");
    }
    if (std::toupper(static_cast<unsigned char>(unit.front())) != 'B') unit.remove_prefix(1);
    if (unit == "iB" || unit == "IB" || unit == "ib" || unit == "B" || unit == "b") unit = {};
    if (!unit.empty()) return fail("size '" + original + "' has trailing characters");
  }
  const double bytes = value * static_cast<double>(multiplier);
  if (bytes != std::floor(bytes) || bytes > 1.8e19) {
    return fail("size '" + original + "' is not a whole number of bytes");
  }
  return static_cast<uint64_t>(bytes);
}

Result<std::vector<uint64_t>> parse_byte_size_list(std::string_view text) {
  std::vector<uint64_t> sizes;
  while (true) {
    const size_t comma = text.find(',');
    auto size = parse_byte_size(text.substr(0, comma));
    if (!size) return std::unexpected(size.error());
    sizes.push_back(*size);
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return sizes;
}

std::string format_byte_size(uint64_t bytes) {
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes == 0 || bytes % 1024 != 0) return std::to_string(bytes) + " B";
  int unit = -1;
  while (unit < 3 && bytes % 1024 == 0 && bytes >= 1024) {
    bytes /= 1024;
    ++unit;
  }
  return std::to_string(bytes) + " " + kUnits[unit];
}

}  // namespace faultline::client
