// Test harness: an in-process faultline Server on a temporary socket, serving
// a generated memory file, plus helpers to run Firecracker-faithful clients
// against it (in this process, or as a separate faultline-client process when
// the server may SIGKILL the client).
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/huge_page_reservation.h"
#include "client/restore_scenario.h"
#include "client/test_memory_file.h"
#include "common/atomic_file.h"
#include "common/log.h"
#include "common/mapping.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "server/server.h"
#include "tests/capability.h"
#include "tests/temp_dir.h"

namespace faultline::testing {

inline constexpr uint64_t kMiB = 1024 * 1024;

using client::HugePageReservation;

// Polls `pred` (server state the test cannot be told about, such as work a
// server thread does in the background) until it holds; false after 20 s.
inline bool wait_until(const std::function<bool()>& pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling server state, bounded
  }
  return false;
}

// How many distinct frames (blobs) image `name` of the store `store_dir`
// and its parents reference.
inline uint64_t frames_in_chain(const std::string& store_dir, const std::string& name) {
  auto store = image::LocalStore::open(store_dir, false);
  EXPECT_TRUE(store);
  if (!store) return 0;
  auto chain = image::ImageChain::open(**store, name);
  EXPECT_TRUE(chain);
  if (!chain) return 0;
  std::set<image::BlobId> ids;
  for (const auto& l : chain->layers()) {
    for (const auto& f : l.manifest.frames) ids.insert(f.id);
  }
  return ids.size();
}

// A faultline Server running on its own thread. Logs go to a file the test
// can read.
class ServerHarness {
 public:
  struct Options {
    uint64_t memory_bytes = 64 * kMiB;
    uint64_t seed = 7;
    double zero_fraction = 0.1;
    int workers = 2;
    OnFatal on_fatal = OnFatal::kLeave;
    std::chrono::milliseconds handshake_timeout{3000};
    LogFormat log_format = LogFormat::kText;
    bool reader_serves_cached = true;
    std::chrono::microseconds busy_poll{100};
    // Serve an image made from the memory file (`image create` into the
    // store DIR/store, name "base", pages of image_page_size) instead of the
    // raw file; memory() stays the file, the model of every byte.
    bool serve_image = false;
    uint32_t image_page_size = 4096;
    // Anything else of the configuration (paths may live in the harness's
    // temporary directory).
    std::function<void(ServerConfig&, const TempDir&)> configure;
  };

  ServerHarness() : ServerHarness(Options{}) {}
  explicit ServerHarness(const Options& o) : options_(o) {
    memory_path_ = dir_.file("mem");
    socket_path_ = dir_.file("fl.sock");
    log_path_ = dir_.file("server.log");
    auto st = client::write_test_memory_file(memory_path_, o.memory_bytes, o.seed, o.zero_fraction);
    EXPECT_TRUE(st) << st.error().describe();
    log_fd_ = ::open(log_path_.c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
    logger_ = std::make_unique<Logger>(o.log_format, LogLevel::kDebug, log_fd_);
    ServerConfig c;
    c.socket_path = socket_path_;
    c.memory_path = memory_path_;
    c.workers_per_session = o.workers;
    c.on_fatal = o.on_fatal;
    c.handshake_timeout = o.handshake_timeout;
    c.reader_serves_cached = o.reader_serves_cached;
    c.busy_poll = o.busy_poll;
    if (o.serve_image) {
      auto store = image::LocalStore::open(dir_.file("store"), /*create=*/true);
      EXPECT_TRUE(store) << store.error().describe();
      if (store) {
        image::CreateOptions io;
        io.memory_path = memory_path_;
        io.name = "base";
        io.page_size = o.image_page_size;
        auto made = image::create_image(**store, io);
        EXPECT_TRUE(made) << made.error().describe();
      }
      c.memory_path.clear();
      c.image_path = dir_.file("store") + "/base";
    }
    if (o.configure) o.configure(c, dir_);
    auto s = Server::create(c, *logger_);
    EXPECT_TRUE(s) << s.error().describe();
    if (s) {
      server_ = std::move(*s);
      thread_ = std::thread([this] { run_status_ = server_->run(); });
    }
  }
  ~ServerHarness() { stop(); ::close(log_fd_); }

  void stop() {
    if (server_) server_->stop();
    if (thread_.joinable()) thread_.join();
  }

  Server& server() { return *server_; }
  const std::string& socket() const { return socket_path_; }
  const std::string& memory() const { return memory_path_; }
  const TempDir& dir() const { return dir_; }
  std::string log() const {
    std::ifstream f(log_path_);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  // Blocks until `n` sessions ended or were rejected (10 s at most).
  bool wait_ended(size_t n) { return server_->wait_for_ended(n, std::chrono::seconds(10)); }

 private:
  Options options_;
  TempDir dir_;
  std::string memory_path_, socket_path_, log_path_;
  int log_fd_ = -1;
  std::unique_ptr<Logger> logger_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
  Status run_status_;
};

// Polls `condition` until it holds or `limit` passes; whether it held. For
// effects another thread or process makes after an event this thread cannot
// observe directly (a bound, not an ordering). It checks every millisecond
// rather than spinning: many conditions read a log file, and a spinning test
// takes one of the two CPUs from the daemon whose line it waits for.
inline bool eventually_true(const std::function<bool()>& condition,
                            std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling, bounded
  }
  return true;
}

// A connection to the Unix socket at `path`; an empty fd when connect()
// fails (errno tells why).
inline UniqueFd try_connect_unix(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return UniqueFd();
  return fd;
}

// Sends one request line to the control socket at `path` and returns the
// reply line; "connect failed" / "send failed" when it cannot, and what
// arrived when the daemon sends nothing more for 20 s.
inline std::string control(const std::string& path, const std::string& request) {
  UniqueFd fd = try_connect_unix(path);
  if (!fd) return "connect failed";
  const std::string line = request + "\n";
  if (::send(fd.get(), line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size()))
    return "send failed";
  timeval tv{20, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string reply;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n <= 0) break;
    reply.append(buf, static_cast<size_t>(n));
  }
  while (!reply.empty() && reply.back() == '\n') reply.pop_back();
  return reply;
}

