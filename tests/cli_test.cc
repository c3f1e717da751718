// The faultline command as an operator runs it: `faultline serve` in its own
// process, restored into by faultline-client processes, stopped by SIGTERM,
// with logs a machine can read.
#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <regex>

#include "client/firecracker_client.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "harness.h"

namespace faultline::testing {
namespace {

bool wait_for_socket(const std::string& path) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  struct stat st {};
  while (std::chrono::steady_clock::now() < deadline) {
    if (::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling for the daemon to bind
  }
  return false;
}

std::vector<nlohmann::json> json_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << line;
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}

// What `faultline --version` prints (its exit status checked).
std::string version_output() {
  TempDir dir;
  const CommandRun r = run_faultline(dir, {"--version"}, std::chrono::seconds(20));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return r.output;
}

TEST(Cli, VersionNamesTheReleaseAndTheCommitItWasBuiltFrom) {
  const std::string out = version_output();
  // The project's version, and `git describe --always --dirty` of the tree
  // it was built from (12 hex digits) or "unknown" outside a checkout.
  const std::regex form("faultline " FAULTLINE_PROJECT_VERSION " \\(commit ([0-9a-f]{12,40}(-dirty)?|unknown)\\)\n");
  EXPECT_TRUE(std::regex_match(out, form)) << out;
}

TEST(Cli, ServeRestoreAndSigtermWithJsonLogs) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), log = dir.file("server.log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 32 * kMiB, 5, 0.2));
  pid_t server = spawn({built_binary("faultline"), "serve", "--socket", sock, "--memory", mem, "--log-format=json"},
                       log);
  ASSERT_GT(server, 0);
  ASSERT_TRUE(wait_for_socket(sock)) << read_file(log);

  for (const char* version : {"1.10", "1.16"}) {
    const std::string out = dir.file(std::string("client-") + version + ".out");
    pid_t c = spawn({built_binary("faultline-client"), "restore", "--socket", sock, "--memory", mem, "--fc-version",
                     version, "--pattern", "random", "--json"},
                    out);
    int status = wait_child(c, std::chrono::seconds(60));
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
    auto report = nlohmann::json::parse(read_file(out), nullptr, false);
    ASSERT_FALSE(report.is_discarded()) << read_file(out);
    EXPECT_EQ(report["mismatches"], 0);
  }

  ::kill(server, SIGTERM);
  int status = wait_child(server, std::chrono::seconds(20));
  ASSERT_TRUE(WIFEXITED(status)) << read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 0);

  auto lines = json_lines(read_file(log));
  size_t starts = 0, ends = 0;
  uint64_t faults = 0;
  for (const auto& j : lines) {
    EXPECT_TRUE(j.contains("ts") && j.contains("level") && j.contains("event"));
    if (j["event"] == "session_start") ++starts;
    if (j["event"] == "session_end") {
      ++ends;
      faults += j["faults"].get<uint64_t>();
      EXPECT_TRUE(j.contains("bytes") && j.contains("retries") && j.contains("removes"));
    }
  }
  EXPECT_EQ(starts, 2u);
  EXPECT_EQ(ends, 2u);  // the 1.10 session (socket closed at once) ends when the daemon stops
  // The start line says which build runs, as `faultline --version` does.
  auto start = std::find_if(lines.begin(), lines.end(), [](const auto& j) { return j["event"] == "server_start"; });
  ASSERT_NE(start, lines.end());
  EXPECT_EQ("faultline " + start->value("version", "?") + " (commit " + start->value("commit", "?") + ")\n",
            version_output());
  EXPECT_GT(faults, 0u);
  EXPECT_FALSE(std::filesystem::exists(sock)) << "the daemon removes its socket on exit";
}

