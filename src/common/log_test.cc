#include "common/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <new>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/text_escape.h"

// This file replaces the global operator new/delete with malloc/free; GCC
// cannot see that they pair up.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

// Allocation failure injection: while g_fail_allocations is set on a thread,
// every operator new on that thread throws std::bad_alloc. Lets a test prove
// that log() survives an allocation failure in the middle of formatting.
namespace {
thread_local bool g_fail_allocations = false;
}  // namespace

void* operator new(std::size_t size) {
  if (g_fail_allocations) throw std::bad_alloc();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace faultline {
namespace {

// A logfmt reader as strict as the common ones: key=value pairs separated by
// single spaces; a value is either bare (no space, quote or '=') or a JSON
// string literal. Returns key -> decoded value; fails the test on anything else.
std::map<std::string, std::string> parse_logfmt(const std::string& line) {
  std::map<std::string, std::string> out;
  size_t i = line.find(' ');  // after the timestamp
  EXPECT_NE(i, std::string::npos) << line;
  while (i != std::string::npos && i < line.size()) {
    ++i;  // the space
    const size_t eq = line.find('=', i);
    if (eq == std::string::npos) {
      ADD_FAILURE() << "no '=' after byte " << i << " in " << line;
      break;
    }
    const std::string key = line.substr(i, eq - i);
    std::string value;
    size_t end;
    if (eq + 1 < line.size() && line[eq + 1] == '"') {
      // Find the closing quote: skip escaped characters.
      end = eq + 2;
      while (end < line.size() && line[end] != '"') end += line[end] == '\\' ? 2 : 1;
      if (end >= line.size()) {
        ADD_FAILURE() << "unterminated quoted value in " << line;
        break;
      }
      ++end;
      auto parsed = nlohmann::json::parse(line.substr(eq + 1, end - eq - 1), nullptr, false);
      if (parsed.is_discarded() || !parsed.is_string()) {
        ADD_FAILURE() << "quoted value is not a JSON string: " << line.substr(eq + 1, end - eq - 1);
        break;
      }
      value = parsed.get<std::string>();
    } else {
      end = line.find(' ', eq + 1);
      if (end == std::string::npos) end = line.size();
      value = line.substr(eq + 1, end - eq - 1);
    }
    out[key] = value;
    if (end < line.size() && line[end] != ' ') {
      ADD_FAILURE() << "garbage after a value at byte " << end << " in " << line;
      break;
    }
    i = end < line.size() ? end : std::string::npos;
  }
  return out;
}

// What the line must never contain, whatever was logged.
void expect_one_clean_line(const std::string& line) {
  EXPECT_TRUE(is_valid_utf8(line)) << escape_untrusted(line, 4096);
  for (size_t i = 0; i < line.size(); ++i) {
    const auto c = static_cast<unsigned char>(line[i]);
    ASSERT_FALSE(c < 0x20 || c == 0x7f) << "raw control byte " << int(c) << " at " << i << ": "
                                       << escape_untrusted(line, 4096);
    if (c == 0xc2 && i + 1 < line.size()) {
      ASSERT_GE(static_cast<unsigned char>(line[i + 1]), 0xa0) << "raw C1 control: " << escape_untrusted(line, 4096);
    }
  }
  EXPECT_EQ(line.find("\xe2\x80\xa8"), std::string::npos);
  EXPECT_EQ(line.find("\xe2\x80\xa9"), std::string::npos);
}

// What a reader decodes from bytes logged as a value: the input itself when
// it is well-formed UTF-8; otherwise U+FFFD for each byte that does not start
// a well-formed sequence.
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

void expect_value_survives_both_formats(const std::string& value) {
  const std::string shown = escape_untrusted(value, 256);
  Logger text(LogFormat::kText);
  const std::string t = text.format_line(LogLevel::kError, "handshake_failed", {{"session", 1}, {"error", value}, {"pid", 7}});
  expect_one_clean_line(t);
  auto fields = parse_logfmt(t);
  EXPECT_EQ(fields["event"], "handshake_failed") << shown;
  EXPECT_EQ(fields["error"], expected_decoding(value)) << shown << " -> " << t;
  EXPECT_EQ(fields["pid"], "7") << shown;
  EXPECT_EQ(fields.size(), 5u) << shown << " -> " << t;

  Logger json(LogFormat::kJson);
  const std::string j = json.format_line(LogLevel::kError, "handshake_failed", {{"session", 1}, {"error", value}, {"pid", 7}});
  expect_one_clean_line(j);
  auto parsed = nlohmann::json::parse(j, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << shown << " -> " << escape_untrusted(j, 4096);
  EXPECT_EQ(parsed["error"], expected_decoding(value)) << shown;
  EXPECT_EQ(parsed["pid"], 7) << shown;
  EXPECT_EQ(parsed.size(), 6u);
}

TEST(Logger, TextLinesAreLogfmtWithQuotedValuesWhereNeeded) {
  Logger log(LogFormat::kText);
  std::string line = log.format_line(LogLevel::kInfo, "session_end",
                                     {{"session", 3}, {"reason", "peer_exited"}, {"error", "bad \"json\" here"}});
  EXPECT_NE(line.find(" level=info event=session_end session=3 reason=peer_exited"), std::string::npos) << line;
  EXPECT_NE(line.find("error=\"bad \\\"json\\\" here\""), std::string::npos) << line;
}

TEST(Logger, JsonLinesParseAndKeepTypes) {
  Logger log(LogFormat::kJson);
  std::string line = log.format_line(LogLevel::kError, "session_fatal",
                                     {{"session", 7u}, {"killed", true}, {"error", "memory file truncated"},
                                      {"delta", -3}, {"seconds", 0.25}, {"whole", 3.0}});
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "error");
  EXPECT_EQ(j["event"], "session_fatal");
  EXPECT_EQ(j["session"], 7);
  EXPECT_EQ(j["killed"], true);
  EXPECT_EQ(j["error"], "memory file truncated");
  EXPECT_EQ(j["delta"], -3);
  EXPECT_EQ(j["seconds"], 0.25);
  EXPECT_TRUE(j["whole"].is_number_float()) << line;
  EXPECT_TRUE(j.contains("ts"));
  // The same order as the fields were given.
  EXPECT_LT(line.find("\"session\""), line.find("\"killed\""));
}

TEST(Logger, EveryByteValueGivesOneParseableLineInBothFormats) {
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    expect_value_survives_both_formats(std::string(1, c));
    expect_value_survives_both_formats(std::string("x") + c + "y");
    expect_value_survives_both_formats(std::string(3, c));
  }
}

TEST(Logger, TheHostileHandshakeErrorIsOneLine) {
  // What nlohmann's parse error quoted for the handshake that used to abort the daemon.
  expect_value_survives_both_formats(
      "handshake is not valid JSON: [json.exception.parse_error.101] parse error at line 1, column 9: "
      "syntax error while parsing value - invalid string: ill-formed UTF-8 byte; last read: '\"\xff'");
}

TEST(Logger, MalformedUtf8IsReplacedByteByByteAndWellFormedTextIsKept) {
  struct Case {
    std::string in;
    std::string decoded;
  };
  const std::string r = "\xef\xbf\xbd";  // U+FFFD
  const std::vector<Case> cases = {
      {"\xc0\x80", r + r},                            // overlong NUL
      {"\xc1\xbf", r + r},                            // overlong
      {"\xe0\x80\xaf", r + r + r},                    // overlong '/'
      {"\xf0\x80\x80\xaf", r + r + r + r},            // overlong, 4 bytes
      {"\xed\xa0\x80", r + r + r},                    // UTF-16 high surrogate
      {"\xed\xbf\xbf", r + r + r},                    // low surrogate
      {"\xf4\x90\x80\x80", r + r + r + r},            // above U+10FFFF
      {"\xf5\x80\x80\x80", r + r + r + r},            // never a lead byte
      {"\xe2\x82", r + r},                            // truncated euro sign
      {"\xe2\x82" "A", r + r + "A"},                  // truncated, then ASCII
      {"\x80\xbf", r + r},                            // lone continuation bytes
      {"\xe2\x82\xac", "\xe2\x82\xac"},               // euro sign: kept
      {"\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80"},       // U+1F600: kept
      {"\xf4\x8f\xbf\xbf", "\xf4\x8f\xbf\xbf"},       // U+10FFFF: kept
      {"\xed\x9f\xbf", "\xed\x9f\xbf"},               // U+D7FF: kept
      {"\xc2\x85 \xe2\x80\xa8 \xe2\x80\xa9", "\xc2\x85 \xe2\x80\xa8 \xe2\x80\xa9"},  // escaped, read back the same
      {std::string("a\0b", 3), std::string("a\0b", 3)},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(expected_decoding(c.in), c.decoded) << escape_untrusted(c.in);
    expect_value_survives_both_formats(c.in);
  }
}

TEST(Logger, RandomInvalidUtf8InValuesKeysAndEventNames) {
  std::mt19937_64 rng(20261205);
  // Pieces that make malformed text likely: lead bytes without their
  // continuation, stray continuations, overlongs, surrogates, controls.
  const std::vector<std::string> pieces = {"\xc3", "\xa9", "\xe2\x82", "\xf0\x9f", "\x80", "\xbf", "\xc0\xaf",
                                           "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xff", "\xfe", "\x00", "\n", "\r",
                                           "\x1b[31m", "\x7f", "\"", "\\", "=", " ", "a", "\xc3\xa9", "\xe2\x82\xac",
                                           "\xf0\x9f\x98\x80", "\xc2\x85", "\xe2\x80\xa8", "}", "{"};
  Logger text(LogFormat::kText);
  Logger json(LogFormat::kJson);
  for (int round = 0; round < 2000; ++round) {
    std::string value, key, event;
    const int n = static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) value += pieces[rng() % pieces.size()];
    for (int i = 0; i < 3; ++i) key += pieces[rng() % pieces.size()];
    for (int i = 0; i < 3; ++i) event += pieces[rng() % pieces.size()];
    if (round % 3 == 0) {
      for (int i = 0; i < 8; ++i) value += static_cast<char>(rng() & 0xff);  // raw random bytes
    }
    expect_value_survives_both_formats(value);
    const std::string t = text.format_line(LogLevel::kWarn, event, {{key, value}, {"n", round}});
    expect_one_clean_line(t);
    auto tf = parse_logfmt(t);
    EXPECT_EQ(tf["n"], std::to_string(round)) << escape_untrusted(t, 4096);
    const std::string j = json.format_line(LogLevel::kWarn, event, {{key, value}, {"n", round}});
    expect_one_clean_line(j);
    auto parsed = nlohmann::json::parse(j, nullptr, false);
    ASSERT_FALSE(parsed.is_discarded()) << escape_untrusted(j, 4096);
    EXPECT_EQ(parsed["event"], expected_decoding(event));
    EXPECT_EQ(parsed["n"], round);
  }
}

TEST(Logger, KeysAndEventNamesCannotForgeFieldsInText) {
  Logger text(LogFormat::kText);
  const std::string t = text.format_line(LogLevel::kInfo, "ev ent=x\nlevel=error", {{"a b=c", "v"}, {"", "w"}});
  expect_one_clean_line(t);
  EXPECT_NE(t.find(" event=ev_ent_x_level_error a_b_c=v _=w"), std::string::npos) << t;
}

TEST(Logger, JsonKeepsTheFirstOfRepeatedOrReservedKeys) {
  Logger json(LogFormat::kJson);
  const std::string j =
      json.format_line(LogLevel::kInfo, "session_end", {{"event", "forged"}, {"ts", 1}, {"a", 1}, {"a", 2}});
  auto parsed = nlohmann::json::parse(j);
  EXPECT_EQ(parsed["event"], "session_end");
  EXPECT_TRUE(parsed["ts"].is_string());
  EXPECT_EQ(parsed["a"], 1);
  EXPECT_EQ(parsed.size(), 4u) << j;
}

TEST(Logger, NonFiniteDoublesAreNullInJson) {
  Logger json(LogFormat::kJson);
  auto parsed = nlohmann::json::parse(json.format_line(
      LogLevel::kInfo, "e", {{"nan", std::nan("")}, {"inf", std::numeric_limits<double>::infinity()}}));
  EXPECT_TRUE(parsed["nan"].is_null());
  EXPECT_TRUE(parsed["inf"].is_null());
}

// Reads what log() wrote to a pipe.
std::string read_pipe(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

TEST(Logger, LogWritesExactlyOneLinePerCallWhateverTheBytes) {
  for (LogFormat format : {LogFormat::kText, LogFormat::kJson}) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    Logger log(format, LogLevel::kDebug, p[1]);
    std::string every_byte;
    for (int b = 0; b < 256; ++b) every_byte += static_cast<char>(b);
    log.error("handshake_failed", {{"error", every_byte}});
    log.info("e\nv", {{"k\n", "\n\n"}});
    ::close(p[1]);
    const std::string out = read_pipe(p[0]);
    ::close(p[0]);
    ASSERT_FALSE(out.empty());
    EXPECT_EQ(out.back(), '\n');
    size_t lines = 0;
    for (char c : out) lines += c == '\n';
    EXPECT_EQ(lines, 2u) << escape_untrusted(out, 4096);
  }
}

TEST(Logger, AnAllocationFailureWhileFormattingStillWritesTheEventAndNeverThrows) {
  for (LogFormat format : {LogFormat::kText, LogFormat::kJson}) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    Logger log(format, LogLevel::kDebug, p[1]);
    const std::vector<LogField> fields = {{"error", std::string(1000, 'x')}, {"session", 4}};
    g_fail_allocations = true;
    log.log(LogLevel::kError, "handshake_failed\n", fields);  // must neither throw nor terminate
    g_fail_allocations = false;
    ::close(p[1]);
    std::string out = read_pipe(p[0]);
    ::close(p[0]);
    ASSERT_FALSE(out.empty());
    ASSERT_EQ(out.back(), '\n');
    out.pop_back();
    EXPECT_EQ(out.find('\n'), std::string::npos) << out;
    expect_one_clean_line(out);
    if (format == LogFormat::kJson) {
      auto parsed = nlohmann::json::parse(out);
      EXPECT_EQ(parsed["event"], "handshake_failed_");
      EXPECT_EQ(parsed["level"], "error");
      EXPECT_EQ(parsed["log_error"], "fields dropped: out of memory");
    } else {
      auto f = parse_logfmt(out);
      EXPECT_EQ(f["event"], "handshake_failed_");
      EXPECT_EQ(f["log_error"], "fields dropped: out of memory");
    }
  }
}

}  // namespace
}  // namespace faultline