// A connection to the Unix socket at `path`; a failed connect() fails the test.
inline UniqueFd connect_unix(const std::string& path) {
  UniqueFd fd = try_connect_unix(path);
  EXPECT_TRUE(fd) << "connect " << path << ": " << std::strerror(errno);
  return fd;
}

// A good client (2% of the pages, one thread) gets every byte right from the
// harness's server after whatever the test did, and its session has ended
// when this returns: with on_fatal=kill a stop of the server would otherwise
// kill its peer, this very test process.
inline void expect_served(ServerHarness& h) {
  const uint64_t before = h.server().finished_total() + h.server().rejected_total();
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.touch_fraction = 0.02;
  o.threads = 1;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  ASSERT_TRUE(h.server().wait_for_ended(before + 1, std::chrono::seconds(10)));
}

// Path of a binary built beside the tests (CMake passes the directory).
inline std::string built_binary(const std::string& name) {
  return std::string(FAULTLINE_BINARY_DIR) + "/" + name;
}

// Runs a program with arguments; returns its pid (stdout/stderr to `out_path`).
inline pid_t spawn(const std::vector<std::string>& args, const std::string& out_path) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

// waitpid with a deadline; returns the wait status, or -1 on timeout (the
// child is then killed so no test leaves processes behind).
inline int wait_child(pid_t pid, std::chrono::seconds limit) {
  if (pid <= 0) return -1;  // never kill(-1) or a process group by mistake
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a child, not ordering a race
  }
}

// The whole file ("" when it cannot be read), in one bulk read: tests read
// guests of many MiB, which a character-at-a-time istreambuf_iterator made
// cost seconds each under ThreadSanitizer.
inline std::string read_file(const std::string& path) {
  auto bytes = read_whole_file(path);
  return bytes ? std::move(*bytes) : std::string();
}

// A read-only view of a whole file, mapped (Mapping::map_file): comparing a few
// pages with it touches only those pages, where a copy of the file costs a
// pass over every byte (under ThreadSanitizer, seconds per 64 MiB of shadow
// memory). Empty (data() null) when the file cannot be mapped, after a test
// failure that names it.
class FileView {
 public:
  explicit FileView(const std::string& path) {
    auto m = Mapping::map_file(path);
    if (!m) {
      ADD_FAILURE() << m.error().describe();
      return;
    }
    map_ = std::move(*m);
  }
  const uint8_t* data() const { return map_.bytes(); }
  size_t size() const { return map_.size(); }

 private:
  Mapping map_;
};

// One run of the faultline command, as an operator runs it: its exit code
// (-1: killed by a signal, or still running after `limit` and killed) and
// everything it printed on stdout and stderr (kept in a file of `dir`).
struct CommandRun {
  int exit_code = -1;
  std::string output;
};
inline CommandRun run_faultline(const TempDir& dir, std::vector<std::string> args,
                                std::chrono::seconds limit = std::chrono::seconds(120)) {
  args.insert(args.begin(), built_binary("faultline"));
  static std::atomic<int> counter{0};
  const std::string out = dir.file("faultline-out-" + std::to_string(counter++));
  const int status = wait_child(spawn(args, out), limit);
  CommandRun r;
  r.output = read_file(out);
  if (status >= 0 && WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  return r;
}

}  // namespace faultline::testing
