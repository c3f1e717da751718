// Server: the faultline daemon's core. Listens on Unix sockets, one per
// attachment (a socket bound to what VMs connecting to it are served from: a
// memory snapshot file or an image with its chain of parents, local or in an
// object store), and serves every VM that connects, one Session per
// connection, many at once. A session that fails (bad handshake, bad regions,
// truncated file, dead client) ends alone; the server keeps running.
//
// Model: one daemon per host. The socket given at start-up (--socket with
// --memory or --image) is the first attachment; more are made and removed at
// run time through the control socket (attach()/detach()), each under the
// socket directory fixed at start-up. Every image of the daemon reads through
// one in-memory frame cache and, for images in an object store, one disk
// cache: a frame that two images share is fetched and held once.
//
// Trust boundary: whoever can connect to a VM socket can read what it serves
// and whoever can connect to the control socket can read page maps, write
// working sets and attach any image the daemon can read, so every socket gets
// an explicit mode and owner before the first accept, peers may be limited to
// an allow-list of uids and gids (SO_PEERCRED, SO_PEERGROUPS), and every peer
// is identified by a pidfd taken at accept time. Everything a client can make
// the daemon hold is bounded: concurrent handshakes and sessions, attachments,
// the handshake's duration, control requests (served on their own thread with
// a deadline each), the history of ended sessions. Each refusal is one log
// line; the daemon keeps serving.
//
// Threads: run()'s thread accepts VM connections on every attached socket;
// one thread per connection receives the handshake and then waits for its
// session; control_threads threads serve the control socket, a request
// each (so a snapshot or an attach waiting on its store holds one of them).
//
// Thread-safety: run() from one thread; stop() from any thread or a signal
// handler (it only sets a flag and writes an eventfd); attach(), detach(),
// snapshot() and the query methods from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "common/unique_fd.h"
#include "image/frame_cache.h"
#include "image/image_source.h"
#include "metrics/registry.h"
#include "protocol/handshake_socket.h"
#include "server/diff_export.h"
#include "server/session.h"
#include "snapshot/working_set.h"
#include "snapshot/zero_index.h"
#include "source/page_source.h"

