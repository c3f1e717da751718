// Server: the faultline daemon's core. Listens on one Unix socket and serves
// every VM that connects from one memory snapshot file, one Session per
// connection, several at once. A session that fails (bad handshake, bad
// regions, truncated file, dead client) ends alone; the server keeps running.
//
// Model: one memory file per socket. Run one `faultline serve` per snapshot
// (or per VM), each on its own socket.
//
// Thread-safety: run() from one thread; stop() from any thread or a signal
// handler (it only writes an eventfd); the query methods from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "common/unique_fd.h"
#include "protocol/handshake_socket.h"
#include "server/session.h"
#include "snapshot/working_set.h"
#include "snapshot/zero_index.h"
#include "source/page_source.h"

namespace faultline {

struct ServerConfig {
  std::string socket_path;
  std::string memory_path;
  int workers_per_session = 2;
  OnFatal on_fatal = OnFatal::kKill;
  std::chrono::milliseconds handshake_timeout{5000};
  // Most regions per handshake (protocol::HandshakeOptions::max_regions).
  size_t max_regions = protocol::HandshakeOptions{}.max_regions;
  // Optional control socket (see control.h); empty: none.
  std::string control_path;
  // Working-set recording and replay (see snapshot/working_set.h).
  std::string record_path;    // write each session's first touches here when it ends
  std::string prefetch_path;  // install this working set as each VM starts
  bool prefetch_all = false;  // install the whole snapshot in the background
  int prefetch_threads = 2;   // threads installing the prefetch plan (SessionConfig::prefetch_threads)
  // The event reader serves faults itself when that needs no I/O (see SessionConfig).
  bool reader_serves_cached = true;
  // How long each session's reader keeps polling after an event before it
  // sleeps (see SessionConfig::busy_poll); zero: never busy-poll.
  std::chrono::microseconds busy_poll{100};
  // Zero-page index: use (and build if missing or stale) FILE.zeroidx.
  bool zero_index = true;
  std::string zero_index_path;  // empty: memory_path + ".zeroidx"
};

class Server {
 public:
  // Opens the memory file and binds the socket; serving starts with run().
  static Result<std::unique_ptr<Server>> create(const ServerConfig& config, const Logger& logger);
  ~Server();

  // Serves until stop(). Live sessions are then stopped (their peers killed
  // unless on_fatal == kLeave) and joined before run() returns.
  Status run();
  // Async-signal-safe.
  void stop();

  // Summaries of sessions that have ended, in the order they ended.
  std::vector<SessionSummary> finished_sessions() const;
  // Handshake failures so far (sessions that never started), with reasons.
  std::vector<std::string> rejected_connections() const;
  size_t active_sessions() const;
  // Connection threads started and not yet joined (running, or ended and
  // waiting for the accept loop to join them, which it does every 200 ms).
  size_t connection_threads() const { return connection_threads_.load(std::memory_order_acquire); }
  // A running session by id (as logged), or null. Holding it keeps the
  // Session object alive, not the session running.
  std::shared_ptr<Session> session(uint64_t id) const;
  // Current counters of the sessions still running.
  std::vector<SessionSummary> live_sessions() const;
  // Blocks until at least `n` sessions have ended or were rejected in total,
  // or `timeout` passed. Returns whether the count was reached.
  bool wait_for_ended(size_t n, std::chrono::milliseconds timeout) const;

  const std::string& socket_path() const { return config_.socket_path; }

 private:
  struct Connection;
  Server(ServerConfig config, const Logger& logger, std::shared_ptr<MemoryFile> memory,
         protocol::UnixListener listener);
  // Under --on-fatal=kill, SIGKILLs a client that handed us a uffd we will
  // not serve (its VM would hang on its first fault); true if it was killed.
  bool kill_unserved_peer(pid_t pid) const;
  void handle_connection(Connection& c);
  void answer_control(int fd) const;
  void reap(bool all);

  const ServerConfig config_;
  const Logger& log_;
  std::shared_ptr<MemoryFile> memory_;
  std::shared_ptr<const WorkingSet> prefetch_;
  std::shared_ptr<const ZeroIndex> zero_index_;
  protocol::UnixListener listener_;  // unlinks the socket path when destroyed
  std::optional<protocol::UnixListener> control_;
  UniqueFd stop_efd_;
  uint64_t next_id_ = 1;

  std::atomic<size_t> connection_threads_{0};

  mutable std::mutex mu_;
  mutable std::condition_variable ended_cv_;
  std::list<std::unique_ptr<Connection>> connections_;  // GUARDED_BY(mu_)
  std::vector<SessionSummary> finished_;                // GUARDED_BY(mu_)
  std::vector<std::string> rejected_;                   // GUARDED_BY(mu_)
  bool stopping_ = false;                               // GUARDED_BY(mu_)
};

}  // namespace faultline