TEST(Cli, DirtyQueryAndSessionsThroughTheControlSocket) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), ctl = dir.file("vm.ctl"), log = dir.file("log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 16 * kMiB, 5, 0.0));
  // The VM here is this test process: --on-fatal=leave, so that stopping the
  // daemon before it noticed the client's EOF cannot kill the test.
  pid_t server = spawn({built_binary("faultline"), "serve", "--socket", sock, "--memory", mem, "--control", ctl,
                        "--on-fatal=leave"},
                       log);
  ASSERT_GT(server, 0);
  ASSERT_TRUE(wait_for_socket(sock) && wait_for_socket(ctl)) << read_file(log);
  {
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}, .wp_async = true});
    ASSERT_TRUE(c) << c.error().describe();
    ASSERT_TRUE(c->connect_and_send(sock));
    auto v = client::Verifier::open(mem, c->guest_size(), c->page_size());
    ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{0, 4096}, client::Access::kRead));
    ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{8192, 12288}, client::Access::kWrite));
    ASSERT_TRUE(c->remove(5 * 4096, 4096));

    // madvise returns once the daemon has read the REMOVE; it records it
    // right after. Ask (bounded) until the session shows it.
    const std::string sessions_out = dir.file("sessions.out");
    nlohmann::json sessions;
    for (int attempt = 0; attempt < 200; ++attempt) {
      int status = wait_child(spawn({built_binary("faultline"), "sessions", "--control", ctl}, sessions_out),
                              std::chrono::seconds(10));
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(sessions_out);
      sessions = nlohmann::json::parse(read_file(sessions_out));
      ASSERT_EQ(sessions["sessions"].size(), 1u);
      if (sessions["sessions"][0]["removes"] == 1) break;
    }
    ASSERT_EQ(sessions["sessions"][0]["removes"], 1);
    int status = 0;
    const uint64_t id = sessions["sessions"][0]["session"];

    const std::string dirty_out = dir.file("dirty.out");
    status = wait_child(spawn({built_binary("faultline"), "dirty", "--control", ctl, "--session", std::to_string(id)},
                              dirty_out),
                        std::chrono::seconds(10));
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(dirty_out);
    auto map = nlohmann::json::parse(read_file(dirty_out));
    EXPECT_EQ(map["method"], "pagemap_scan");
    EXPECT_EQ(map["write_protect"], true);
    EXPECT_EQ(map["dirty"], nlohmann::json::parse("[[8192, 8192]]")) << map.dump();
    EXPECT_EQ(map["removed"], nlohmann::json::parse("[[20480, 4096]]")) << map.dump();

    const std::string bad_out = dir.file("bad.out");
    status = wait_child(spawn({built_binary("faultline"), "dirty", "--control", ctl, "--session", "99"}, bad_out),
                        std::chrono::seconds(10));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0);
    EXPECT_NE(read_file(bad_out).find("no running session 99"), std::string::npos);
  }
  ::kill(server, SIGTERM);
  EXPECT_NE(wait_child(server, std::chrono::seconds(20)), -1);
}

TEST(Cli, ZeroIndexSubcommandCountsZeroPages) {
  TempDir dir;
  const std::string mem = dir.file("mem"), out = dir.file("out");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.5));
  uint64_t zero = 0;
  for (uint64_t p = 0; p < 1024; ++p) zero += client::test_page_is_zero(p, 3, 0.5);
  int status = wait_child(spawn({built_binary("faultline"), "zero-index", "--memory", mem}, out), std::chrono::seconds(10));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
  EXPECT_NE(read_file(out).find(std::to_string(zero) + " of 1024 pages are zero"), std::string::npos) << read_file(out);
  EXPECT_TRUE(std::filesystem::exists(mem + ".zeroidx"));
}

TEST(Cli, ServeHelpDescribesTheModelAndOptions) {
  TempDir dir;
  const std::string out = dir.file("help.out");
  pid_t p = spawn({built_binary("faultline"), "serve", "--help"}, out);
  int status = wait_child(p, std::chrono::seconds(10));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const std::string help = read_file(out);
  for (const char* needle : {"one daemon per host", "--socket", "--socket-dir", "--memory", "--on-fatal", "--log-format",
                             "backend_type", "Uffd"}) {
    EXPECT_NE(help.find(needle), std::string::npos) << needle;
  }
}

TEST(Cli, MissingMemoryFileIsAClearStartupError) {
  TempDir dir;
  const std::string out = dir.file("err.out");
  pid_t p = spawn({built_binary("faultline"), "serve", "--socket", dir.file("s"), "--memory", dir.file("nope")}, out);
  int status = wait_child(p, std::chrono::seconds(10));
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0);
  EXPECT_NE(read_file(out).find("nope"), std::string::npos) << read_file(out);
}

}  // namespace
}  // namespace faultline::testing
