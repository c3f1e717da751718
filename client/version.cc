#include "client/version.h"

#include <charconv>

namespace faultline::client {

namespace {

// Reads one decimal component; advances `text` past it.
bool take_number(std::string_view& text, int& out) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, out);
  if (ec != std::errc() || ptr == begin || out < 0) return false;
  text.remove_prefix(static_cast<size_t>(ptr - begin));
  return true;
}

}  // namespace

Result<FirecrackerVersion> FirecrackerVersion::parse(std::string_view text) {
  const std::string original(text);
  if (!text.empty() && (text.front() == 'v' || text.front() == 'V')) text.remove_prefix(1);
  FirecrackerVersion v;
  if (!take_number(text, v.major) || text.empty() || text.front() != '.') {
    return fail("Firecracker version '" + original + "' is not MAJOR.MINOR (e.g. 1.14)");
  }
  text.remove_prefix(1);
  if (!take_number(text, v.minor)) {
    return fail("Firecracker version '" + original + "' is not MAJOR.MINOR (e.g. 1.14)");
  }
  if (!text.empty()) {
    int patch = 0;
    if (text.front() != '.') return fail("Firecracker version '" + original + "' has trailing characters");
    text.remove_prefix(1);
    if (!take_number(text, patch) || !text.empty()) {
      return fail("Firecracker version '" + original + "' has a malformed patch level");
    }
  }
  return v;
}

}  // namespace faultline::client