namespace faultline {

namespace objstore {
class DiskCache;
}

// Which peers may use a socket, by SO_PEERCRED uid and by group (the peer's
// primary group or any of its supplementary groups, SO_PEERGROUPS). Empty
// (no uid and no gid): everyone who can open the socket file.
struct PeerAllowList {
  std::vector<uid_t> uids;
  std::vector<gid_t> gids;
  bool empty() const { return uids.empty() && gids.empty(); }
};

// Why a connection was refused before any session started: the log field
// `reason` of connection_refused / handshake_failed / session_rejected, and
// the `cause` label of faultline_handshakes_refused_total (one list for both).
using RefusalCause = metrics::RefusalCause;

struct ServerConfig {
  // The socket attached at start-up and what VMs connecting to it are served
  // from: a raw memory file, or (when image_path is set) an image and its
  // chain of parents, "STORE/NAME" (STORE a directory or s3://BUCKET/PREFIX).
  // Empty socket_path: nothing is attached at start-up (then control_path and
  // socket_dir are required: VMs are attached through the control socket).
  std::string socket_path;
  std::string memory_path;
  std::string image_path;
  // Directory in which attach() creates VM sockets (fixed at start-up, so a
  // control client cannot make the daemon bind or replace a socket anywhere
  // else); empty: attach() is refused.
  std::string socket_dir;
  // Most sockets attached at once (the start-up one included).
  size_t max_attachments = 1024;
  // Decompressed image frames kept in memory, shared by every session (and,
  // when `frame_cache` is given, by every server sharing that cache).
  uint64_t frame_cache_bytes = 256ull << 20;
  std::shared_ptr<image::FrameCache> frame_cache;
  // With images in an object store: frames fetched from them are kept in
  // this directory too (objstore/disk_cache.h), at most cache_bytes of them,
  // so a restarted daemon does not fetch them again; one cache for every
  // image of the daemon. Empty: no disk cache.
  std::string cache_dir;
  uint64_t cache_bytes = 4ull << 30;
  int workers_per_session = 2;
  OnFatal on_fatal = OnFatal::kKill;
  std::chrono::milliseconds handshake_timeout{5000};
  // Mode and owner of the VM socket and the control socket (set before the
  // first accept), and which peers may use each.
  protocol::SocketAccess socket_access;
  protocol::SocketAccess control_access;
  PeerAllowList allow;
  PeerAllowList control_allow;
  // At most this many connections mid-handshake, and this many VMs served
  // (connections mid-handshake included), at once; more are refused.
  size_t max_handshakes = 32;
  size_t max_sessions = 256;
  // Ended sessions and refused connections kept for finished_sessions() and
  // rejected_connections() (the totals are counted regardless).
  size_t ended_history = 1024;
  // Most regions per handshake (protocol::HandshakeOptions::max_regions).
  size_t max_regions = protocol::HandshakeOptions{}.max_regions;
  // Optional control socket (see control.h); empty: none.
  std::string control_path;
  // A control request must arrive and its reply be read within this time.
  std::chrono::milliseconds control_timeout{2000};
  // Control requests served at once (a thread each); more wait in the
  // socket's backlog until one ends.
  size_t control_threads = 4;
  // How long a control request naming a session still in Session::start
  // (serving, not yet listed) waits for it to be listed or refused.
  std::chrono::milliseconds session_start_wait{5000};
  // Largest control reply (a page map of a huge, fragmented guest); a larger
  // one is answered with an error instead.
  size_t max_control_reply_bytes = 64 << 20;
  // Directory under which `record` through the control socket writes (fixed
  // at start-up); empty: the control socket refuses `record`.
  std::string record_dir;
  // Which build this is, for the server_start log line: the CLI sets them
  // from common/version.h (only the command links the generated version, so
  // a new commit relinks one program, not every test).
  std::string version, commit;
  // Working-set recording and replay (see snapshot/working_set.h).
  std::string record_path;    // write each session's first touches here when it ends
  std::string prefetch_path;  // install this working set as each VM starts
  bool prefetch_all = false;  // install the whole snapshot in the background
  int prefetch_threads = 2;   // threads installing the prefetch plan (SessionConfig::prefetch_threads)
  int prefetch_fetches = 12;  // loads in flight ahead of those installs (SessionConfig::prefetch_fetches)
  // How long a fault waits for a store that fails in a way that may pass (an
  // object store down, timing out, answering 5xx) before its session is fatal
  // and on_fatal applies (SessionConfig::source_retry_deadline).
  std::chrono::milliseconds store_deadline{30000};
  // The event reader serves faults itself when that needs no I/O (see SessionConfig).
  bool reader_serves_cached = true;
  // How long each session's reader keeps polling after an event before it
  // sleeps (see SessionConfig::busy_poll); zero: never busy-poll.
  std::chrono::microseconds busy_poll{100};
  // Zero-page index: use (and build if missing or stale) FILE.zeroidx.
  bool zero_index = true;
  std::string zero_index_path;  // empty: memory_path + ".zeroidx"
  // Time every fault for the latency histograms of metrics() (what
  // `serve --metrics` turns on); the counters are kept either way.
  bool record_fault_latency = false;
  // Fault-around (SessionConfig::fault_around_pages): the largest window of
  // 4 KiB pages a demand fault installs; 0 or 1: off. Off for embedders and
  // tests that count installs page by page; `faultline serve` defaults to 64.
  uint32_t fault_around_pages = 1;
  // With fault-around, a fault that continues a stream at full speed also
  // has the stream's next window installed by a worker while the guest runs
  // (SessionConfig::fault_around_readahead; off by default).
  bool fault_around_readahead = false;
};

class Server {
 public:
  // Opens what the start-up socket serves and binds it (when one is given),
  // binds the control socket; serving starts with run().
  static Result<std::unique_ptr<Server>> create(const ServerConfig& config, const Logger& logger);
  ~Server();

  // Serves until stop(), or until stop_signal_fd (a signalfd, when >= 0)
  // reads a signal, which is logged by name. Live sessions are then stopped
  // (their peers killed unless on_fatal == kLeave) and joined before run()
  // returns.
  Status run(int stop_signal_fd = -1);
  // Async-signal-safe.
  void stop();

  // Summaries of the most recent ended sessions (at most
  // config.ended_history), in the order they ended.
  std::vector<SessionSummary> finished_sessions() const;
  // The most recent refused connections and failed handshakes (sessions that
  // never started), with reasons; at most config.ended_history.
  std::vector<std::string> rejected_connections() const;
  // Totals since start, not bounded by the history.
  uint64_t finished_total() const;
  uint64_t rejected_total() const;
  size_t active_sessions() const;
  // Connections accepted and still receiving their handshake.
  size_t handshakes_in_progress() const;
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

  // Writes a running session's working set (first touches so far) to `name`
  // inside config.record_dir, atomically. Returns the path and page count.
  struct Recorded {
    std::string path;
    uint64_t pages = 0;
  };
  Result<Recorded> record(uint64_t session, const std::string& name) const;

