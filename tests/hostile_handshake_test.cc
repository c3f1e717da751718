// Hostile handshakes against a running daemon, in both log formats: bytes an
// attacker chooses (invalid UTF-8, NUL, overlong encodings, surrogates,
// terminal escapes) each end only their own connection with one
// handshake_failed line that log tools can parse, and the daemon goes on
// serving a good client byte for byte. One such handshake used to abort the
// whole daemon (type_error.316 thrown while quoting the error in the log).
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "client/restore_scenario.h"
#include "common/text_escape.h"
#include "harness.h"

namespace faultline::testing {
namespace {

std::vector<std::string> hostile_handshakes() {
  return {
      "[{\"a\":\"\xff\"}]",                                  // the one that aborted the daemon
      std::string("[{\"a\":\"\0\"}]", 11),                   // NUL inside a string
      std::string("[{\"size\":4096,\0\"offset\":0}]", 27),   // NUL between tokens
      "[{\"\xff\xfe\":1}]",                                  // invalid UTF-8 in a key
      "[{\"size\":\xff,\"offset\":0}]",                      // where a number goes
      "[{\"size\":40\xc3\xa9,\"offset\":0}]",                // UTF-8 letter inside a number
      "[{\"a\":\"\xc0\xaf\"}]",                              // overlong '/'
      "[{\"a\":\"\xe0\x80\x80\"}]",                          // overlong NUL, 3 bytes
      "[{\"a\":\"\xed\xa0\x80\xed\xb0\x80\"}]",              // CESU-8 surrogate pair
      "[{\"a\":\"\\udc00\"}]",                               // escaped lone low surrogate
      "[{\"a\":\"\xf4\x90\x80\x80\"}]",                      // beyond U+10FFFF
      "[{\"a\":\"\x1b]0;owned\x07\n\r\"}]",                  // terminal escapes, raw newline
      "[{\"base_host_virt_addr\":\"\\u0000\\n\\u2028\xc2\x85\",\"size\":4096,\"offset\":0}]",  // valid JSON, bad value
      "[\"\xe2\x80\xa8\"]",                                  // a raw line separator
  };
}

// Sends each hostile handshake on its own connection and waits for its end.
void send_all_hostile(ServerHarness& h) {
  const auto all = hostile_handshakes();
  for (size_t i = 0; i < all.size(); ++i) {
    UniqueFd fd = connect_unix(h.socket());
    ASSERT_EQ(::send(fd.get(), all[i].data(), all[i].size(), MSG_NOSIGNAL), static_cast<ssize_t>(all[i].size()));
    // The connection stays open (as Firecracker 1.12+ does) until the daemon
    // has judged it: its end is the daemon's doing, not an EOF.
    ASSERT_TRUE(h.wait_ended(i + 1)) << "no end for handshake " << i << ": " << escape_untrusted(all[i]);
  }
}

void expect_daemon_serves_a_good_client(ServerHarness& h) {
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.touch_fraction = 0.05;
  o.threads = 1;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_GT(r->pages_verified, 0u);
  ASSERT_TRUE(h.wait_ended(hostile_handshakes().size() + 1));
  ASSERT_EQ(h.server().finished_sessions().size(), 1u);
}

std::vector<std::string> lines_of(const std::string& log) {
  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t nl; (nl = log.find('\n', start)) != std::string::npos; start = nl + 1) {
    lines.push_back(log.substr(start, nl - start));
  }
  EXPECT_EQ(start, log.size()) << "the log ends in the middle of a line";
  return lines;
}

void expect_no_raw_control_or_invalid_byte(const std::string& line) {
  EXPECT_TRUE(is_valid_utf8(line)) << escape_untrusted(line, 2048);
  for (char ch : line) {
    const auto c = static_cast<unsigned char>(ch);
    ASSERT_FALSE(c < 0x20 || c == 0x7f) << "raw byte " << int(c) << " in " << escape_untrusted(line, 2048);
  }
}

ServerHarness::Options small_server(LogFormat format) {
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  o.log_format = format;
  return o;
}

TEST(HostileHandshake, EachIsOneParseableJsonLineAndTheDaemonServesOn) {
  ServerHarness h(small_server(LogFormat::kJson));
  send_all_hostile(h);
  expect_daemon_serves_a_good_client(h);
  h.stop();
  size_t failed = 0;
  for (const std::string& line : lines_of(h.log())) {
    expect_no_raw_control_or_invalid_byte(line);
    auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << escape_untrusted(line, 2048);
    ASSERT_TRUE(j.is_object());
    if (j["event"] == "handshake_failed") {
      ++failed;
      ASSERT_TRUE(j["error"].is_string());
      EXPECT_FALSE(j["error"].get<std::string>().empty());
      EXPECT_EQ(j["uffd_received"], false);
    }
  }
  EXPECT_EQ(failed, hostile_handshakes().size());
  EXPECT_EQ(h.server().rejected_connections().size(), hostile_handshakes().size());
}

TEST(HostileHandshake, EachIsOneCleanLogfmtLineAndTheDaemonServesOn) {
  ServerHarness h(small_server(LogFormat::kText));
  send_all_hostile(h);
  expect_daemon_serves_a_good_client(h);
  h.stop();
  size_t failed = 0;
  for (const std::string& line : lines_of(h.log())) {
    expect_no_raw_control_or_invalid_byte(line);
    if (line.find(" event=handshake_failed ") != std::string::npos) {
      ++failed;
      EXPECT_NE(line.find(" error=\""), std::string::npos) << line;
      EXPECT_NE(line.find(" uffd_received=false"), std::string::npos) << line;
    }
  }
  EXPECT_EQ(failed, hostile_handshakes().size());
  // The byte that used to abort the daemon is named, escaped, in the error.
  EXPECT_NE(h.log().find("\\\\xff"), std::string::npos) << h.log();
}

}  // namespace
}  // namespace faultline::testing
