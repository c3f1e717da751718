// The daemon on a shared host: who may connect (socket modes and owners, the
// peer allow-list, pidfds taken at accept), where the control socket may
// write, and the limits that keep a client from wedging or exhausting it
// (concurrent handshakes and sessions, ended-session history, the control
// socket's deadline and reply bound, running out of fds).
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "client/firecracker_client.h"
#include "client/handshake.h"
#include "client/restore_scenario.h"
#include "client/touch.h"
#include "client/uffd_setup.h"
#include "client/verifier.h"
#include "harness.h"
#include "protocol/handshake_socket.h"
#include "race_harness.h"
#include "server/test_hooks.h"
#include "snapshot/working_set.h"

namespace faultline::testing {
namespace {

// Whether the server closed `fd` (EOF) within `limit` (a bound, not an
// ordering: a refused connection is closed at once, an accepted one never).
bool closed_by_server(int fd, std::chrono::milliseconds limit) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(limit.count())) <= 0) return false;
  char c;
  return ::recv(fd, &c, 1, MSG_DONTWAIT) == 0;
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// Waits (bounded) until the server's log holds `needle`.
bool log_shows(const ServerHarness& h, const std::string& needle) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    if (h.log().find(needle) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a log file, not ordering a race
  }
  return false;
}

// Runs `body` in a forked child with the given credentials; returns its exit
// code (or 128 + signal).
int as_user(uid_t uid, gid_t gid, std::vector<gid_t> groups, const std::function<int()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) ::_exit(90);
    ::_exit(body());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The harness's directory is 0700 (mkdtemp); tests that connect as another
// user need to reach the socket inside it.
void open_directory_to_everyone(const TempDir& dir) { ASSERT_EQ(::chmod(dir.path().c_str(), 0755), 0); }

// --- who may connect -------------------------------------------------------

TEST(SocketAccess, BothSocketsGetTheirModeAndOwnerBeforeTheFirstAccept) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) {
    c.socket_access = {.mode = 0660, .owner = 4321, .group = 8765};
    c.control_path = dir.file("ctl");
    c.control_access = {.mode = 0600, .owner = std::nullopt, .group = 8765};
  };
  ServerHarness h(o);
  open_directory_to_everyone(h.dir());
  struct stat vm {}, ctl {};
  ASSERT_EQ(::stat(h.socket().c_str(), &vm), 0);
  ASSERT_EQ(::stat(h.dir().file("ctl").c_str(), &ctl), 0);
  EXPECT_EQ(vm.st_mode & 07777, 0660u);
  EXPECT_EQ(vm.st_uid, 4321u);
  EXPECT_EQ(vm.st_gid, 8765u);
  EXPECT_EQ(ctl.st_mode & 07777, 0600u);
  EXPECT_EQ(ctl.st_uid, 0u);
  EXPECT_EQ(ctl.st_gid, 8765u);
  // The mode is what the kernel enforces: a user outside owner and group
  // cannot connect; one in the group can.
  const std::string sock = h.socket();
  const auto try_connect = [&sock] { return try_connect_unix(sock) ? 0 : (errno == EACCES ? 13 : 1); };
  EXPECT_EQ(as_user(65534, 65534, {}, try_connect), 13) << "other users get EACCES";
  EXPECT_EQ(as_user(65534, 8765, {}, try_connect), 0) << "the socket's group may connect";
}

TEST(SocketAccess, DefaultModeIsOwnerOnly) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) { c.control_path = dir.file("ctl"); };
  ServerHarness h(o);
  struct stat vm {}, ctl {};
  ASSERT_EQ(::stat(h.socket().c_str(), &vm), 0);
  ASSERT_EQ(::stat(h.dir().file("ctl").c_str(), &ctl), 0);
  EXPECT_EQ(vm.st_mode & 07777, 0600u);
  EXPECT_EQ(ctl.st_mode & 07777, 0600u);
}

TEST(SocketAccess, SocketPathAppearsOnlyOnceConnectingToItWorks) {
  // Clients (and orchestrators) wait for the socket file to appear and then
  // connect: the file must not exist before the daemon listens, with its
  // mode set. An observer connects the moment it sees the path.
  for (int round = 0; round < 20; ++round) {
    TempDir dir;
    const std::string sock = dir.file("vm.sock");
    std::atomic<int> observed{-1};
    std::thread observer([&] {
      struct stat st {};
      while (::lstat(sock.c_str(), &st) != 0) std::this_thread::yield();
      observed = try_connect_unix(sock) ? 0 : errno;
    });
    auto listener = protocol::UnixListener::bind(sock, {.mode = 0600});
    ASSERT_TRUE(listener) << listener.error().describe();
    observer.join();
    EXPECT_EQ(observed.load(), 0) << "connect right after the path appeared failed: " << std::strerror(observed.load());
    struct stat st {};
    ASSERT_EQ(::stat(sock.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u);
    size_t entries = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir.path())) entries += e.exists() ? 1 : 0;
    EXPECT_EQ(entries, 1u) << "no temporary socket name is left behind";
  }
}

TEST(AllowList, PeerOutsideTheListIsRefusedWithOneLogLineAndAClosedConnection) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) {
    c.socket_access.mode = 0666;
    c.allow = {.uids = {0}, .gids = {777}};
  };
  ServerHarness h(o);
  open_directory_to_everyone(h.dir());
  const std::string sock = h.socket();
  // uid 65534 with no allowed group: refused, the connection closed at once.
  const int refused = as_user(65534, 65534, {}, [&sock] {
    UniqueFd fd = try_connect_unix(sock);
    if (!fd) return 1;
    return closed_by_server(fd.get(), std::chrono::seconds(20)) ? 0 : 2;
  });
  EXPECT_EQ(refused, 0);
  ASSERT_TRUE(h.wait_ended(1));
  const std::string log = h.log();
  EXPECT_EQ(count(log, "event=connection_refused"), 1u) << log;
  EXPECT_NE(log.find("reason=peer_not_allowed"), std::string::npos) << log;
  EXPECT_NE(log.find("uid=65534"), std::string::npos) << log;
  EXPECT_NE(h.server().metrics().render().find("faultline_handshakes_refused_total{cause=\"peer_not_allowed\"} 1"),
            std::string::npos);

  // A supplementary group in the list admits the peer: its (bad) handshake is
  // read and rejected as a handshake, not refused at the door.
  const int admitted = as_user(65534, 65534, {777}, [&sock] {
    UniqueFd fd = try_connect_unix(sock);
    if (!fd) return 1;
    return ::send(fd.get(), "{}", 2, MSG_NOSIGNAL) == 2 && closed_by_server(fd.get(), std::chrono::seconds(20)) ? 0
                                                                                                                 : 2;
  });
  EXPECT_EQ(admitted, 0);
  ASSERT_TRUE(h.wait_ended(2));
  EXPECT_EQ(count(h.log(), "event=connection_refused"), 1u);
  EXPECT_EQ(count(h.log(), "event=handshake_failed"), 1u);
  // And root (uid 0, listed) is served.
  expect_served(h);
}

