// Session: serves one VM's userfaultfd from a memory snapshot, from the moment
// its handshake is received until the VM exits or the session is stopped.
//
// Threads: one event reader and N install workers. The reader drains the uffd
// (faults, REMOVE and other events), records REMOVEs in the page-state table
// at once and hands each fault to the worker that owns its page (page index
// modulo N, so faults for one page never race each other and faults for
// different pages never share a lock). Workers read snapshot bytes into
// their own buffer (storage I/O happens here, outside any lock), then
// install them (see install_fence.h for why snapshot installs are fenced
// against the reading of REMOVEs). A REMOVE never waits for storage.
//
// A session ends when the peer process exits (pidfd), when the socket reaches
// EOF for clients that keep it open (Firecracker >= 1.12), when an install
// reports ESRCH, when stop() is called, or on a fatal error (the memory file
// truncated or unreadable, an event it cannot handle, an exception on any of
// its threads: each thread's entry catches everything, so none reaches
// std::terminate). When it ends, every fault still waiting is woken. On a fatal error, and
// on stop() while the VM still runs, the peer is SIGKILLed unless
// on_fatal == kLeave: a guest whose memory server is gone would otherwise
// hang forever (Firecracker's own example does the same).
//
// Thread-safety: stop(), finished(), summary() are safe from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "common/unique_fd.h"
#include "guest/layout.h"
#include "guest/page_state.h"
#include "kernel/pagemap_scan.h"
#include "kernel/process.h"
#include "kernel/userfaultfd.h"
#include "metrics/registry.h"
#include "protocol/handshake_socket.h"
#include "server/fault_around.h"
#include "server/page_installer.h"
#include "server/published_layout.h"
#include "server/test_hooks.h"
#include "server/wake_signal.h"
#include "snapshot/working_set.h"
#include "snapshot/zero_index.h"
#include "source/page_source.h"

