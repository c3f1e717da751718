#include "fuzz/fuzz_check.h"

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "common/text_escape.h"

namespace faultline::fuzz {

namespace {

// What a reader decodes from `bytes` logged as a string: the bytes when they
// are well-formed UTF-8, else U+FFFD for each byte not starting a sequence.
std::string expected_decoding(std::string_view bytes) {
  std::string out;
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = utf8_sequence_length(bytes.substr(i));
    if (n == 0) {
      out += "\xef\xbf\xbd";
      ++i;
    } else {
      out.append(bytes.substr(i, n));
      i += n;
    }
  }
  return out;
}

void check_clean_line(const std::string& line) {
  FUZZ_CHECK(is_valid_utf8(line), escape_untrusted(line, 512));
  for (char ch : line) {
    const auto c = static_cast<unsigned char>(ch);
    FUZZ_CHECK(c >= 0x20 && c != 0x7f, escape_untrusted(line, 512));
  }
}

int dev_null() {
  static const int fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  return fd;
}

}  // namespace

void check_logged_in_both_formats(std::string_view event, std::string_view value) {
  const std::string expected = expected_decoding(value);
  {
    Logger json(LogFormat::kJson, LogLevel::kDebug, dev_null());
    const std::string line = json.format_line(LogLevel::kError, event, {{"error", value}, {"session", 1}});
    check_clean_line(line);
    auto parsed = nlohmann::json::parse(line, nullptr, false);
    FUZZ_CHECK(!parsed.is_discarded() && parsed.is_object(), escape_untrusted(line, 512));
    FUZZ_CHECK(parsed["error"].is_string() && parsed["error"].get<std::string>() == expected,
               escape_untrusted(line, 512));
    FUZZ_CHECK(parsed["event"] == expected_decoding(event));
    json.log(LogLevel::kError, event, {{"error", value}});
  }
  {
    Logger text(LogFormat::kText, LogLevel::kDebug, dev_null());
    const std::string line = text.format_line(LogLevel::kError, event, {{"error", value}, {"session", 1}});
    check_clean_line(line);
    // The value sits between " error=" and " session=1" (the last field).
    const size_t at = line.find(" error=");
    const size_t end = line.rfind(" session=1");
    FUZZ_CHECK(at != std::string::npos && end != std::string::npos && end >= at + 7, escape_untrusted(line, 512));
    const std::string shown = line.substr(at + 7, end - at - 7);
    if (!shown.empty() && shown.front() == '"') {
      auto parsed = nlohmann::json::parse(shown, nullptr, false);
      FUZZ_CHECK(parsed.is_string() && parsed.get<std::string>() == expected, escape_untrusted(line, 512));
    } else {
      FUZZ_CHECK(shown == value, escape_untrusted(line, 512));  // bare: printable ASCII, as it was
    }
    text.log(LogLevel::kError, event, {{"error", value}});
  }
}

}  // namespace faultline::fuzz