TEST(AllowList, ControlSocketHasItsOwnAllowList) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) {
    c.control_path = dir.file("ctl");
    c.control_access.mode = 0666;
    c.control_allow = {.uids = {0}, .gids = {}};
  };
  ServerHarness h(o);
  open_directory_to_everyone(h.dir());
  const std::string ctl = h.dir().file("ctl");
  const int refused = as_user(65534, 65534, {}, [&ctl] {
    UniqueFd fd = try_connect_unix(ctl);
    if (!fd) return 1;
    // The daemon may close before the request is even sent (EPIPE): either
    // way no reply byte ever comes.
    (void)::send(fd.get(), "{\"cmd\":\"sessions\"}\n", 19, MSG_NOSIGNAL);
    char c;
    timeval tv{20, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const ssize_t n = ::recv(fd.get(), &c, 1, 0);
    return n == 0 || (n < 0 && errno == ECONNRESET) ? 0 : 2;
  });
  EXPECT_EQ(refused, 0) << "a refused control client gets no reply";
  ASSERT_TRUE(log_shows(h, "socket=control reason=peer_not_allowed"));
  EXPECT_NE(h.server().metrics().render().find("faultline_handshakes_refused_total{cause=\"peer_not_allowed\"} 0"),
            std::string::npos)
      << "control connections are not handshakes";
  EXPECT_EQ(control(ctl, R"({"cmd":"sessions"})"), R"({"sessions":[]})");
}

// --- pidfds ----------------------------------------------------------------

TEST(PeerPidfd, AKillNeverReachesAProcessThatReusedThePid) {
  // The scenario runs in a fresh pid namespace (it forces the pid reuse with
  // ns_last_pid there): see tests/pid_reuse_scenario.cc.
  // The reuse is forced, not guaranteed: a thread the process starts in
  // between (a sanitizer runtime's, for one) takes the pid first, once seen
  // under ThreadSanitizer. Then the scenario did not happen: run it again.
  std::string text;
  for (int attempt = 0; attempt < 5 && text.find("pid_reused=true") == std::string::npos; ++attempt) {
    TempDir dir;
    const std::string out = dir.file("out");
    const pid_t p = spawn({"/usr/bin/unshare", "--pid", "--fork", "--mount-proc", built_binary("pid_reuse_scenario"),
                           dir.path()},
                          out);
    const int status = wait_child(p, std::chrono::seconds(120));
    text = read_file(out);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;
  }
  EXPECT_NE(text.find("pid_reused=true"), std::string::npos) << text;
  EXPECT_NE(text.find("uffd_received=true peer_killed=false"), std::string::npos) << text;
  EXPECT_NE(text.find("reuser_alive=true"), std::string::npos) << text;
}

// A daemon in a pid namespace of its own sees its clients with pid 0.
class ForeignPidNamespace : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = dir_.file("mem");
    sock_ = dir_.file("vm.sock");
    log_ = dir_.file("log");
    ASSERT_TRUE(client::write_test_memory_file(mem_, 16 * kMiB, 11, 0.1));
    daemon_ = spawn({"/usr/bin/unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM",
                     built_binary("faultline"), "serve", "--socket", sock_, "--memory", mem_, "--log-level", "debug"},
                    log_);
    ASSERT_GT(daemon_, 0);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    struct stat st {};
    while (::stat(sock_.c_str(), &st) != 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling for the daemon to bind
    }
    ASSERT_TRUE(S_ISSOCK(st.st_mode)) << read_file(log_);
  }
  void TearDown() override {
    if (daemon_ <= 0) return;
    // unshare --fork ignores SIGTERM while it waits for its child (a SIGTERM
    // to it waited out wait_child's 20 s and ended in SIGKILL), so the
    // daemon, unshare's one child, is stopped itself; unshare then exits with
    // the daemon's status.
    const pid_t served = only_child(daemon_);
    EXPECT_GT(served, 0) << "no child of unshare " << daemon_;
    if (served > 0) ::kill(served, SIGTERM);
    const int status = wait_child(daemon_, std::chrono::seconds(20));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status << "\n" << read_file(log_);
  }
  static pid_t only_child(pid_t parent) {
    std::ifstream f("/proc/" + std::to_string(parent) + "/task/" + std::to_string(parent) + "/children");
    pid_t child = -1;
    f >> child;
    return f ? child : -1;
  }
  bool log_shows(const std::string& needle) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (read_file(log_).find(needle) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a log file
    }
    return false;
  }
  TempDir dir_;
  std::string mem_, sock_, log_;
  pid_t daemon_ = -1;
};

TEST_F(ForeignPidNamespace, PeerWithPidZeroIsServedAndItsExitEndsTheSession) {
  {
    // Firecracker >= 1.12 keeps its socket open: its EOF ends the session.
    client::RestoreOptions o;
    o.socket_path = sock_;
    o.memory_path = mem_;
    o.touch_fraction = 0.2;
    o.threads = 2;
    auto r = client::run_restore(o);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u);
    EXPECT_GT(r->pages_verified, 0u);
  }
  ASSERT_TRUE(log_shows("event=session_end session=1 pid=0")) << read_file(log_);
  const std::string log = read_file(log_);
  EXPECT_NE(log.find("event=session_start session=1 pid=0"), std::string::npos) << log;
  EXPECT_NE(log.find("event=peer_pid_unknown session=1 pidfd=so_peerpidfd"), std::string::npos) << log;

  // Firecracker before 1.12 closes its socket right after the handshake: the
  // pidfd (SO_PEERPIDFD works across pid namespaces) tells the daemon when
  // the process exits.
  const std::string out = dir_.file("client.out");
  const pid_t c = spawn({built_binary("faultline-client"), "restore", "--socket", sock_, "--memory", mem_,
                         "--fc-version", "1.10", "--threads", "1", "--touch-fraction", "0.1"},
                        out);
  const int status = wait_child(c, std::chrono::seconds(60));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
  ASSERT_TRUE(log_shows("event=session_end session=2 pid=0 state=peer_exited")) << read_file(log_);
}

