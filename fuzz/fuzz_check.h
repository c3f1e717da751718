// Helpers shared by the fuzz targets (fuzz/*_fuzz.cc).
//
// A target is a function LLVMFuzzerTestOneInput(data, size) that feeds the
// bytes to one parser and checks properties that must hold for ANY input;
// a violated property aborts, which both engines (AFL++ and the corpus
// replay run by ctest) report as a crash. Targets must be deterministic and
// keep no state between inputs (AFL++ runs thousands of inputs per process).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace faultline::fuzz {

[[noreturn]] inline void check_failed(const char* what, const char* file, int line, const std::string& detail) {
  std::fprintf(stderr, "fuzz check failed: %s (%s:%d)%s%s\n", what, file, line, detail.empty() ? "" : ": ",
               detail.c_str());
  std::abort();
}

// FUZZ_CHECK(condition) or FUZZ_CHECK(condition, detail string).
#define FUZZ_CHECK(cond, ...)                                                                   \
  do {                                                                                          \
    if (!(cond)) ::faultline::fuzz::check_failed(#cond, __FILE__, __LINE__, std::string{__VA_ARGS__}); \
  } while (0)

inline bool printable_ascii(std::string_view s) {
  for (char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// Logs `value` (any bytes) as a field of `event` in both log formats and
// checks that each line is one clean line a log tool can read back: the JSON
// line parses and holds the value, the logfmt line has no raw control byte
// or invalid UTF-8. Also runs Logger::log() itself (into /dev/null).
void check_logged_in_both_formats(std::string_view event, std::string_view value);

}  // namespace faultline::fuzz
