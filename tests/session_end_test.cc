// How sessions end: bad input ends only its own session with a clear error;
// a VM that exits mid-serve ends its session cleanly; a session that cannot
// go on kills its VM (unless told to leave it) and the daemon keeps serving.
#include <sys/socket.h>
#include <sys/un.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "client/firecracker_client.h"
#include "client/handshake.h"
#include "client/restore_scenario.h"
#include "client/touch.h"
#include "client/uffd_setup.h"
#include "client/verifier.h"
#include "harness.h"

namespace faultline::testing {
namespace {

UniqueFd ready_uffd() {
  auto fd = client::open_userfaultfd();
  EXPECT_TRUE(fd);
  EXPECT_TRUE(client::uffd_api(fd->get(), UFFD_FEATURE_EVENT_REMOVE));
  return std::move(*fd);
}

struct BadHandshake {
  const char* name;
  std::string json;  // sent as is
  enum FdKind { kUffd, kNone, kPipe } fd = kUffd;
  bool close_after = true;
  const char* error_needle;
};

// gtest prints parameters in test listings: the case's name, not its bytes.
void PrintTo(const BadHandshake& c, std::ostream* os) { *os << c.name; }

class BadInput : public ::testing::TestWithParam<BadHandshake> {};

TEST_P(BadInput, EndsOnlyItsOwnSessionWithAClearError) {
  const BadHandshake& c = GetParam();
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ho.handshake_timeout = std::chrono::milliseconds(300);
  ServerHarness h(ho);
  {
    UniqueFd sock = connect_unix(h.socket());
    UniqueFd fd;
    int pipefd[2] = {-1, -1};
    if (c.fd == BadHandshake::kUffd) fd = ready_uffd();
    if (c.fd == BadHandshake::kPipe) {
      ASSERT_EQ(::pipe2(pipefd, O_CLOEXEC), 0);
      fd.reset(pipefd[0]);
    }
    std::vector<int> fds;
    if (fd) fds.push_back(fd.get());
    ASSERT_TRUE(client::send_handshake(sock.get(), c.json, fds));
    if (pipefd[1] >= 0) ::close(pipefd[1]);
    if (!c.close_after) {
      // Keep the connection open: the server's handshake timeout must fire.
      ASSERT_TRUE(h.wait_ended(1));
    }
  }
  ASSERT_TRUE(h.wait_ended(1));
  auto rejected = h.server().rejected_connections();
  ASSERT_EQ(rejected.size(), 1u);
  EXPECT_NE(rejected[0].find(c.error_needle), std::string::npos) << rejected[0];
  EXPECT_NE(h.log().find("handshake_failed"), std::string::npos) ;
  expect_served(h);
}

std::string region_json(uint64_t base, uint64_t size, uint64_t offset, uint64_t page) {
  return nlohmann::json::array({{{"base_host_virt_addr", base}, {"size", size}, {"offset", offset},
                                 {"page_size", page}, {"page_size_kib", page}}})
      .dump();
}

INSTANTIATE_TEST_SUITE_P(
    Handshake, BadInput,
    ::testing::Values(
        BadHandshake{"MalformedJson", R"([{"base_host_virt_addr": 1,, }])", BadHandshake::kUffd, true, "JSON"},
        BadHandshake{"TruncatedJsonThenClose", R"([{"base_host_virt_addr": 140)", BadHandshake::kUffd, true,
                     "mid-handshake"},
        BadHandshake{"NoFd", region_json(0x7f0000000000, 4096, 0, 4096), BadHandshake::kNone, true, "fd"},
        BadHandshake{"FdIsNotAUserfaultfd", region_json(0x7f0000000000, 4096, 0, 4096), BadHandshake::kPipe, true,
                     "userfaultfd"},
        BadHandshake{"PageSizeNeither4KNor2M", region_json(0x7f0000000000, 8192, 0, 8192), BadHandshake::kUffd, true,
                     "8192"},
        BadHandshake{"HandshakeTimeout", R"([{"base_host_virt_addr": 140)", BadHandshake::kUffd, false, "time"}),
    [](const auto& info) { return std::string(info.param.name); });

struct BadRegions {
  const char* name;
  std::vector<GuestRegion> regions;
  const char* error_needle;
};

void PrintTo(const BadRegions& c, std::ostream* os) { *os << c.name; }

class BadLayout : public ::testing::TestWithParam<BadRegions> {};

TEST_P(BadLayout, IsRejectedAfterTheHandshakeAndTheDaemonGoesOn) {
  const BadRegions& c = GetParam();
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ServerHarness h(ho);  // on_fatal = leave: the peer here is this test process
  {
    UniqueFd sock = connect_unix(h.socket());
    UniqueFd uffd = ready_uffd();
    std::vector<int> fds{uffd.get()};
    ASSERT_TRUE(client::send_handshake(sock.get(), client::handshake_json(c.regions, {1, 14}), fds));
    ASSERT_TRUE(h.wait_ended(1));
  }
  auto rejected = h.server().rejected_connections();
  ASSERT_EQ(rejected.size(), 1u);
  EXPECT_NE(rejected[0].find(c.error_needle), std::string::npos) << rejected[0];
  // Misalignment is caught while parsing the handshake, the rest once the
  // regions meet the memory file: either way one error line says why.
  const std::string log = h.log();
  EXPECT_TRUE(log.find("session_rejected") != std::string::npos || log.find("handshake_failed") != std::string::npos);
  expect_served(h);
}

INSTANTIATE_TEST_SUITE_P(
    Regions, BadLayout,
    ::testing::Values(
        BadRegions{"MisalignedBase", {{0x7f0000000100, 4096, 0, 4096}}, "not a multiple"},
        BadRegions{"MisalignedSize", {{0x7f0000000000, 6000, 0, 4096}}, "not a multiple"},
        BadRegions{"Overlapping", {{0x7f0000000000, 8192, 0, 4096}, {0x7f0000001000, 4096, 8192, 4096}}, "overlaps"},
        BadRegions{"BeyondTheEndOfTheMemoryFile", {{0x7f0000000000, 32 * kMiB, 0, 4096}}, "beyond the end"},
        BadRegions{"HugeRegionMisaligned", {{0x7f0000001000, 2 * kMiB, 0, 2 * kMiB}}, "not a multiple"},
        BadRegions{"OverlappingInTheFile", {{0x7f0000000000, 8192, 0, 4096}, {0x7f0000100000, 8192, 4096, 4096}},
                   "in the memory file"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(SessionEnd, ClientDyingMidHandshakeEndsOnlyThatConnection) {
  ServerHarness h;
  {
    UniqueFd sock = connect_unix(h.socket());
    const std::string json = region_json(0x7f0000000000, 4096, 0, 4096);
    ASSERT_EQ(::send(sock.get(), json.data(), json.size() / 2, MSG_NOSIGNAL), static_cast<ssize_t>(json.size() / 2));
  }  // closed: the client "died"
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.server().rejected_connections().at(0).find("mid-handshake"), std::string::npos);
  expect_served(h);
}

TEST(SessionEnd, SocketEofEndsANewerFirecrackersSession) {
  ServerHarness h;
  auto c = client::FirecrackerClient::create({.version = {1, 12}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{0, 4096}, client::Access::kRead));
  EXPECT_EQ(h.server().active_sessions(), 1u);
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed);
  EXPECT_EQ(s.counters.pages_snapshot, 2u);
  EXPECT_NE(h.log().find("event=session_end"), std::string::npos);
  EXPECT_NE(h.log().find("state=socket_closed"), std::string::npos);
}

size_t count_entries(const std::string& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
  return n;
}

TEST(SessionEnd, EndedSessionsReleaseEveryFdAndThread) {
  ServerHarness h;
  // The server joins a finished session's threads on its next loop turn
  // (every 200 ms): wait for that before counting, both times.
  auto all_joined = [&] {
    for (int i = 0; i < 5000 && h.server().connection_threads() > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for the join, bounded
    }
    return h.server().connection_threads() == 0;
  };
  // One session first, so that lazily created process-wide things exist.
  expect_served(h);
  ASSERT_TRUE(all_joined());
  const size_t fds = count_entries("/proc/self/fd");
  const size_t threads = count_entries("/proc/self/task");
  for (int i = 0; i < 3; ++i) expect_served(h);
  ASSERT_TRUE(all_joined());
  EXPECT_EQ(count_entries("/proc/self/fd"), fds);
  // A thread just joined may still be listed in /proc/self/task for a moment
  // (pthread_join returns when its tid is cleared, before the kernel releases
  // the task); a leaked one never goes.
  EXPECT_TRUE(wait_until([&] { return count_entries("/proc/self/task") == threads; }))
      << count_entries("/proc/self/task") << " threads against " << threads;
}

// --- separate client processes (the server may kill them) -----------------

std::vector<std::string> client_args(const ServerHarness& h, const std::string& memory, uint64_t extra_touch_rounds) {
  (void)extra_touch_rounds;
  return {built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", memory,
          "--threads", "1", "--pattern", "random", "--remove-fraction", "0"};
}

// Waits (polling server state, bounded) until a live session has served `n` faults.
bool wait_for_faults(ServerHarness& h, uint64_t n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    for (const auto& s : h.server().live_sessions()) {
      if (s.counters.faults >= n) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

TEST(SessionEnd, VmExitMidServeEndsTheSessionAndFreesIt) {
  ServerHarness::Options ho;
  ho.memory_bytes = 512 * kMiB;
  ServerHarness h(ho);
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn(client_args(h, h.memory(), 0), out);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for_faults(h, 2000)) << read_file(out);
  ::kill(pid, SIGKILL);
  int status = wait_child(pid, std::chrono::seconds(20));
  ASSERT_TRUE(WIFSIGNALED(status));
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_TRUE(s.end == SessionEnd::kPeerExited || s.end == SessionEnd::kSocketClosed ||
              s.end == SessionEnd::kPeerGone)
      << to_string(s.end);
  EXPECT_GE(s.counters.faults, 2000u);
  EXPECT_EQ(h.server().active_sessions(), 0u);
  expect_served(h);
}

TEST(SessionEnd, MemoryFileTruncatedWhileServingKillsThatVmOnly) {
  ServerHarness::Options ho;
  ho.memory_bytes = 256 * kMiB;
  ho.on_fatal = OnFatal::kKill;
  ServerHarness h(ho);
  // The client verifies against its own copy: the served file is about to shrink.
  const std::string copy = h.dir().file("mem.copy");
  std::filesystem::copy_file(h.memory(), copy);
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn(client_args(h, copy, 0), out);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for_faults(h, 500)) << read_file(out);
  ASSERT_EQ(::truncate(h.memory().c_str(), 4 * kMiB), 0);
  int status = wait_child(pid, std::chrono::seconds(30));
  ASSERT_NE(status, -1) << "the client hung: the server neither served nor killed it";
  ASSERT_TRUE(WIFSIGNALED(status)) << read_file(out);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kFatal);
  EXPECT_NE(s.error.find("truncated"), std::string::npos) << s.error;
  EXPECT_TRUE(s.peer_killed);
  EXPECT_NE(h.log().find("session_fatal"), std::string::npos);
  // The daemon lives on and serves what the file still holds.
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {256 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(copy, c->guest_size(), c->page_size());
  auto r = client::touch_pages(*c, **v, std::vector<uint64_t>{0, 4096, 8192}, client::Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
  // End this session before the harness stops the server: with on_fatal=kill
  // a stop would kill its peer, which here is the test process itself.
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(2));
}

TEST(SessionEnd, BadRegionsFromARealClientProcessGetItKilled) {
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ho.on_fatal = OnFatal::kKill;
  ServerHarness h(ho);
  // The client believes the snapshot is 32 MiB; the server's file holds 16.
  const std::string bigger = h.dir().file("mem.big");
  ASSERT_TRUE(client::write_test_memory_file(bigger, 32 * kMiB, 7, 0.1));
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn(client_args(h, bigger, 0), out);
  ASSERT_GT(pid, 0);
  int status = wait_child(pid, std::chrono::seconds(30));
  ASSERT_NE(status, -1) << "the client hung";
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.server().rejected_connections().at(0).find("beyond the end"), std::string::npos);
  EXPECT_NE(h.log().find("peer_killed=true"), std::string::npos) << h.log();
  expect_served(h);
}

// A client process that sends `json` (with a ready userfaultfd, or with no fd)
// and then waits to be served, as Firecracker would after resuming the VM.
pid_t fork_client_sending(const std::string& socket, const std::string& json, bool with_uffd) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  UniqueFd sock = connect_unix(socket);
  UniqueFd uffd = with_uffd ? ready_uffd() : UniqueFd();
  std::vector<int> fds;
  if (uffd) fds.push_back(uffd.get());
  if (!sock || (with_uffd && !uffd) || !client::send_handshake(sock.get(), json, fds)) ::_exit(3);
  for (;;) ::pause();
}

// A handshake that fails after the uffd arrived leaves a VM nobody serves:
// with --on-fatal=kill its process is killed, as for any other fatal end.
TEST(SessionEnd, HandshakeFailingAfterTheUffdArrivedKillsTheClient) {
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ho.on_fatal = OnFatal::kKill;
  ServerHarness h(ho);
  const pid_t pid = fork_client_sending(h.socket(), R"([{"base_host_virt_addr": 1,, }])", true);
  ASSERT_GT(pid, 0);
  const int status = wait_child(pid, std::chrono::seconds(30));
  ASSERT_NE(status, -1) << "the client was left hanging";
  ASSERT_TRUE(WIFSIGNALED(status)) << status;
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.log().find("handshake_failed"), std::string::npos) << h.log();
  EXPECT_NE(h.log().find("uffd_received=true"), std::string::npos) << h.log();
  EXPECT_NE(h.log().find("peer_killed=true"), std::string::npos) << h.log();
  expect_served(h);
}