// --- record through the control socket --------------------------------------

class RecordDir : public ::testing::Test {
 protected:
  void SetUp() override {
    record_dir_ = outside_.file("records");
    std::filesystem::create_directory(record_dir_);
    ServerHarness::Options o;
    o.memory_bytes = 8 * kMiB;
    o.configure = [this](ServerConfig& c, const TempDir& dir) {
      c.control_path = dir.file("ctl");
      c.record_dir = record_dir_;
    };
    h_ = std::make_unique<ServerHarness>(o);
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
    ASSERT_TRUE(c) << c.error().describe();
    client_ = std::make_unique<client::FirecrackerClient>(std::move(*c));
    ASSERT_TRUE(client_->connect_and_send(h_->socket()));
    auto v = client::Verifier::open(h_->memory(), client_->guest_size(), client_->page_size());
    ASSERT_TRUE(v);
    ASSERT_TRUE(client::touch_pages(*client_, **v, std::vector<uint64_t>{3 * 4096, 0, 7 * 4096}, client::Access::kRead));
  }
  void TearDown() override {
    client_->close_socket();
    if (h_) h_->wait_ended(1);
  }
  std::string record(const std::string& name) {
    nlohmann::json req{{"cmd", "record"}, {"session", 1}, {"name", name}};
    return control(h_->dir().file("ctl"), req.dump());
  }
  TempDir outside_;
  std::string record_dir_;
  std::unique_ptr<ServerHarness> h_;
  std::unique_ptr<client::FirecrackerClient> client_;
};

TEST_F(RecordDir, RecordWritesTheWorkingSetInsideTheRecordDirectory) {
  const std::string reply = record("ws");
  auto j = nlohmann::json::parse(reply);
  EXPECT_EQ(j["path"], record_dir_ + "/ws") << reply;
  EXPECT_EQ(j["pages"], 3) << reply;
  auto set = read_working_set(record_dir_ + "/ws", 8 * kMiB);
  ASSERT_TRUE(set) << set.error().describe();
  EXPECT_EQ(set->offsets, (std::vector<uint64_t>{3 * 4096, 0, 7 * 4096}));
  struct stat st {};
  ASSERT_EQ(::stat((record_dir_ + "/ws").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  // No temporary file is left behind.
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(record_dir_)) files += e.exists() ? 1 : 0;
  EXPECT_EQ(files, 1u);
}

TEST_F(RecordDir, TheRecordCommandWritesByName) {
  const std::string out = outside_.file("cli.out");
  const int status = wait_child(spawn({built_binary("faultline"), "record", "--control", h_->dir().file("ctl"),
                                       "--session", "1", "--name", "viacli"},
                                      out),
                                std::chrono::seconds(20));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
  EXPECT_NE(read_file(out).find(record_dir_ + "/viacli"), std::string::npos) << read_file(out);
  EXPECT_TRUE(read_working_set(record_dir_ + "/viacli", 8 * kMiB));
  const int bad = wait_child(spawn({built_binary("faultline"), "record", "--control", h_->dir().file("ctl"),
                                    "--session", "1", "--name", "../up"},
                                   out),
                             std::chrono::seconds(20));
  EXPECT_TRUE(WIFEXITED(bad) && WEXITSTATUS(bad) != 0) << read_file(out);
  EXPECT_NE(read_file(out).find("may not contain '/'"), std::string::npos) << read_file(out);
}

TEST_F(RecordDir, NamesThatLeaveTheDirectoryAreRefused) {
  for (const std::string name : {"../escaped", "a/b", "/tmp/abs", ".hidden", "..", ".", ""}) {
    const std::string reply = record(name);
    EXPECT_NE(reply.find("\"error\""), std::string::npos) << name << ": " << reply;
    EXPECT_NE(reply.find("is refused"), std::string::npos) << name << ": " << reply;
  }
  EXPECT_FALSE(std::filesystem::exists(outside_.file("escaped")));
  EXPECT_FALSE(std::filesystem::exists("/tmp/abs"));
  EXPECT_TRUE(std::filesystem::is_empty(record_dir_));
}

TEST_F(RecordDir, APlantedSymlinkIsReplacedNeverWrittenThrough) {
  const std::string target = outside_.file("precious");
  { std::ofstream(target) << "keep me"; }
  std::filesystem::create_symlink(target, record_dir_ + "/ws");
  const std::string reply = record("ws");
  EXPECT_EQ(reply.find("\"error\""), std::string::npos) << reply;
  EXPECT_EQ(read_file(target), "keep me");
  EXPECT_FALSE(std::filesystem::is_symlink(record_dir_ + "/ws"));
  EXPECT_TRUE(read_working_set(record_dir_ + "/ws", 8 * kMiB));
}

TEST(RecordDirMissing, ControlRecordIsRefusedWithoutARecordDirectory) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) { c.control_path = dir.file("ctl"); };
  ServerHarness h(o);
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  ASSERT_TRUE(log_shows(h, "event=session_start session=1"));
  const std::string reply = control(h.dir().file("ctl"), R"({"cmd":"record","session":1,"name":"ws"})");
  EXPECT_NE(reply.find("--record-dir"), std::string::npos) << reply;
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
}