namespace faultline {

enum class OnFatal { kKill, kLeave };
const char* to_string(OnFatal);

enum class SessionEnd {
  kRunning,
  kPeerExited,    // the peer process exited (pidfd)
  kSocketClosed,  // Firecracker >= 1.12 closed its socket: it exited
  kPeerGone,      // an install returned ESRCH: the client's mm is gone
  kStopped,       // stop() (server shutdown)
  kFatal,         // the session could not go on; see SessionSummary::error
};
const char* to_string(SessionEnd);

struct SessionConfig {
  uint64_t id = 0;
  // Which socket the VM connected to and what it is served from (the image
  // or memory file attached to that socket): in the session's log lines and
  // summary, so that an operator of a daemon serving many images can tell
  // its sessions apart.
  std::string socket;
  std::string serves;
  int workers = 2;
  OnFatal on_fatal = OnFatal::kKill;
  const Logger* logger = nullptr;  // REQUIRES: outlives the session
  // Record the first-touch order of faulted pages into this working-set file
  // when the session ends ("{session}" in the path becomes the session id).
  std::string record_path;
  // Keep the first-touch order (for record_path, or for `record` through the
  // control socket) even without record_path.
  bool record_first_touches = false;
  // Install this working set in the background as the VM starts.
  std::shared_ptr<const WorkingSet> prefetch;
  // Install the whole snapshot in the background (eager fill).
  bool prefetch_all = false;
  // Threads that install the prefetch plan (a chunk of it each at a time):
  // a single-page UFFDIO_COPY costs a few microseconds of kernel time, so a
  // scattered working set goes faster split over cores.
  int prefetch_threads = 2;
  // Loads the source may keep in flight ahead of the prefetch installs
  // (PageSource::read_ahead: an image in an object store waits on many GETs
  // at once instead of one per prefetch thread); 0: none ahead. 12 leaves 4
  // of the S3 client's 16 connections to demand faults.
  int prefetch_fetches = 12;
  // Pages that are all zero in the snapshot: installed without reading.
  std::shared_ptr<const ZeroIndex> zero_index;
  // The event reader serves a fault itself when that costs no I/O (4 KiB
  // page, zero or in the page cache): no hand-off, no thread wake-up.
  bool reader_serves_cached = true;
  // After an event, the reader keeps polling the uffd (without sleeping) for
  // this long before it blocks in poll(): a fault that arrives meanwhile is
  // read at once instead of after a thread wake-up, which on this kind of
  // machine is most of a fault's cost. Zero: always block.
  std::chrono::microseconds busy_poll{100};
  // Daemon-wide metrics: the session's counts are read from it at scrape
  // time and folded in when it ends. Null: no metrics.
  // REQUIRES: outlives the session.
  metrics::Registry* metrics = nullptr;
  // A source read that fails with a retryable error (PageSource::read) is
  // tried again, with backoff, until this much time has passed; then the
  // session is fatal. Errors that are not retryable are fatal at once.
  std::chrono::milliseconds source_retry_deadline{30000};
  // Time every fault from its read to the end of its install, for the
  // latency histograms (faultline serve --metrics). Off, the fault path
  // reads no clock for metrics.
  bool record_fault_latency = false;
  // Fault-around (server/fault_around.h): the largest window, in 4 KiB
  // pages, a demand fault installs (its own page and the untouched pages
  // after it, in one UFFDIO_COPY); 0 or 1: only the faulting page. 2 MiB
  // pages never use it.
  uint32_t fault_around_pages = 1;
  // With fault-around: a fault that continues a stream at full speed also
  // has the stream's next window installed by a worker while the guest
  // walks this one (server/fault_around.h, FaultAround::plan). Off by
  // default: on 2 cores it saved under 5 % of a trace replay's restore time
  // and left twice the untouched pages (docs/performance.md).
  bool fault_around_readahead = false;
};

// Counters, summed over the session's threads.
struct SessionCounters {
  uint64_t faults = 0;           // page-fault messages read
  uint64_t pages_snapshot = 0;   // pages installed from the snapshot
  uint64_t pages_zero = 0;       // pages installed as zeros
  uint64_t bytes_installed = 0;  // bytes installed, snapshot and zero
  uint64_t already_present = 0;  // EEXIST: another fault installed it first
  uint64_t retries = 0;          // EAGAIN: deferred until the pending event was read
  uint64_t removes = 0;          // REMOVE events
  uint64_t removed_pages = 0;    // whole pages those REMOVEs covered
  uint64_t prefaulted_pages = 0; // pages installed ahead of any fault by prefault()
  uint64_t snapshot_zero_pages = 0;  // snapshot pages known zero (zero index): installed without reading
  uint64_t prefetch_late = 0;    // demand faults on planned pages prefetch had not reached yet
  uint64_t reader_served = 0;    // faults the event reader served itself (no I/O needed)
  uint64_t busy_poll_reads = 0;  // event batches the reader found while busy-polling (no wake-up)
  uint64_t source_retries = 0;   // source reads tried again after a retryable error
  uint64_t ahead_pages = 0;      // pages fault-around installed ahead of any fault on them (also in pages_snapshot)
  uint64_t ahead_faulted = 0;    // of those, pages that faulted later (a write-protect fault: the guest wrote one)
  uint64_t readahead_pages = 0;  // of ahead_pages, those installed by readahead (fault_around_readahead)
  uint64_t stale_faults = 0;     // faults on a page removed after they were read: woken, not served (Session::serve)
};

// What prefault() did.
struct PrefaultReport {
  uint64_t installed_pages = 0;   // installed from the snapshot by this call
  uint64_t bytes = 0;
  uint64_t skipped_present = 0;   // already installed (by a fault, the guest or an earlier prefault)
  uint64_t skipped_removed = 0;   // removed since restore: they serve zero, never the snapshot
  uint64_t skipped_unmapped = 0;  // the range is no longer mapped
  uint64_t retries = 0;           // installs deferred by a pending event (EAGAIN)
};

struct PrefaultOptions {
  // Largest single UFFDIO_COPY: contiguous pages are coalesced up to this.
  uint64_t max_run_bytes = 1 << 20;
  // Wait while demand faults are queued, so that they always come first.
  bool yield_to_demand = true;
  // 4 KiB pages: fill gaps of up to this many unplanned (untouched) pages
  // between planned ones, trading a few extra pages for fewer, larger copies.
  uint64_t max_gap_pages = 0;
  // Called with how many of the (sorted, de-duplicated) pages are done,
  // installed or skipped, as the call goes (after each install).
  std::function<void(size_t done)> progress;
};

// A run of bytes of the memory file.
struct FileRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  friend bool operator==(const FileRange&, const FileRange&) = default;
};

// Which pages of a live guest differ from the snapshot: the input of a diff
// snapshot. Ranges are in memory-file offsets, sorted and merged.
struct PageMap {
  uint64_t session = 0;
  pid_t pid = 0;
  kernel::ScanMethod method = kernel::ScanMethod::kPagemapScan;
  // Whether the client registered WP. Without it a write leaves no trace,
  // so every present page that was not installed zero is reported dirty.
  bool write_protect = false;
  std::vector<FileRange> dirty;    // written by the guest: take these bytes from guest memory
  std::vector<FileRange> zero;     // installed zero after a REMOVE and not written since
  std::vector<FileRange> removed;  // removed and not touched since: zero when next read
  uint64_t dirty_bytes = 0, zero_bytes = 0, removed_bytes = 0;
  std::string to_json() const;
};