  // Writes image `name` into the served image's store, on top of that image,
  // from the memory of session `id`'s VM (which its caller has paused): the
  // pages it wrote since restore, the pages the balloon removed as zero,
  // nothing else (server/diff_export.h says how, and what it refuses).
  // `store_dir` must name the store the daemon serves from. Logs
  // snapshot_written or snapshot_failed.
  struct Snapshot {
    std::string name, parent;
    ExportReport report;
    double seconds = 0;
  };
  Result<Snapshot> snapshot(uint64_t id, const std::string& store_dir, const std::string& name) const;

  // Attaches a new VM socket at run time: `socket` (a plain name, or a path
  // directly inside config.socket_dir) is bound, with config.socket_access,
  // to `image` ("STORE/NAME") or `memory` (a raw memory file), exactly one;
  // `prefetch`: a working-set file installed as each VM starts, "all", or
  // empty. The socket accepts VMs when this returns. Refused when the
  // daemon has no socket_dir, the socket is already attached, max_attachments
  // are, or the image or file cannot be opened (the error names it). Logs
  // `attached`.
  struct AttachRequest {
    std::string socket;
    std::string image;
    std::string memory;
    std::string prefetch;
  };
  struct Attachment {
    uint64_t id = 0;
    std::string socket;  // the bound path
    std::string serves;  // the image ("STORE/NAME") or memory file
    uint64_t memory_bytes = 0;
    size_t image_layers = 0;  // 0 for a memory file
    uint64_t prefetch_pages = 0;
    bool prefetch_all = false;
    uint64_t connections = 0;  // VM connections accepted on this socket so far
  };
  Result<Attachment> attach(const AttachRequest& request);
  // Removes an attached socket (as attach() names it, or the start-up
  // socket's path): its file is gone and it accepts no VM when this returns;
  // VMs already connected to it are served on until they end. ENOENT when
  // no such socket is attached. Logs `detached`.
  Result<Attachment> detach(const std::string& socket);
  // The sockets attached now, in the order they were attached.
  std::vector<Attachment> attachments() const;

  const std::string& socket_path() const { return config_.socket_path; }
  const ServerConfig& config() const { return config_; }

  // The daemon's metrics (every session's counts, refused handshakes).
  const metrics::Registry& metrics() const { return metrics_; }

 private:
  struct Connection;
  struct Served;
  struct Bound;
  Server(ServerConfig config, const Logger& logger, UniqueFd stop_efd, UniqueFd wake_efd, UniqueFd reserve_fd);
  // Opens what a socket will serve (exactly one of image and memory).
  // `save_zero_index`: a zero index built for a memory file is saved beside
  // it (start-up); an attach saves none (the control socket writes no file).
  Result<std::shared_ptr<const Served>> open_served(const std::string& memory, const std::string& image,
                                                    const std::string& prefetch, bool prefetch_all,
                                                    const std::string& zero_index_path, bool save_zero_index) const;
  // attach() without its attach_failed line.
  Result<Attachment> attach_unlogged(const AttachRequest& request);
  // ESHUTDOWN once stop() was called (run() calls it as its loop ends).
  Status check_not_stopping() const;
  // Adds a bound socket to the list run() accepts on; EMFILE-like refusal
  // past max_attachments. REQUIRES: attach_op_mu_ held.
  Result<Attachment> add_bound(std::shared_ptr<const Served> served, protocol::UnixListener listener);
  Attachment describe(const Bound& b) const;
  // The socket path attach()/detach() mean by `socket`.
  Result<std::string> attach_socket_path(const std::string& socket) const;
  // What session `id` is served from, or null.
  std::shared_ptr<const Served> served_by(uint64_t id) const;
  // Waits (at most config_.session_start_wait) until no connection (or none with
  // `id`) is in Session::start. REQUIRES: `lock` holds mu_.
  void wait_for_starting(std::unique_lock<std::mutex>& lock, std::optional<uint64_t> id) const;
  // Under --on-fatal=kill, SIGKILLs a client that handed us a uffd we will
  // not serve (its VM would hang on its first fault), through the pidfd taken
  // when it connected; true if it was killed.
  bool kill_unserved_peer(const protocol::PeerIdentity& peer) const;
  // Accepts one connection of `listener_fd` into `out`. Under EMFILE/ENFILE
  // the pending connection is accepted on a reserved fd and shed (refused and
  // logged) so that the listener does not stay readable forever; returns
  // false then, or when there was nothing to accept.
  bool accept_or_shed(int listener_fd, const char* socket, UniqueFd* out);
  void accept_vm(const Bound& bound);
  // Refuses a VM connection before its handshake: logged, counted, closed; a
  // client that already sent its uffd is killed under --on-fatal=kill.
  void refuse(UniqueFd connection, const protocol::PeerIdentity& peer, RefusalCause cause, const std::string& why);
  bool allowed(const PeerAllowList& list, int connection_fd, const protocol::PeerCredentials& cred) const;
  void handle_connection(Connection& c);
  void handle_connection_or_log(Connection& c);
  // A VM whose handshake arrived but whose session cannot start: logged
  // (session_rejected), counted, and killed under --on-fatal=kill.
  void reject_session(Connection& c, RefusalCause cause, const std::string& error);
  void control_loop();
  void join_control_threads();
  void serve_control(UniqueFd connection);
  void note_rejected(std::string why);
  void reap(bool all);
  // Reads one signal from run()'s stop_signal_fd and logs it (stop_signal);
  // false when there was none to read.
  bool stopped_by_signal(int stop_signal_fd) const;
  // Counts a connection refused before it became a session, by cause.
  void count_refused(metrics::RefusalCause cause) { metrics_.handshake_refused(cause); }