// A session serves faults and logs session_start from inside Session::start,
// before the connection thread lists it. A control client that saw either
// (its VM's first fault answered, the log line) must find the session: the
// daemon is parked between start and listing until the lookup is waiting,
// then each command answers about session 1.
TEST(ControlLookup, ASessionServingFaultsIsFoundBeforeTheDaemonListsIt) {
  for (const std::string cmd : {"record", "sessions", "page_map"}) {
    SCOPED_TRACE(cmd);
    TempDir records;
    ServerHarness::Options o;
    o.memory_bytes = 4 * kMiB;
    o.configure = [&](ServerConfig& c, const TempDir& dir) {
      c.control_path = dir.file("ctl");
      c.record_dir = records.path();
    };
    ServerHarness h(o);
    Gate at_publish, lookup_waits;
    test_hooks::set(HookPoint::kServerBeforePublish, [&](HookContext&) {
      at_publish.open();
      // Bounded: without the wait in the lookup this never opens, the
      // command fails at once and the test with it.
      (void)lookup_waits.wait_for(std::chrono::seconds(20));
    });
    test_hooks::set(HookPoint::kLookupWaitsForStart, [&](HookContext&) { lookup_waits.open(); });
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    ASSERT_TRUE(at_publish.wait_for(std::chrono::seconds(20)));
    // Served while the daemon does not list the session yet.
    auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
    ASSERT_TRUE(v);
    ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{5 * 4096}, client::Access::kRead));
    ASSERT_TRUE(log_shows(h, "event=session_start session=1"));
    const std::string request = cmd == "sessions" ? R"({"cmd":"sessions"})"
                                : cmd == "record" ? R"({"cmd":"record","session":1,"name":"ws"})"
                                                  : R"({"cmd":"page_map","session":1})";
    const std::string reply = control(h.dir().file("ctl"), request);
    EXPECT_TRUE(lookup_waits.is_open()) << "the lookup did not wait for the session mid-start";
    test_hooks::clear(HookPoint::kServerBeforePublish);
    test_hooks::clear(HookPoint::kLookupWaitsForStart);
    EXPECT_EQ(reply.find("\"error\""), std::string::npos) << reply;
    auto j = nlohmann::json::parse(reply);
    if (cmd == "sessions") {
      ASSERT_EQ(j["sessions"].size(), 1u) << reply;
      EXPECT_EQ(j["sessions"][0]["session"], 1) << reply;
    } else if (cmd == "record") {
      EXPECT_EQ(j["pages"], 1) << reply;
      auto set = read_working_set(records.file("ws"), 4 * kMiB);
      ASSERT_TRUE(set) << set.error().describe();
      EXPECT_EQ(set->offsets, std::vector<uint64_t>{5 * 4096});
    } else {
      EXPECT_EQ(j["session"], 1) << reply;
      EXPECT_EQ(j["pid"], ::getpid()) << reply;
    }
    c->close_socket();
    ASSERT_TRUE(h.wait_ended(1));
  }
}

// A session whose start fails after its lookup began to wait (the connection
// thread throws between start and listing) wakes the lookup at once: the
// wait is set to 10 minutes, so a lookup left to its bound would outlast the
// control client's 20 s and the reply would be empty.
TEST(ControlLookup, ALookupWaitingForASessionThatFailsToStartIsAnsweredAtOnce) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) {
    c.control_path = dir.file("ctl");
    c.session_start_wait = std::chrono::minutes(10);
  };
  ServerHarness h(o);
  Gate in_start, lookup_waits;
  // Session::start's first step: the connection is marked starting by now.
  test_hooks::set(HookPoint::kSessionSetup, [&](HookContext&) { in_start.open(); });
  test_hooks::set(HookPoint::kServerBeforePublish, [&](HookContext&) {
    (void)lookup_waits.wait_for(std::chrono::seconds(20));
    throw std::runtime_error("injected: the connection thread fails before listing its session");
  });
  test_hooks::set(HookPoint::kLookupWaitsForStart, [&](HookContext&) { lookup_waits.open(); });
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));  // the guest is never touched: nobody will serve it
  // A request sent before the handshake was read would find no session at
  // all and answer at once without waiting: send it once the start runs.
  ASSERT_TRUE(in_start.wait_for(std::chrono::seconds(20)));
  const std::string reply = control(h.dir().file("ctl"), R"({"cmd":"page_map","session":1})");
  test_hooks::clear(HookPoint::kSessionSetup);
  test_hooks::clear(HookPoint::kServerBeforePublish);
  test_hooks::clear(HookPoint::kLookupWaitsForStart);
  EXPECT_TRUE(lookup_waits.is_open()) << "the lookup did not wait for the session mid-start";
  EXPECT_NE(reply.find("no running session 1"), std::string::npos) << reply;
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.log().find("injected: the connection thread fails"), std::string::npos) << h.log();
  c->close_socket();
}

// --- limits ----------------------------------------------------------------

TEST(Limits, HandshakesOverTheLimitAreRefusedWithALogLine) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.handshake_timeout = std::chrono::milliseconds(30000);
  o.configure = [](ServerConfig& c, const TempDir&) { c.max_handshakes = 2; };
  ServerHarness h(o);
  // Two clients that connect and send nothing hold both handshake slots.
  UniqueFd a = try_connect_unix(h.socket()), b = try_connect_unix(h.socket());
  ASSERT_TRUE(a && b);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (h.server().handshakes_in_progress() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  ASSERT_EQ(h.server().handshakes_in_progress(), 2u);
  UniqueFd third = try_connect_unix(h.socket());
  ASSERT_TRUE(third);
  EXPECT_TRUE(closed_by_server(third.get(), std::chrono::seconds(20)));
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.log().find("reason=too_many_handshakes"), std::string::npos) << h.log();
  EXPECT_NE(h.server().metrics().render().find("faultline_handshakes_refused_total{cause=\"too_many_handshakes\"} 1"),
            std::string::npos)
      << h.server().metrics().render();
  EXPECT_EQ(h.server().handshakes_in_progress(), 2u) << "the held handshakes are untouched";
  a.reset();
  b.reset();
  ASSERT_TRUE(h.wait_ended(3));
  expect_served(h);
}