struct SessionSummary {
  uint64_t id = 0;
  pid_t peer_pid = 0;
  std::string socket;  // SessionConfig::socket
  std::string serves;  // SessionConfig::serves
  SessionEnd end = SessionEnd::kRunning;
  std::string error;  // why, when end == kFatal
  bool peer_killed = false;
  bool write_protect = false;  // the client registered WP: read installs are write-protected
  SessionCounters counters;
  double seconds = 0;
};

// The summary as named fields, in one order: the session_end log line and the
// control socket's `sessions` reply both render these.
std::vector<LogField> summary_fields(const SessionSummary& s);

class Session {
 public:
  // Validates the handshake's regions against `source` and starts serving.
  // An error means nothing was started (the caller decides about the peer):
  // every step that can fail (eventfds, allocations, threads) is checked, and
  // a failure stops and joins whatever had started, then says which step
  // failed and why.
  static Result<std::unique_ptr<Session>> start(protocol::Handshake handshake,
                                                std::shared_ptr<const PageSource> source, const SessionConfig& config);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Asks the session to end (kStopped); returns at once. Idempotent.
  void stop();
  // Blocks until every thread of the session has exited.
  void wait();
  bool finished() const { return finished_.load(std::memory_order_acquire); }
  // True from the start of a session with --prefetch until its prefetch has
  // installed what it will (prefetch_done logged) or ended: meanwhile pages
  // turn present with the VM paused.
  bool prefetching() const { return prefetching_.load(std::memory_order_acquire); }
  // Fd that becomes readable when the session has finished (for poll loops).
  int finished_fd() const { return finished_efd_.get(); }

  SessionSummary summary() const;
  // The session's counts as metrics report them (counters and latency
  // histograms so far). Thread-safe; never blocks the fault path.
  metrics::SessionCounts metrics_counts() const;

  // Bytes of server memory this session holds: the page-state table (one
  // byte per guest page) plus fixed per-session buffers (fault rings, page
  // buffers, the zero page) and, when recording, the first-touch list.
  struct MemoryUse {
    uint64_t page_state_bytes = 0;
    uint64_t buffer_bytes = 0;
    uint64_t record_bytes = 0;
    uint64_t total() const { return page_state_bytes + buffer_bytes + record_bytes; }
  };
  MemoryUse memory_use() const;

  // Which pages the guest changed since restore, from the client's pagemap
  // (PAGEMAP_SCAN, or /proc/PID/pagemap when `force_fallback` or the kernel
  // lacks it), and which are zero or removed, from the page-state table.
  // Thread-safety: safe from any thread while the session runs.
  Result<PageMap> page_map(bool force_fallback = false) const;

  // Writes the pages faulted so far, in first-touch order, to `path`.
  // Thread-safety: safe from any thread.
  Status write_record(const std::string& path) const;
  // The pages faulted so far, in first-touch order, as a working set.
  // Thread-safety: safe from any thread.
  WorkingSet recorded_working_set() const;
  // Pages faulted so far (first touches).
  uint64_t recorded_pages() const;

  // Installs the snapshot bytes of the given pages (global page indexes, any
  // order, duplicates allowed) ahead of any fault, in runs of contiguous pages
  // read with one pread and installed with one UFFDIO_COPY. It keeps every
  // rule a fault install keeps: a page removed since restore is never
  // brought back (it serves zero on its next fault), a present page is never
  // overwritten (the guest may have written it), installs are fenced against
  // REMOVEs and write-protected when the client registered WP. Returns when
  // every page was installed or skipped.
  // Thread-safety: safe from any thread; concurrent calls are serialized.
  Result<PrefaultReport> prefault(std::span<const uint64_t> page_indexes, const PrefaultOptions& options = {});
  // The current layout (UNMAP and REMAP events change it), shared: it stays
  // valid while the caller holds it.
  std::shared_ptr<const GuestLayout> layout() const { return layout_->snapshot(); }
  // Layouts the session still holds (the current one plus retired ones a
  // session thread may still be reading) and how many UNMAP/REMAP changes it
  // has seen: the history is bounded by the first, not the second.
  size_t layouts_retained() const { return layout_->retained(); }
  size_t layouts_retained_peak() const { return layout_->peak_retained(); }
  uint64_t layout_changes() const { return layout_->changes(); }
  const PageStateTable& pages() const { return *pages_; }