  const ServerConfig config_;
  const Logger& log_;
  // Shared by every image the daemon serves.
  std::shared_ptr<image::FrameCache> frame_cache_;
  std::shared_ptr<objstore::DiskCache> disk_cache_;  // with config.cache_dir
  // Serializes attach() and detach() (each opens or closes sockets and
  // images outside mu_).
  std::mutex attach_op_mu_;
  mutable std::mutex bound_mu_;
  std::condition_variable bound_cv_;  // run() dropped its copy of the list
  std::vector<std::shared_ptr<Bound>> bound_;  // GUARDED_BY(bound_mu_)
  uint64_t next_attachment_id_ = 1;            // GUARDED_BY(bound_mu_)
  uint64_t run_passes_ = 0;                    // GUARDED_BY(bound_mu_): run() loop iterations
  bool accepting_ = false;                     // GUARDED_BY(bound_mu_): run()'s loop is running
  UniqueFd wake_efd_;                          // wakes run() when bound_ changes
  std::optional<protocol::UnixListener> control_;
  UniqueFd record_dir_fd_;
  UniqueFd stop_efd_;
  // Set by stop(): a store request made for an attach or a snapshot gives up
  // (ScopedDeadline).
  std::atomic<bool> stop_requested_{false};
  // The images snapshot() is writing now, each as its store (a canonical
  // directory, or s3://BUCKET/PREFIX) and name: the
  // same name into the same store again meanwhile is refused (EBUSY) instead
  // of racing the first to the manifest (an object store has no
  // create-if-absent PUT: the later one would replace it).
  mutable std::mutex snapshots_mu_;
  mutable std::set<std::pair<std::string, std::string>> snapshots_writing_;  // GUARDED_BY(snapshots_mu_)
  // An fd held in reserve: under EMFILE it is closed to accept (and shed) the
  // pending connection, then taken again. Every accept (run()'s for the VM
  // sockets, the control threads') holds reserve_mu_, so no other accept
  // takes the slot a shed frees before the reserve is taken back.
  // Lock order: reserve_mu_ before mu_ (a refusal is noted under mu_).
  mutable std::mutex reserve_mu_;
  UniqueFd reserve_fd_;        // GUARDED_BY(reserve_mu_)
  bool shed_failing_ = false;  // GUARDED_BY(reserve_mu_): accept_failed said for this episode
  uint64_t next_id_ = 1;
  std::vector<std::thread> control_threads_;

  std::atomic<size_t> connection_threads_{0};
  metrics::Registry metrics_;

  mutable std::mutex mu_;
  mutable std::condition_variable ended_cv_;
  // Notified when a connection leaves `starting` (published or rejected).
  mutable std::condition_variable published_cv_;
  std::list<std::unique_ptr<Connection>> connections_;  // GUARDED_BY(mu_)
  std::deque<SessionSummary> finished_;                 // GUARDED_BY(mu_), at most ended_history
  std::deque<std::string> rejected_;                    // GUARDED_BY(mu_), at most ended_history
  uint64_t finished_total_ = 0;                         // GUARDED_BY(mu_)
  uint64_t rejected_total_ = 0;                         // GUARDED_BY(mu_)
  size_t handshaking_ = 0;                              // GUARDED_BY(mu_): connections mid-handshake
  size_t serving_ = 0;                                  // GUARDED_BY(mu_): connections with a running session
  bool stopping_ = false;                               // GUARDED_BY(mu_)
};

// A written snapshot as named fields, in one order: the snapshot_written log
// line and the control socket's snapshot reply both render these.
std::vector<LogField> snapshot_fields(const Server::Snapshot& s);

}  // namespace faultline