TEST(Limits, SessionsOverTheLimitAreRefusedAndTheSlotFreesWhenAVmEnds) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) { c.max_sessions = 1; };
  ServerHarness h(o);
  auto first = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
  ASSERT_TRUE(first);
  ASSERT_TRUE(first->connect_and_send(h.socket()));
  ASSERT_TRUE(log_shows(h, "event=session_start session=1"));
  UniqueFd second = try_connect_unix(h.socket());
  ASSERT_TRUE(second);
  EXPECT_TRUE(closed_by_server(second.get(), std::chrono::seconds(20)));
  ASSERT_TRUE(log_shows(h, "reason=too_many_sessions"));
  EXPECT_NE(h.server().metrics().render().find("faultline_handshakes_refused_total{cause=\"too_many_sessions\"} 1"),
            std::string::npos);
  first->close_socket();
  ASSERT_TRUE(h.wait_ended(2));
  expect_served(h);
}

#ifdef FAULTLINE_TEST_HOOKS  // the hook that orders the client's send before the refusal
TEST(Limits, ARefusedClientThatAlreadySentItsUffdIsKilled) {
  // A refusal drains what the client already sent; a uffd among it means a
  // VM that would hang on its first fault: under --on-fatal=kill its process
  // is killed. Whether Firecracker's message arrives before the accept
  // thread looks is a race; the hook parks the accept thread until it has.
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.on_fatal = OnFatal::kKill;
  o.configure = [](ServerConfig& c, const TempDir&) { c.max_sessions = 1; };
  ServerHarness h(o);
  auto first = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
  ASSERT_TRUE(first);
  ASSERT_TRUE(first->connect_and_send(h.socket()));
  ASSERT_TRUE(log_shows(h, "event=session_start session=1"));
  test_hooks::set(HookPoint::kServerBeforeRefuse, [](HookContext& ctx) {
    const int fd = static_cast<int>(ctx.address);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    int queued = 0;
    while (::ioctl(fd, FIONREAD, &queued) == 0 && queued == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
  });
  const std::string out = h.dir().file("client.out");
  const pid_t c = spawn({built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", h.memory(),
                         "--threads", "1", "--touch-fraction", "0.1"},
                        out);
  const int status = wait_child(c, std::chrono::seconds(60));
  test_hooks::clear(HookPoint::kServerBeforeRefuse);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << read_file(out);
  ASSERT_TRUE(log_shows(h, "reason=too_many_sessions"));
  EXPECT_NE(h.log().find("uffd_received=true peer_killed=true"), std::string::npos) << h.log();
  first->close_socket();
  ASSERT_TRUE(h.wait_ended(2));
}

#endif

TEST(Limits, DrainingARefusedConnectionFindsAUffdAlreadySent) {
  int sp[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
  UniqueFd server_end(sp[0]), client_end(sp[1]);
  auto uffd = client::open_userfaultfd();
  ASSERT_TRUE(uffd);
  const int fds[1] = {uffd->get()};
  ASSERT_TRUE(client::send_handshake(client_end.get(), "[", fds));
  EXPECT_TRUE(protocol::drain_pending_uffd(server_end.get()));
  ASSERT_TRUE(client::send_handshake(client_end.get(), "[", {}));
  EXPECT_FALSE(protocol::drain_pending_uffd(server_end.get())) << "bytes without a uffd";
  EXPECT_FALSE(protocol::drain_pending_uffd(server_end.get())) << "nothing at all";
}

TEST(Limits, EndedSessionAndRefusalHistoryIsBounded) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) { c.ended_history = 3; };
  ServerHarness h(o);
  for (int i = 0; i < 5; ++i) {
    UniqueFd fd = try_connect_unix(h.socket());
    ASSERT_TRUE(fd);
    ASSERT_EQ(::send(fd.get(), "x", 1, MSG_NOSIGNAL), 1);
    ASSERT_TRUE(closed_by_server(fd.get(), std::chrono::seconds(20)));
  }
  ASSERT_TRUE(h.wait_ended(5));
  EXPECT_EQ(h.server().rejected_total(), 5u);
  EXPECT_EQ(h.server().rejected_connections().size(), 3u);
  for (int i = 0; i < 4; ++i) expect_served(h);
  EXPECT_EQ(h.server().finished_total(), 4u);
  EXPECT_EQ(h.server().finished_sessions().size(), 3u);
  EXPECT_EQ(h.server().finished_sessions().back().id, 9u) << "the most recent are kept";
}

// --- the control socket ------------------------------------------------------

class ControlDeadline : public ::testing::Test {
 protected:
  // The deadline is per test: long enough for an honest request to be
  // answered in full under ThreadSanitizer on a loaded machine (a 600 KB
  // page map), short enough that waiting it out keeps the test quick.
  void start(std::chrono::milliseconds control_timeout) {
    ServerHarness::Options o;
    o.memory_bytes = 256 * kMiB;
    o.zero_fraction = 0;
    o.configure = [control_timeout](ServerConfig& c, const TempDir& dir) {
      c.control_path = dir.file("ctl");
      c.control_timeout = control_timeout;
    };
    h_ = std::make_unique<ServerHarness>(o);
    ctl_ = h_->dir().file("ctl");
  }
  std::unique_ptr<ServerHarness> h_;
  std::string ctl_;
};

TEST_F(ControlDeadline, TricklingClientCannotWedgeTheDaemon) {
  start(std::chrono::milliseconds(300));
  UniqueFd slow = try_connect_unix(ctl_);
  ASSERT_TRUE(slow);
  ASSERT_EQ(::send(slow.get(), "{\"cmd\"", 6, MSG_NOSIGNAL), 6);  // and never the rest
  // VMs are accepted and served meanwhile: the control socket has its own thread.
  expect_served(*h_);
  // Another control client is answered (by another control thread).
  EXPECT_EQ(control(ctl_, R"({"cmd":"sessions"})"), R"({"sessions":[]})");
  EXPECT_TRUE(closed_by_server(slow.get(), std::chrono::seconds(20)));
  EXPECT_NE(h_->log().find("event=control_timeout phase=request bytes=6"), std::string::npos) << h_->log();
}