 private:
  struct Worker;
  // A fault as the reader hands it on: the kernel's message, when it was read
  // (metrics::now_ns(), when recording fault latency) and whether it is a
  // demand fault on a page prefetch had planned but not installed yet.
  struct QueuedFault {
    uint64_t address = 0;
    bool write = false;
    bool wp = false;
    bool prefetch_late = false;
    int64_t read_ns = 0;
    // Fault-around window in pages, chosen when the fault is first served
    // (0: not yet); a fault handed on to a worker or retried keeps it.
    uint32_t window = 0;
    // Readahead pages to install after the window once it is in (0: none).
    uint32_t readahead = 0;
    // Not a fault: a readahead of `window` pages from `address`, which no
    // thread waits for (the reader hands those to a worker this way).
    bool is_readahead = false;
    // The page's REMOVE count when the fault was read (PageStateTable::removals).
    uint8_t removals = 0;
  };
  // What the registry reads while the session is live.
  class MetricsSource final : public metrics::SessionSource {
   public:
    explicit MetricsSource(const Session& s) : session_(s) {}
    void collect(metrics::SessionCounts& into) const override;

   private:
    const Session& session_;
  };
  Session(protocol::Handshake handshake, GuestLayout layout, std::shared_ptr<const PageSource> source,
          const SessionConfig& config);
  // The fallible part of start(): buffers, eventfds, threads. On failure
  // every thread it started is stopped and joined, and the session is left
  // as if it never ran (no session_end line, the peer untouched).
  Status launch();
  void abort_launch();
  // Runs a session thread's body; an exception ends the session (fatal)
  // instead of escaping the thread.
  template <typename Body>
  void run_guarded(const char* thread_kind, Body&& body) noexcept;
  void fatal_exception(const char* thread_kind, const char* what) noexcept;

  void reader_loop();
  void worker_loop(Worker& w);
  void prefetch_loop();
  enum class Served { kDone, kRetry, kNeedsWorker };
  // Installs one faulted page. kRetry: retry after the reader's next batch.
  // `by_reader`: the event reader serving it itself, which it does only for
  // 4 KiB pages that need no storage I/O (else kNeedsWorker).
  Served serve(Worker& w, QueuedFault& fault, bool by_reader);
  // A demand fault's page and the `pages - 1` after it (fault-around), staged
  // contiguously, through the installer. The faulting page counts as
  // installed when the run installed it, however far the run got. Counts
  // and records the pages installed ahead.
  PageInstaller::Result install_window(Worker& w, size_t slot, const PageLocation& loc, uint64_t pages,
                                       const uint8_t* staged, bool protect, bool write, int inject_errno);
  // Accounts `pages` pages installed ahead of any fault from `loc` + `first`
  // pages on: counters, metrics, first touches (they never fault).
  void count_ahead(Worker& w, const PageLocation& loc, uint64_t first, uint64_t pages);
  // After a window was installed whole: its readahead goes to a worker (the
  // reader's ring, or this worker's own list).
  void queue_readahead(Worker& w, const PageLocation& loc, const QueuedFault& fault, uint64_t pages, bool by_reader);
  // A worker installs a readahead, if its first page is still untouched.
  void serve_readahead(Worker& w, const QueuedFault& ra);
  // `zero`: the install was of zeros (no file read); with `by_reader`, it
  // chooses the fault's latency path.
  Served finish_install(const GuestLayout& layout, Worker& w, const kernel::IoctlResult& r, PageState installed,
                        const PageLocation& loc, const QueuedFault& fault, bool count, bool zero, bool by_reader);
  std::vector<const Worker*> all_workers() const;
  void handle_remove(const kernel::RemoveEvent& ev);
  // UNMAP / REMAP: record the pages as removed (UNMAP) and publish a new layout.
  void handle_unmap(const kernel::UnmapEvent& ev);
  void handle_remap(const kernel::RemapEvent& ev);
  void publish(GuestLayout next);
  // Wakes the threads waiting on the page that holds `address`.
  void wake_page(const GuestLayout& layout, uint64_t address);
  // Wakes every thread waiting on any mapped page (the session has ended).
  void wake_everything();
  // Whether any demand fault is queued or deferred.
  bool demand_pending() const;
  void end(SessionEnd reason, std::string error = {});
  void finish();
  // A demand fault's own page, staged, through the installer (fence slot
  // `slot`, or PageInstaller::kReaderUnfenced for the event reader).
  PageInstaller::Result install_fault_page(size_t slot, const PageLocation& loc, const uint8_t* staged, bool protect,
                                           bool write, int inject_errno);
  // Whether the snapshot holds zeros there (the zero index or the source's
  // own extents): installed without reading.
  bool snapshot_known_zero(uint64_t offset, uint64_t length) const;
  // source_->read(), retrying retryable errors (SessionConfig::source_retry_deadline).
  Status read_source(uint64_t offset, std::span<uint8_t> out);
  // The same for a demand fault's window: source_->read_window() (a window
  // of pages of window_page_size bytes; the bytes read, at least the first
  // page's), or source_->read() of all of `out` when window_page_size is 0.
  Result<uint64_t> read_source_window(uint64_t offset, std::span<uint8_t> out, uint64_t window_page_size);
  bool recording() const { return config_.record_first_touches || !config_.record_path.empty(); }