// Without a uffd nothing was handed over (no VM can be waiting on us), and
// with --on-fatal=leave nothing is killed either.
TEST(SessionEnd, HandshakeFailingWithoutAUffdOrWithLeaveKillsNobody) {
  for (const bool with_uffd : {false, true}) {
    ServerHarness::Options ho;
    ho.memory_bytes = 16 * kMiB;
    ho.on_fatal = with_uffd ? OnFatal::kLeave : OnFatal::kKill;
    ServerHarness h(ho);
    const pid_t pid = fork_client_sending(h.socket(), R"([{"base_host_virt_addr": 1,, }])", with_uffd);
    ASSERT_GT(pid, 0);
    ASSERT_TRUE(h.wait_ended(1));
    EXPECT_NE(h.log().find(with_uffd ? "uffd_received=true" : "uffd_received=false"), std::string::npos) << h.log();
    EXPECT_NE(h.log().find("peer_killed=false"), std::string::npos) << h.log();
    EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), 0) << "the client is still alive";
    ::kill(pid, SIGKILL);
    wait_child(pid, std::chrono::seconds(10));
  }
}

TEST(SessionEnd, OnFatalLeaveLogsButDoesNotKill) {
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ho.on_fatal = OnFatal::kLeave;
  ServerHarness h(ho);
  const std::string bigger = h.dir().file("mem.big");
  ASSERT_TRUE(client::write_test_memory_file(bigger, 32 * kMiB, 7, 0.1));
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn(client_args(h, bigger, 0), out);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.log().find("peer_killed=false"), std::string::npos) << h.log();
  // The client is left hanging on its first fault, as asked: still alive.
  EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), 0);
  ::kill(pid, SIGKILL);
  wait_child(pid, std::chrono::seconds(10));
}

}  // namespace
}  // namespace faultline::testing