TEST_F(ControlDeadline, ClientThatNeverReadsItsReplyIsDroppedAtTheDeadline) {
  // CI under TSan cut the second, honest reply at a 300 ms deadline.
  start(std::chrono::milliseconds(3000));
  // A page map with many ranges: every other page of 256 MiB present.
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {256 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h_->socket()));
  auto v = client::Verifier::open(h_->memory(), c->guest_size(), c->page_size());
  std::vector<uint64_t> every_other;
  for (uint64_t p = 0; p < c->page_count(); p += 2) every_other.push_back(p * 4096);
  ASSERT_TRUE(client::touch_pages(*c, **v, every_other, client::Access::kRead));
  // This client asks and never reads: the ~600 KB reply cannot fit in the
  // daemon's socket send buffer (a Unix stream socket's writer is limited by
  // its own SO_SNDBUF, 208 KiB by default).
  UniqueFd stuck = try_connect_unix(ctl_);
  const std::string req = "{\"cmd\":\"page_map\",\"session\":1}\n";
  ASSERT_EQ(::send(stuck.get(), req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  ASSERT_TRUE(log_shows(*h_, "event=control_timeout phase=reply"));
  // The control thread is free again, and the page map itself was right.
  const std::string reply = control(ctl_, "{\"cmd\":\"page_map\",\"session\":1}");
  auto map = nlohmann::json::parse(reply);
  EXPECT_EQ(map["dirty"].size(), every_other.size()) << "one range per present page";
  c->close_socket();
  ASSERT_TRUE(h_->wait_ended(1));
}

TEST(ControlReply, AReplyOverTheLimitIsAnErrorNotAnUnboundedWrite) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) {
    c.control_path = dir.file("ctl");
    c.max_control_reply_bytes = 40;
  };
  ServerHarness h(o);
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {4 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  ASSERT_TRUE(log_shows(h, "event=session_start session=1"));
  const std::string reply = control(h.dir().file("ctl"), R"({"cmd":"sessions"})");
  EXPECT_NE(reply.find("over the limit of 40"), std::string::npos) << reply;
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
}

TEST(ControlHostileInput, AnyBytesGetAnErrorReplyAndTheDaemonKeepsServing) {
  ServerHarness::Options o;
  o.memory_bytes = 4 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir& dir) { c.control_path = dir.file("ctl"); };
  ServerHarness h(o);
  const std::string ctl = h.dir().file("ctl");
  const std::vector<std::string> hostile = {
      "{\"cmd\":\"\xff\xfe\"}",                          // invalid UTF-8 in the command, quoted back
      "{\"cmd\":\"record\",\"session\":1,\"name\":\"\xc3\x28\"}",  // ... in a name
      std::string(60000, '[') + std::string(60000, ']'),  // deep nesting
      std::string("{\"cmd\":\"sessions\"\0}", 19),       // a NUL byte
      "{\"cmd\":\"page_map\",\"session\":-1}",
      "{\"cmd\":\"page_map\",\"session\":1,\"fallback\":\"yes\"}",
      std::string(70000, 'x'),                            // longer than a request may be
  };
  for (const std::string& line : hostile) {
    const std::string reply = control(ctl, line);
    ASSERT_FALSE(reply.empty()) << "no reply to " << line.substr(0, 40);
    auto j = nlohmann::json::parse(reply, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << reply;
    EXPECT_TRUE(j.contains("error")) << reply;
  }
  expect_served(h);
}

// --- running out of fds ------------------------------------------------------

TEST(Resources, UnderEmfileTheDaemonRefusesNewWorkRecoversAndStopsCleanly) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), log = dir.file("log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.1));
  // 24 fds: the daemon's own (stdio, memory file, socket, eventfd, reserve,
  // zero index...) leave room for a dozen connections.
  const pid_t daemon = spawn({"/usr/bin/prlimit", "--nofile=24:24", built_binary("faultline"), "serve", "--socket",
                              sock, "--memory", mem, "--max-handshakes", "1000", "--handshake-timeout-ms", "60000"},
                             log);
  ASSERT_GT(daemon, 0);
  struct stat st {};
  for (int i = 0; i < 2000 && ::stat(sock.c_str(), &st) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling for the daemon to bind
  }
  ASSERT_TRUE(S_ISSOCK(st.st_mode)) << read_file(log);
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 40; ++i) {
    UniqueFd fd = try_connect_unix(sock);
    ASSERT_TRUE(fd) << "connect " << i << ": " << std::strerror(errno);
    idle.push_back(std::move(fd));
  }
  // Some of them are refused for want of fds: closed, with a log line each.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (read_file(log).find("reason=out_of_resources") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a log file
  }
  const std::string during = read_file(log);
  // Out of fds either at accept() (shed through the reserved fd) or right
  // after it (no fd for the peer's pidfd): refused either way.
  const size_t at = during.find("event=connection_refused socket=vm reason=out_of_resources error=");
  ASSERT_NE(at, std::string::npos) << during;
  EXPECT_NE(during.find("Too many open files", at), std::string::npos) << during;
  // Once the idle clients go, the daemon serves again: after it has read
  // each one's close and given back that handshake's fds. Every connection
  // ends in one line, handshake_failed (closed mid-handshake) or
  // connection_refused; a client that connected before the last of them
  // could meet EMFILE itself (TSan CI, 6 Dec 2026: session_rejected, "creating
  // its finished eventfd failed").
  const size_t connections = idle.size();
  idle.clear();
  const auto ended = [&] {
    const std::string text = read_file(log);
    return count(text, "event=handshake_failed ") + count(text, "event=connection_refused socket=vm ");
  };
  const auto closes_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (ended() < connections && std::chrono::steady_clock::now() < closes_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a log file
  }
  ASSERT_EQ(ended(), connections) << read_file(log);
  const std::string out = dir.file("client.out");
  const int status = wait_child(spawn({built_binary("faultline-client"), "restore", "--socket", sock, "--memory", mem,
                                       "--threads", "1", "--touch-fraction", "0.2"},
                                      out),
                                std::chrono::seconds(60));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out) << read_file(log);
  ::kill(daemon, SIGTERM);
  const int dstatus = wait_child(daemon, std::chrono::seconds(20));
  EXPECT_TRUE(WIFEXITED(dstatus) && WEXITSTATUS(dstatus) == 0) << read_file(log);
  EXPECT_FALSE(std::filesystem::exists(sock)) << "the daemon removed its socket";
  EXPECT_NE(read_file(log).find("event=server_stop"), std::string::npos);
}