  const SessionConfig config_;
  const Logger& log_;
  protocol::Handshake handshake_;
  kernel::Userfaultfd uffd_;
  kernel::PeerProcess peer_;
  // Published by the reader (the only writer), read lock-free by the other
  // session threads, each in its own slot (their fence slots): workers
  // 0..N-1, prefault() N, prefetch threads N+1... Old layouts are freed once
  // no slot can still read them (see published_layout.h).
  std::unique_ptr<PublishedLayout> layout_;
  std::shared_ptr<const PageSource> source_;
  std::unique_ptr<PageStateTable> pages_;
  std::vector<bool> region_wp_;  // per region: registered MISSING|WP
  bool any_wp_ = false;
  std::unique_ptr<uint8_t[], void (*)(void*)> zero_page_{nullptr, nullptr};
  bool watch_socket_eof_ = false;

  std::vector<std::unique_ptr<Worker>> workers_;
  std::unique_ptr<Worker> reader_worker_;  // stats and buffer of the faults the reader serves itself
  std::unique_ptr<class InstallFence> fence_;
  std::unique_ptr<PageInstaller> installer_;  // every install of snapshot bytes or zeros goes through it
  std::thread reader_;
  UniqueFd stop_efd_;
  UniqueFd finished_efd_;

  std::atomic<bool> stopping_{false};
  std::atomic<bool> finished_{false};
  bool launched_ = false;  // launch() succeeded: the destructor stops and joins, and finish() logs
  mutable std::mutex end_mu_;
  SessionEnd end_reason_ = SessionEnd::kRunning;  // GUARDED_BY(end_mu_)
  std::string end_error_;                         // GUARDED_BY(end_mu_)
  bool peer_killed_ = false;                      // GUARDED_BY(end_mu_)
  std::atomic<uint64_t> removes_{0};
  std::atomic<uint64_t> removed_pages_{0};
  std::atomic<uint64_t> faults_read_{0};
  std::atomic<uint64_t> prefaulted_pages_{0};
  std::atomic<uint64_t> prefaulted_bytes_{0};  // for metrics
  std::atomic<uint64_t> prefetch_late_{0};
  std::atomic<bool> prefetching_{false};
  std::atomic<uint64_t> busy_poll_reads_{0};
  std::atomic<uint64_t> source_retries_{0};
  std::atomic<uint64_t> ahead_faulted_{0};
  std::atomic<uint64_t> stale_faults_{0};
  std::atomic<uint64_t> readahead_pages_{0};
  FaultAround fault_around_;
  std::thread prefetcher_;
  mutable std::mutex record_mu_;
  std::vector<uint64_t> first_touches_;  // GUARDED_BY(record_mu_): file offsets, first-touch order
  WakeSignal reader_progress_;  // bumped after every batch the reader reads
  std::mutex prefault_mu_;
  // prefault() in fence slot `slot`: prefault() uses one of its own, each
  // prefetch thread another, so that they may run at once.
  Result<PrefaultReport> prefault_in_slot(std::span<const uint64_t> page_indexes, const PrefaultOptions& options,
                                          size_t slot);
  std::chrono::steady_clock::time_point started_;
  std::atomic<int64_t> finished_ns_{0};
  std::once_flag finish_once_;
  MetricsSource metrics_source_{*this};
};

template <typename Body>
void Session::run_guarded(const char* thread_kind, Body&& body) noexcept {
  try {
    body();
  } catch (const std::exception& e) {
    fatal_exception(thread_kind, e.what());
  } catch (...) {
    fatal_exception(thread_kind, "an exception of unknown type");
  }
}

}  // namespace faultline