// The daemon of the EMFILE tests, which run it in a forked child.
ServerConfig emfile_test_config(const std::string& socket, const std::string& memory) {
  ServerConfig c;
  c.socket_path = socket;
  c.memory_path = memory;
  c.zero_index = false;
  c.on_fatal = OnFatal::kLeave;
  return c;
}

// In a forked child (RLIMIT_NOFILE and the fd table are per process): limits
// the table to 64 fds and fills it to the last slot but one, room for one
// client socket and none for the daemon's accept. Exits with 11 when the
// limit cannot be set. Returns the fds that fill it.
std::vector<int> fill_fd_table_but_one() {
  rlimit lim{64, 64};
  if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(11);
  std::vector<int> fillers;
  for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) fillers.push_back(fd);
  ::close(fillers.back());
  fillers.pop_back();
  return fillers;
}

// The daemon of a forked EMFILE test child, logging to `log` (exit 10 when
// it cannot be created). finish() stops it and joins its run(); the child
// calls it before it clears its hooks and exits, so that no hook runs on
// the child's state after that.
class ChildDaemon {
 public:
  ChildDaemon(const std::string& log, const ServerConfig& config)
      : logger_(LogFormat::kText, LogLevel::kDebug,
                ::open(log.c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644)) {
    auto server = Server::create(config, logger_);
    if (!server) ::_exit(10);
    server_ = std::move(*server);
    serving_ = std::thread([this] { (void)server_->run(); });
  }
  int finish(int code) {
    server_->stop();
    serving_.join();
    return code;
  }

 private:
  Logger logger_;
  std::unique_ptr<Server> server_;
  std::thread serving_;
};

TEST(Resources, AcceptUnderEmfileShedsTheConnectionThroughTheReservedFd) {
  // In a child process (RLIMIT_NOFILE and a full fd table are per process):
  // the fd table is filled to the last slot, one slot is freed for a client
  // socket, and the client connects: the daemon's accept() fails with EMFILE.
  // The connection must be accepted on the reserved fd and refused (not left
  // queued, which would keep the listener readable and the loop spinning),
  // and once fds are free the daemon accepts again.
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), log = dir.file("log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.1));
  const pid_t child = ::fork();
  if (child == 0) {
    ChildDaemon server(log, emfile_test_config(sock, mem));
    const std::vector<int> fillers = fill_fd_table_but_one();
    UniqueFd shed = try_connect_unix(sock);
    if (!shed) ::_exit(12);
    const bool refused = closed_by_server(shed.get(), std::chrono::seconds(20));
    for (int fd : fillers) ::close(fd);
    shed.reset();
    // Accepting again: a bad handshake is read and rejected as a handshake.
    UniqueFd next = try_connect_unix(sock);
    const bool read_again = next && ::send(next.get(), "x", 1, MSG_NOSIGNAL) == 1 &&
                            closed_by_server(next.get(), std::chrono::seconds(20));
    ::_exit(server.finish(refused ? (read_again ? 0 : 14) : 13));
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  const std::string text = read_file(log);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status << "\n" << text;
#if defined(__SANITIZE_THREAD__)
  // ThreadSanitizer's runtime opens and closes fds of its own in this child
  // (CI once saw a slot free up after the table was filled: accept() got it
  // and the refusal came one step later, at the peer's pidfd). The normal and
  // AddressSanitizer runs check the accept path exactly.
  EXPECT_TRUE(text.find("event=connection_refused socket=vm reason=out_of_resources error=\"Too many open files\"") !=
                  std::string::npos ||
              text.find("event=connection_refused socket=vm reason=out_of_resources error=\"no pidfd for the peer") !=
                  std::string::npos)
      << text;
#else
  EXPECT_NE(text.find("event=connection_refused socket=vm reason=out_of_resources error=\"Too many open files\""),
            std::string::npos)
      << text;
#endif
  EXPECT_NE(text.find("event=handshake_failed"), std::string::npos) << text;
  EXPECT_NE(text.find("event=server_stop"), std::string::npos) << text;
}

#ifdef FAULTLINE_TEST_HOOKS
// Out of fds, another thread of the daemon takes the slot the reserve fd
// freed (the hook opens a file there): the connection cannot be shed and the
// reserve is lost. The daemon says so once, retries every 10 ms without
// another line, and once a slot is free again takes the reserve back and
// sheds the connection.
TEST(Resources, AReserveFdLostToAnotherThreadIsSaidOnceAndTakenBackWhenASlotIsFree) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), log = dir.file("log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.1));
  const pid_t child = ::fork();
  if (child == 0) {
    ChildDaemon server(log, emfile_test_config(sock, mem));
    std::atomic<int> stolen{-1};
    std::atomic<int> sheds{0};
    test_hooks::set(HookPoint::kBeforeShedAccept, [&](HookContext&) {
      if (sheds.fetch_add(1) == 0) stolen.store(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    });
    const std::vector<int> fillers = fill_fd_table_but_one();
    UniqueFd queued = try_connect_unix(sock);
    if (!queued) ::_exit(12);
    // Retried (each try reaches the hook) while the slot stays taken.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (sheds.load() < 5 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    if (sheds.load() < 5 || stolen.load() < 0) ::_exit(13);
    ::close(stolen.load());  // a slot is free again
    const bool refused = closed_by_server(queued.get(), std::chrono::seconds(20));
    for (int fd : fillers) ::close(fd);
    queued.reset();
    UniqueFd next = try_connect_unix(sock);
    const bool read_again =
        next && ::send(next.get(), "x", 1, MSG_NOSIGNAL) == 1 && closed_by_server(next.get(), std::chrono::seconds(20));
    const int code = server.finish(refused ? (read_again ? 0 : 15) : 14);
    test_hooks::clear(HookPoint::kBeforeShedAccept);
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  const std::string text = read_file(log);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status << "\n" << text;
  EXPECT_EQ(
      count(text, "event=accept_failed socket=vm error=\"no fd to shed the connection with: Too many open files\""), 1u)
      << text;
  EXPECT_EQ(count(text, "event=accept_failed"), 1u) << "said more than once for one episode\n" << text;
  EXPECT_EQ(count(text, "event=connection_refused socket=vm reason=out_of_resources"), 1u) << text;
  EXPECT_NE(text.find("pid=" + std::to_string(child) + " "), std::string::npos) << text;
  EXPECT_NE(text.find("event=handshake_failed"), std::string::npos) << text;
}

// The control socket is polled by several threads: under EMFILE each of
// them may see accept() fail for one connection. Exactly one sheds it; the
// others find nothing queued and neither log a refusal nor spin. A gate
// makes two threads woken by the first connection meet before either
// accepts.
TEST(Resources, ControlThreadsUnderEmfileShedEachConnectionOnceAndServeAgain) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), ctl = dir.file("ctl"), log = dir.file("log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.1));
  constexpr int kConnections = 5;
  const pid_t child = ::fork();
  if (child == 0) {
    ServerConfig c = emfile_test_config(sock, mem);
    c.control_path = ctl;
    c.control_threads = 4;
    ChildDaemon server(log, c);
    // The control threads are polling before the fd table fills.
    if (control(ctl, R"({"cmd":"sessions"})") != R"({"sessions":[]})") ::_exit(15);
    // Two threads woken by the first connection wait for each other before
    // they accept (bounded: a single thread would go on after 10 s).
    std::mutex gate_mu;
    std::condition_variable gate_cv;
    int arrived = 0;
    test_hooks::set(HookPoint::kControlBeforeAccept, [&](HookContext&) {
      std::unique_lock lock(gate_mu);
      if (++arrived > 2) return;
      gate_cv.notify_all();
      gate_cv.wait_for(lock, std::chrono::seconds(10), [&] { return arrived >= 2; });
    });
    // ...and the client keeps the first connection (its fd slot) until both
    // have tried, so that the second one meets a full table too.
    int tried = 0;
    test_hooks::set(HookPoint::kControlAfterAccept, [&](HookContext&) {
      std::lock_guard lock(gate_mu);
      ++tried;
      gate_cv.notify_all();
    });
    const std::vector<int> fillers = fill_fd_table_but_one();
    // The client shares the daemon's full fd table: a control thread's
    // accept() that finds nothing queued holds the free slot for a moment
    // (the kernel takes the fd first), and the client's socket() can meet
    // EMFILE then; it tries again.
    auto connect_client = [&] {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      while (!fd && errno == EMFILE && std::chrono::steady_clock::now() < until) {
        std::this_thread::yield();
        fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      }
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, ctl.c_str(), sizeof addr.sun_path - 1);
      if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return UniqueFd();
      return fd;
    };
    for (int i = 0; i < kConnections; ++i) {
      UniqueFd shed = connect_client();
      if (!shed) ::_exit(12);
      if (!closed_by_server(shed.get(), std::chrono::seconds(20))) ::_exit(13);
      if (i == 0) {
        std::unique_lock lock(gate_mu);
        if (!gate_cv.wait_for(lock, std::chrono::seconds(10), [&] { return tried >= 2; })) ::_exit(17);
      }
    }
    for (int fd : fillers) ::close(fd);
    const bool served = control(ctl, R"({"cmd":"sessions"})") == R"({"sessions":[]})";
    const int code = server.finish(served ? 0 : 14);
    test_hooks::clear(HookPoint::kControlBeforeAccept);
    test_hooks::clear(HookPoint::kControlAfterAccept);
    if (arrived < 2) ::_exit(16);  // the gate saw one thread: the case was not made
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  const std::string text = read_file(log);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status << "\n" << text;
  // One refusal per connection, each naming the client (the child itself).
  const std::string refused = "event=connection_refused socket=control reason=out_of_resources";
  EXPECT_EQ(count(text, refused), static_cast<size_t>(kConnections)) << text;
  EXPECT_EQ(count(text, "pid=" + std::to_string(child) + " "), static_cast<size_t>(kConnections)) << text;
  EXPECT_EQ(count(text, " pid=0 "), 0u) << text;
  EXPECT_EQ(count(text, "event=accept_failed"), 0u) << text;
}
#endif

// --- flags -----------------------------------------------------------------

TEST(SecurityFlags, ServeAppliesSocketModeAndRefusesUnboundedValues) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 3, 0.1));
  for (const std::vector<std::string>& bad :
       {std::vector<std::string>{"--handshake-timeout-ms", "600000"}, {"--socket-mode", "0999"},
        {"--socket-group", "no-such-group-anywhere"}, {"--allow-uid", "no-such-user-anywhere"},
        {"--max-sessions", "0"}, {"--record-dir", dir.file("missing")}}) {
    std::vector<std::string> args{built_binary("faultline"), "serve", "--socket", dir.file("s"), "--memory", mem};
    args.insert(args.end(), bad.begin(), bad.end());
    const std::string out = dir.file("out");
    const int status = wait_child(spawn(args, out), std::chrono::seconds(10));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << bad[0] << " " << bad[1] << ": " << read_file(out);
  }
  const std::string sock = dir.file("ok.sock"), log = dir.file("log");
  const pid_t d = spawn({built_binary("faultline"), "serve", "--socket", sock, "--memory", mem, "--socket-mode", "0640",
                         "--socket-group", "0"},
                        log);
  struct stat st {};
  for (int i = 0; i < 2000 && ::stat(sock.c_str(), &st) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling for the daemon to bind
  }
  EXPECT_EQ(st.st_mode & 07777, 0640u) << read_file(log);
  ::kill(d, SIGTERM);
  // Stop signals are read from a signalfd, not handled: one sent right after
  // the bind (under ThreadSanitizer a handler-based daemon ignored it, 3 of 5
  // CI runs on 7 Dec) stops the daemon, which names it in its log.
  EXPECT_NE(wait_child(d, std::chrono::seconds(20)), -1) << read_file(log);
  const std::string logged = read_file(log);
  EXPECT_NE(logged.find("event=stop_signal"), std::string::npos) << logged;
  EXPECT_NE(logged.find("signal=SIGTERM"), std::string::npos) << logged;
  EXPECT_NE(logged.find("sender_pid=" + std::to_string(::getpid())), std::string::npos) << logged;
  EXPECT_NE(logged.find("event=server_stop"), std::string::npos) << logged;
}

}  // namespace
}  // namespace faultline::testing
