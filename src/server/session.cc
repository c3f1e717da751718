// Session, part one: its life (start, end, summary), the event reader and the
// install workers. Part two, session_prefetch.cc: prefault(), the --prefetch
// threads and the first-touch record.
#include "server/session.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <new>
#include <system_error>

#include "common/deadline.h"
#include "metrics/fault_metrics.h"
#include "server/fault_ring.h"
#include "server/install_fence.h"
#include "server/session_threads.h"
#include "server/test_hooks.h"
#include "server/wake_signal.h"

namespace faultline {

const char* to_string(OnFatal v) { return v == OnFatal::kKill ? "kill" : "leave"; }

const char* to_string(SessionEnd e) {
  switch (e) {
    case SessionEnd::kRunning: return "running";
    case SessionEnd::kPeerExited: return "peer_exited";
    case SessionEnd::kSocketClosed: return "socket_closed";
    case SessionEnd::kPeerGone: return "peer_gone";
    case SessionEnd::kStopped: return "stopped";
    case SessionEnd::kFatal: return "fatal";
  }
  return "?";
}

using session_detail::hex;
using session_detail::injected_setup_failure;
using session_detail::name_this_thread;
using session_detail::start_thread;

namespace {

// Enough for every vCPU thread of any VM to have a fault outstanding; the
// reader spills to an overflow list beyond it rather than stop draining.
constexpr size_t kRingCapacity = 1024;
constexpr size_t kReadBatch = 64;
constexpr size_t kDeferredReserve = 1024;
// Readaheads a worker holds at most (one per stream it serves; the oldest
// goes first: the guest has most likely passed it).
constexpr size_t kMaxReadahead = 8;
// While busy-polling, one turn in this many polls every fd and yields; the
// others only read the uffd.
constexpr uint64_t kSpinPollTurns = 4;

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

// Worker::layout_slot of the reader's own serving: it publishes layouts, so
// it reads the current one without a slot.
constexpr size_t kNoReadSlot = SIZE_MAX;

// aligned_alloc, or null when it fails (or a test injects its failure).
uint8_t* allocate_aligned(const char* what, uint64_t bytes) {
  if (injected_setup_failure(what) != 0) return nullptr;
  return static_cast<uint8_t*>(std::aligned_alloc(4096, bytes));
}

// An eventfd, or -1 with errno set.
int make_eventfd(const char* what) {
  if (const int injected = injected_setup_failure(what); injected != 0) {
    errno = injected;
    return -1;
  }
  return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

}  // namespace

struct Session::Worker {
  // The page buffer is allocated (and checked) by launch().
  Worker(size_t i, size_t slot) : index(i), layout_slot(slot), ring(kRingCapacity) {
    deferred.reserve(kDeferredReserve);
  }
  size_t index;
  size_t layout_slot;  // its read slot in layout_ (kNoReadSlot: the reader's own, which needs none)
  FaultRing<QueuedFault> ring;
  WakeSignal signal;
  // Staged snapshot bytes: one page of the largest size, or a whole
  // fault-around window of 4 KiB pages if that is larger.
  std::unique_ptr<uint8_t, FreeDeleter> buffer;
  std::vector<QueuedFault> deferred;             // faults that hit EAGAIN; owned by the worker thread
  std::deque<QueuedFault> readahead;             // readaheads to install when no fault waits; worker-owned
  std::atomic<bool> deferred_empty{true};        // for demand_pending(), read by other threads
  uint64_t deferred_generation = 0;
  std::thread thread;
  std::atomic<uint64_t> pages_snapshot{0}, pages_zero{0}, bytes{0}, exists{0}, retries{0}, snapshot_zero{0};
  std::atomic<uint64_t> ahead{0};  // pages installed ahead by fault-around
  // For metrics, written only by this worker's thread: demand installs by
  // source (snapshot bytes or zeros; prefetch counts its own) and latency
  // histograms of the faults this thread served. A cache line of their own:
  // the reader writes `signal`, never these lines.
  alignas(64) std::array<std::atomic<uint64_t>, metrics::kInstallSources> installed_pages{};
  std::array<std::atomic<uint64_t>, metrics::kInstallSources> installed_bytes{};
  metrics::FaultLatencyShard latency;
};

Result<std::unique_ptr<Session>> Session::start(protocol::Handshake handshake,
                                                std::shared_ptr<const PageSource> source,
                                                const SessionConfig& config) {
  if (config.workers < 1) return fail("a session needs at least one worker");
  // Allocation failures become errors here: the session does not start and
  // the daemon goes on.
  try {
    auto layout = GuestLayout::create(handshake.regions, source->size());
    if (!layout) return std::unexpected(layout.error());
    std::unique_ptr<Session> session(new Session(std::move(handshake), std::move(*layout), std::move(source), config));
    if (auto st = session->launch(); !st) return std::unexpected(st.error());
    return session;
  } catch (const std::bad_alloc&) {
    return fail("not enough memory to set up the session", ENOMEM);
  }
}

Session::Session(protocol::Handshake handshake, GuestLayout initial_layout,
                 std::shared_ptr<const PageSource> source, const SessionConfig& config)
    : config_(config),
      log_(*config.logger),
      handshake_(std::move(handshake)),
      uffd_(std::move(handshake_.uffd)),
      source_(std::move(source)),
      fault_around_(config.fault_around_pages, config.fault_around_readahead),
      started_(std::chrono::steady_clock::now()) {
  // Read slots as fence slots: one per worker, one for prefault(), one per
  // prefetch thread.
  const size_t prefetch_threads = static_cast<size_t>(std::max(1, config_.prefetch_threads));
  layout_ = std::make_unique<PublishedLayout>(std::move(initial_layout),
                                              static_cast<size_t>(config_.workers) + 1 + prefetch_threads);

  // The pidfd taken when the VM connected, so that a pid reused since then
  // is never watched or killed; a handshake received without one (tests,
  // tools) falls back to pidfd_open.
  if (handshake_.peer_pidfd) {
    peer_ = kernel::PeerProcess::adopt(handshake_.peer.pid, std::move(handshake_.peer_pidfd));
  } else if (auto p = kernel::PeerProcess::open(handshake_.peer.pid)) {
    peer_ = std::move(*p);
  } else {
    log_.warn("peer_pidfd_failed", {{"session", config_.id}, {"pid", handshake_.peer.pid},
                                    {"error", p.error().describe()}});
  }
}

Status Session::launch() {
  const char* step = "";
  // For session_start: once the reader runs, the initial layout may be freed.
  size_t region_count = 0;
  uint64_t guest_bytes = 0, first_page_size = 0;
  try {
    const GuestLayout& initial = layout_->current_for_writer();  // no thread runs yet
    region_count = initial.regions().size();
    guest_bytes = initial.total_bytes();
    first_page_size = initial.regions().front().page_size;
    step = "stop eventfd";
    if (const int fd = make_eventfd(step); fd >= 0) {
      stop_efd_.reset(fd);
    } else {
      return fail_errno("setting up the session: creating its stop eventfd failed");
    }
    step = "finished eventfd";
    if (const int fd = make_eventfd(step); fd >= 0) {
      finished_efd_.reset(fd);
    } else {
      return fail_errno("setting up the session: creating its finished eventfd failed");
    }

    step = "page-state table";
    if (const int injected = injected_setup_failure(step); injected != 0) throw std::bad_alloc();
    pages_ = std::make_unique<PageStateTable>(initial.page_count());

    uint64_t max_page = kPageSize4K;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    ranges.reserve(initial.regions().size());
    for (const GuestRegion& r : initial.regions()) {
      max_page = std::max(max_page, r.page_size);
      ranges.emplace_back(r.base_host_virt_addr, r.size);
    }
    // The uffd cannot tell which modes the client registered; smaps can (one
    // read for every region: a handshake may carry thousands).
    auto wp = kernel::ranges_registered_for_wp(handshake_.peer.pid, ranges);
    if (!wp) {
      // Reading another user's smaps needs CAP_SYS_PTRACE (docs/operations.md),
      // and a peer in another pid namespace has none we can read. Served as
      // not WP: pages are installed writable, so a client that did register
      // WP gets every present page reported dirty, never a lost write.
      log_.warn("write_protect_unknown", {{"session", config_.id}, {"pid", handshake_.peer.pid},
                                          {"error", wp.error().describe()}});
    }
    region_wp_ = wp ? std::move(*wp) : std::vector<bool>(ranges.size(), false);
    any_wp_ = std::find(region_wp_.begin(), region_wp_.end(), true) != region_wp_.end();
    step = "zero page";
    zero_page_ = std::unique_ptr<uint8_t[], void (*)(void*)>(allocate_aligned(step, max_page), std::free);
    if (!zero_page_) {
      return fail("setting up the session: allocating its " + std::to_string(max_page) + "-byte zero page failed",
                  ENOMEM);
    }
    std::memset(zero_page_.get(), 0, max_page);

    // Firecracker >= 1.12 (the format with both page-size fields) keeps its end
    // of the socket open for its whole life, so EOF there means it exited.
    // Older versions close right after sending: EOF means nothing.
    watch_socket_eof_ = handshake_.format == protocol::HandshakeFormat::kBothFields && !handshake_.peer_closed;

    // One fence slot per worker, one for prefault(), one per prefetch thread.
    step = "install fence";
    fence_ = std::make_unique<InstallFence>(static_cast<size_t>(config_.workers) + 1 +
                                            static_cast<size_t>(std::max(1, config_.prefetch_threads)));
    installer_ = std::make_unique<PageInstaller>(uffd_, *fence_, *pages_, zero_page_.get());
    step = "worker page buffer";
    const uint64_t window_bytes = static_cast<uint64_t>(std::max(1u, fault_around_.max_pages())) * kPageSize4K;
    const uint64_t buffer_bytes = std::max(max_page, window_bytes);
    for (int i = 0; i < config_.workers; ++i) {
      workers_.push_back(std::make_unique<Worker>(i, i));
      workers_.back()->buffer.reset(allocate_aligned(step, buffer_bytes));
      if (!workers_.back()->buffer) {
        return fail("setting up the session: allocating worker " + std::to_string(i) + "'s " +
                        std::to_string(buffer_bytes) + "-byte page buffer failed",
                    ENOMEM);
      }
    }
    // The reader's own stats and page buffer, for the faults it serves itself
    // (4 KiB pages only, with their fault-around window).
    reader_worker_ = std::make_unique<Worker>(workers_.size(), kNoReadSlot);
    reader_worker_->buffer.reset(allocate_aligned(step, window_bytes));
    if (!reader_worker_->buffer) {
      return fail("setting up the session: allocating the event reader's page buffer failed", ENOMEM);
    }
    // Before any thread starts: the reader appends to it.
    step = "record list";
    if (recording()) first_touches_.reserve(std::min<uint64_t>(initial.page_count(), 1 << 20));

    const std::string id = std::to_string(config_.id);
    step = "worker thread";
    for (auto& w : workers_) {
      w->thread = start_thread(step, [this, wp = w.get(), id] {
        run_guarded("install worker", [&] {
          name_this_thread("fl-w" + id + "." + std::to_string(wp->index));
          worker_loop(*wp);
        });
      });
    }
    step = "reader thread";
    reader_ = start_thread(step, [this, id] {
      run_guarded("event reader", [&] {
        name_this_thread("fl-r" + id);
        reader_loop();
      });
    });
    if (config_.prefetch || config_.prefetch_all) {
      step = "prefetch thread";
      prefetching_.store(true, std::memory_order_release);
      prefetcher_ = start_thread(step, [this, id] {
        run_guarded("prefetch thread", [&] {
          name_this_thread("fl-p" + id);
          prefetch_loop();
        });
        prefetching_.store(false, std::memory_order_release);
      });
    }
  } catch (const std::system_error& e) {
    abort_launch();
    return fail(std::string("setting up the session: ") + step + " failed (" + e.what() + ")", e.code().value());
  } catch (const std::bad_alloc&) {
    abort_launch();
    return fail(std::string("setting up the session: not enough memory for its ") + step, ENOMEM);
  }
  launched_ = true;

  // Scrapes read this session's counters from now on, until finish() folds them.
  if (config_.metrics) config_.metrics->session_started(metrics_source_);
  log_.info("session_start", {{"session", config_.id},
                              {"pid", handshake_.peer.pid},
                              {"regions", region_count},
                              {"guest_bytes", guest_bytes},
                              {"page_size", first_page_size},
                              {"format", protocol::to_string(handshake_.format)},
                              {"write_protect", any_wp_},
                              {"workers", config_.workers},
                              {"extra_fds", handshake_.extra_fds.size()},
                              {"socket", config_.socket},
                              {"serves", config_.serves}});
  return {};
}

void Session::abort_launch() {
  // Nothing of this session was announced: stop what started, quietly (no
  // session_end line, no kill: the caller decides about the peer).
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  if (stop_efd_) (void)!::write(stop_efd_.get(), &one, sizeof one);
  for (auto& w : workers_) w->signal.notify();
  reader_progress_.notify();
  if (prefetcher_.joinable()) prefetcher_.join();
  if (reader_.joinable()) reader_.join();
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void Session::fatal_exception(const char* thread_kind, const char* what) noexcept {
  try {
    end(SessionEnd::kFatal, std::string("the ") + thread_kind + " stopped on an unexpected exception: " + what);
    return;
  } catch (...) {
  }
  // Even the message could not be built (out of memory): end without it.
  // The other threads see stopping_ and exit; wait() wakes every fault.
  {
    std::lock_guard lock(end_mu_);
    if (end_reason_ == SessionEnd::kRunning) {
      end_reason_ = SessionEnd::kFatal;
      if (config_.on_fatal == OnFatal::kKill && !peer_.exited()) {
        try {
          peer_killed_ = peer_.kill().has_value();
        } catch (...) {
        }
      }
    }
  }
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  (void)!::write(stop_efd_.get(), &one, sizeof one);
  for (auto& w : workers_) w->signal.notify();
  reader_progress_.notify();
}

Session::~Session() {
  if (!launched_) return;  // launch() failed and already joined what it had started
  stop();
  wait();
}

void Session::stop() { end(SessionEnd::kStopped); }

void Session::end(SessionEnd reason, std::string error) {
  bool kill = false;
  {
    std::lock_guard lock(end_mu_);
    if (end_reason_ != SessionEnd::kRunning) return;
    end_reason_ = reason;
    end_error_ = std::move(error);
    // The guest cannot be served any more but still runs: killing it is the
    // only way not to leave it hanging on a fault forever.
    kill = (reason == SessionEnd::kFatal || reason == SessionEnd::kStopped) && config_.on_fatal == OnFatal::kKill &&
           !peer_.exited();
    if (kill) peer_killed_ = peer_.kill().has_value();
  }
  if (reason == SessionEnd::kFatal) {
    log_.error("session_fatal", {{"session", config_.id}, {"pid", handshake_.peer.pid}, {"error", end_error_},
                                 {"peer_killed", peer_killed_}, {"on_fatal", to_string(config_.on_fatal)}});
  }
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  (void)!::write(stop_efd_.get(), &one, sizeof one);
  for (auto& w : workers_) w->signal.notify();
  reader_progress_.notify();
}

void Session::wait() {
  if (prefetcher_.joinable()) prefetcher_.join();
  if (reader_.joinable()) reader_.join();
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  std::call_once(finish_once_, [this] {
    wake_everything();
    finish();
  });
}

void Session::finish() {
  finished_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started_)
                         .count(),
                     std::memory_order_release);
  SessionSummary s = summary();
  if (config_.metrics) {
    // Every thread has been joined: these counts are final. Folding them in
    // also takes the session out of the live set, in one step, so a scrape
    // counts it exactly once whichever comes first.
    const metrics::SessionCounts final_counts = metrics_counts();
    HookContext hook;
    FAULTLINE_HOOK(HookPoint::kBeforeMetricsFold, hook);
    config_.metrics->session_ended(metrics_source_, to_string(s.end), final_counts);
  }
  if (!config_.record_path.empty()) {
    std::string path = config_.record_path;
    if (auto at = path.find("{session}"); at != std::string::npos) path.replace(at, 9, std::to_string(config_.id));
    if (auto st = write_record(path); st) {
      log_.info("record_written", {{"session", s.id}, {"path", path}, {"pages", recorded_pages()}});
    } else {
      log_.error("record_failed", {{"session", s.id}, {"path", path}, {"error", st.error().describe()}});
    }
  }
  log_.log(LogLevel::kInfo, "session_end", summary_fields(s));
  finished_.store(true, std::memory_order_release);
  uint64_t one = 1;
  (void)!::write(finished_efd_.get(), &one, sizeof one);
}

std::vector<LogField> summary_fields(const SessionSummary& s) {
  std::vector<LogField> f{{"session", s.id},
                          {"pid", static_cast<int64_t>(s.peer_pid)},
                          {"state", to_string(s.end)},
                          {"write_protect", s.write_protect},
                          {"faults", s.counters.faults},
                          {"reader_served", s.counters.reader_served},
                          {"busy_poll_reads", s.counters.busy_poll_reads},
                          {"source_retries", s.counters.source_retries},
                          {"ahead_pages", s.counters.ahead_pages},
                          {"ahead_faulted", s.counters.ahead_faulted},
                          {"readahead_pages", s.counters.readahead_pages},
                          {"stale_faults", s.counters.stale_faults},
                          {"pages_snapshot", s.counters.pages_snapshot},
                          {"pages_zero", s.counters.pages_zero},
                          {"snapshot_zero_pages", s.counters.snapshot_zero_pages},
                          {"bytes", s.counters.bytes_installed},
                          {"already_present", s.counters.already_present},
                          {"retries", s.counters.retries},
                          {"removes", s.counters.removes},
                          {"removed_pages", s.counters.removed_pages},
                          {"prefaulted_pages", s.counters.prefaulted_pages},
                          {"prefetch_late", s.counters.prefetch_late},
                          {"seconds", s.seconds}};
  if (s.end != SessionEnd::kRunning) f.emplace_back("peer_killed", s.peer_killed);
  f.emplace_back("socket", s.socket);
  f.emplace_back("serves", s.serves);
  return f;
}

SessionSummary Session::summary() const {
  SessionSummary s;
  s.id = config_.id;
  s.peer_pid = handshake_.peer.pid;
  s.socket = config_.socket;
  s.serves = config_.serves;
  {
    std::lock_guard lock(end_mu_);
    s.end = end_reason_;
    s.error = end_error_;
    s.peer_killed = peer_killed_;
  }
  s.write_protect = any_wp_;
  s.counters.faults = faults_read_.load(std::memory_order_relaxed);
  s.counters.removes = removes_.load(std::memory_order_relaxed);
  s.counters.removed_pages = removed_pages_.load(std::memory_order_relaxed);
  s.counters.prefaulted_pages = prefaulted_pages_.load(std::memory_order_relaxed);
  s.counters.prefetch_late = prefetch_late_.load(std::memory_order_relaxed);
  s.counters.busy_poll_reads = busy_poll_reads_.load(std::memory_order_relaxed);
  s.counters.source_retries = source_retries_.load(std::memory_order_relaxed);
  s.counters.ahead_faulted = ahead_faulted_.load(std::memory_order_relaxed);
  s.counters.readahead_pages = readahead_pages_.load(std::memory_order_relaxed);
  s.counters.stale_faults = stale_faults_.load(std::memory_order_relaxed);
  for (const Worker* w : all_workers()) {
    s.counters.pages_snapshot += w->pages_snapshot.load(std::memory_order_relaxed);
    s.counters.pages_zero += w->pages_zero.load(std::memory_order_relaxed);
    s.counters.bytes_installed += w->bytes.load(std::memory_order_relaxed);
    s.counters.already_present += w->exists.load(std::memory_order_relaxed);
    s.counters.retries += w->retries.load(std::memory_order_relaxed);
    s.counters.snapshot_zero_pages += w->snapshot_zero.load(std::memory_order_relaxed);
    s.counters.ahead_pages += w->ahead.load(std::memory_order_relaxed);
  }
  if (reader_worker_) {
    s.counters.reader_served = reader_worker_->pages_snapshot.load(std::memory_order_relaxed) -
                               reader_worker_->ahead.load(std::memory_order_relaxed) +
                               reader_worker_->pages_zero.load(std::memory_order_relaxed) +
                               reader_worker_->exists.load(std::memory_order_relaxed);
  }
  const int64_t ns = finished_ns_.load(std::memory_order_acquire);
  s.seconds = ns > 0 ? static_cast<double>(ns) / 1e9
                     : std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  return s;
}

metrics::SessionCounts Session::metrics_counts() const {
  metrics::SessionCounts c;
  c.faults = faults_read_.load(std::memory_order_relaxed);
  c.removes = removes_.load(std::memory_order_relaxed);
  c.removed_pages = removed_pages_.load(std::memory_order_relaxed);
  c.ahead_faulted = ahead_faulted_.load(std::memory_order_relaxed);
  constexpr size_t kPrefetch = static_cast<size_t>(metrics::InstallSource::kPrefetch);
  c.installed_pages[kPrefetch] = prefaulted_pages_.load(std::memory_order_relaxed);
  c.installed_bytes[kPrefetch] = prefaulted_bytes_.load(std::memory_order_relaxed);
  auto add = [&](const Worker& w) {
    c.already_present += w.exists.load(std::memory_order_relaxed);
    c.eagain_retries += w.retries.load(std::memory_order_relaxed);
    for (size_t src = 0; src < w.installed_pages.size(); ++src) {
      c.installed_pages[src] += w.installed_pages[src].load(std::memory_order_relaxed);
      c.installed_bytes[src] += w.installed_bytes[src].load(std::memory_order_relaxed);
    }
    w.latency.add_to(c.latency);
  };
  // Not all_workers(): a scrape allocates nothing it need not.
  for (const auto& w : workers_) add(*w);
  if (reader_worker_) add(*reader_worker_);
  return c;
}

void Session::MetricsSource::collect(metrics::SessionCounts& into) const {
  HookContext hook;
  FAULTLINE_HOOK(HookPoint::kMetricsCollect, hook);
  into += session_.metrics_counts();
}

Session::MemoryUse Session::memory_use() const {
  MemoryUse m;
  m.page_state_bytes = pages_->size() * PageStateTable::kBytesPerPage;
  uint64_t max_page = kPageSize4K;
  for (const GuestRegion& r : layout()->regions()) max_page = std::max(max_page, r.page_size);
  m.buffer_bytes = max_page;  // the zero page
  const uint64_t window_bytes = static_cast<uint64_t>(std::max(1u, fault_around_.max_pages())) * kPageSize4K;
  for (const Worker* w : all_workers()) {
    m.buffer_bytes += sizeof(Worker) + kRingCapacity * sizeof(QueuedFault) +
                      (w == reader_worker_.get() ? window_bytes : std::max(max_page, window_bytes)) +
                      kDeferredReserve * sizeof(QueuedFault);
  }
  {
    std::lock_guard lock(record_mu_);
    m.record_bytes = first_touches_.capacity() * sizeof(uint64_t);
  }
  return m;
}

// --- event reader --------------------------------------------------------

void Session::publish(GuestLayout next) { layout_->publish(std::move(next)); }

void Session::handle_unmap(const kernel::UnmapEvent& ev) {
  // The range is gone: its pages will never be faulted again, and nothing
  // (prefetch included) may install them.
  const GuestLayout& layout = layout_->current_for_writer();  // the reader publishes: it needs no read slot
  for (const PageRange& r : layout.whole_pages_in(ev.start, ev.end)) {
    for (uint64_t p = r.first_page; p < r.first_page + r.page_count; ++p) pages_->mark_removed(p);
  }
  publish(layout.unmapped(ev.start, ev.end));
  log_.info("guest_unmap", {{"session", config_.id}, {"start", hex(ev.start)}, {"end", hex(ev.end)}});
}

void Session::handle_remap(const kernel::RemapEvent& ev) {
  // mremap moved the pages, contents and all: same page states, new addresses.
  publish(layout_->current_for_writer().remapped(ev.from, ev.to, ev.len));
  log_.info("guest_remap",
            {{"session", config_.id}, {"from", hex(ev.from)}, {"to", hex(ev.to)}, {"len", ev.len}});
}

void Session::handle_remove(const kernel::RemoveEvent& ev) {
  uint64_t pages = 0;
  for (const PageRange& r : layout_->current_for_writer().whole_pages_in(ev.start, ev.end)) {
    for (uint64_t p = r.first_page; p < r.first_page + r.page_count; ++p) pages_->mark_removed(p);
    pages += r.page_count;
  }
  removes_.fetch_add(1, std::memory_order_relaxed);
  removed_pages_.fetch_add(pages, std::memory_order_relaxed);
}

void Session::reader_loop() {
  std::array<kernel::UffdEvent, kReadBatch> batch;
  std::vector<std::pair<size_t, QueuedFault>> overflow;  // faults a full ring could not take
  uint64_t generation = 0;
  int socket_fd = handshake_.connection.get();
  // The last fault at an address no region holds, once the layout has
  // changed: such a fault is woken (its thread retries against the new
  // layout), but the same page faulting again and again with no change in
  // between is registered memory the layout lacks (a region grown by mremap,
  // memory registered after an UNMAP), never served: fatal, not a livelock.
  struct {
    uint64_t page = 0;
    uint64_t changes = 0;
    uint32_t repeats = 0;
  } unknown_fault;
  constexpr uint32_t kUnknownFaultRepeats = 10000;

  // Busy-polling: until `busy_poll` has passed since the last event, poll()
  // does not sleep. A fault that arrives then is read at once; a sleeping
  // reader would first have to be woken, which costs a cross-CPU wake-up and
  // a context switch (most of a 4 KiB fault's round trip on this kind of
  // machine). An idle guest costs nothing: past the window the reader blocks.
  // The window restarts at each 4 KiB fault (see below); while polling the
  // reader yields its CPU to any other runnable thread (a vCPU, or the VMM
  // thread finishing a madvise).
  using Clock = std::chrono::steady_clock;
  Clock::time_point last_event = Clock::now() - config_.busy_poll;
  uint64_t spin_turns = 0;
  while (!stopping_.load(std::memory_order_acquire)) {
    std::array<pollfd, 4> fds{};
    fds[0] = {uffd_.fd(), POLLIN, 0};
    fds[1] = {stop_efd_.get(), POLLIN, 0};
    fds[2] = {peer_.pidfd(), POLLIN, 0};
    fds[3] = {watch_socket_eof_ ? socket_fd : -1, POLLIN | POLLRDHUP, 0};
    const bool spinning = config_.busy_poll.count() > 0 && Clock::now() - last_event < config_.busy_poll;
    // While spinning, most turns read the uffd straight away (a read that
    // finds nothing returns at once: the uffd is non-blocking, as
    // Firecracker creates it): a fault is read one system call sooner than
    // by poll() and then read(). Every kSpinPollTurns-th turn polls every fd
    // (stop, peer exit, socket EOF) and yields the CPU.
    const bool spin_read = spinning && overflow.empty() && ++spin_turns % kSpinPollTurns != 0;
    int rc = 1;
    if (spin_read) {
      fds[0].revents = POLLIN;
    } else {
      rc = ::poll(fds.data(), fds.size(), spinning ? 0 : overflow.empty() ? -1 : 1);
      if (rc == 0 && spinning && overflow.empty()) {
        ::sched_yield();
        continue;
      }
    }
    bool count_busy_poll_read = spinning && rc > 0 && (fds[0].revents & POLLIN);
    if (rc < 0) {
      if (errno == EINTR) continue;
      end(SessionEnd::kFatal, std::string("poll failed: ") + std::strerror(errno));
      break;
    }
    if (fds[1].revents) break;
    if (fds[3].revents) {
      char buf[256];
      const ssize_t n = ::recv(socket_fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        end(SessionEnd::kSocketClosed);
        break;
      }
      // Firecracker sends nothing after the handshake; stray bytes are ignored.
    }
    // After the socket: an exiting process's files are released (its socket
    // reaches EOF) before its exit is signalled on the pidfd, so when a turn
    // finds both ready (busy-polling looks at them every few turns), the
    // socket closed first.
    if (fds[2].revents & POLLIN) {
      end(SessionEnd::kPeerExited);
      break;
    }
    if (fds[0].revents & (POLLIN | POLLERR)) {
      for (;;) {
        HookContext reader_hook;
        FAULTLINE_HOOK(HookPoint::kReaderBeforeRead, reader_hook);
        bool removed_in_batch = false;
        fence_->begin_read();
        auto n = uffd_.read_events(batch);
        // Every message of the batch was read by this one read(): one clock
        // read stamps them all.
        const int64_t read_ns = config_.record_fault_latency ? metrics::now_ns() : 0;
        // REMOVEs are recorded before any snapshot install may run again.
        // So are UNMAPs and REMAPs, before any fault of the batch is located:
        // a fault at a remapped address is read before its REMAP event.
        if (n) {
          for (size_t i = 0; i < *n; ++i) {
            if (auto* rm = std::get_if<kernel::RemoveEvent>(&batch[i])) {
              handle_remove(*rm);
              removed_in_batch = true;
            }
            if (auto* um = std::get_if<kernel::UnmapEvent>(&batch[i])) handle_unmap(*um);
            if (auto* mv = std::get_if<kernel::RemapEvent>(&batch[i])) handle_remap(*mv);
          }
        }
        fence_->end_read();
        if (!n) {
          end(SessionEnd::kFatal, n.error().describe());
          break;
        }
        if (*n == 0) break;
        if (count_busy_poll_read) {
          busy_poll_reads_.fetch_add(1, std::memory_order_relaxed);
          count_busy_poll_read = false;
        }
        ++generation;
        for (size_t i = 0; i < *n; ++i) {
          if (auto* f = std::get_if<kernel::PageFault>(&batch[i])) {
            faults_read_.fetch_add(1, std::memory_order_relaxed);
            auto loc = layout_->current_for_writer().locate(f->address);
            // Only 4 KiB faults restart the busy-poll window: they are served
            // in microseconds, so the vCPU's next fault comes soon. A 2 MiB
            // install takes hundreds, and polling meanwhile only takes a CPU
            // from the worker copying it.
            if (loc && loc->page_size == kPageSize4K) last_event = Clock::now();
            if (!loc) {
              // Either the range was unmapped or moved away after the thread
              // faulted (its retry then sees the new mapping, or none), or the
              // client registered memory it never described.
              const uint64_t changes = layout_->changes();
              if (changes > 0) {
                const uint64_t page = f->address & ~(kPageSize4K - 1);
                if (page == unknown_fault.page && changes == unknown_fault.changes) {
                  ++unknown_fault.repeats;
                } else {
                  unknown_fault = {page, changes, 1};
                }
                if (unknown_fault.repeats < kUnknownFaultRepeats) {
                  wake_page(layout_->current_for_writer(), f->address);
                  continue;
                }
                end(SessionEnd::kFatal, "fault at " + hex(f->address) + " lies outside every region (after " +
                                            std::to_string(changes) + " layout changes), " +
                                            std::to_string(kUnknownFaultRepeats) +
                                            " times with no change in between: the client registered memory it "
                                            "did not describe (a region grown by mremap?)");
                break;
              }
              end(SessionEnd::kFatal, "fault at " + hex(f->address) +
                                          " lies outside every region of the handshake: the client registered "
                                          "memory it did not describe");
              break;
            }
            QueuedFault q{f->address, f->write, f->wp, false, read_ns};
            q.removals = pages_->removals(loc->page_index);
            if (pages_->mark_touched(loc->page_index)) {
              // First touch since restore: record it, and count it as late
              // if prefetch planned the page but had not installed it yet.
              if (pages_->planned(loc->page_index) && pages_->state(loc->page_index) == PageState::kUntouched) {
                prefetch_late_.fetch_add(1, std::memory_order_relaxed);
                q.prefetch_late = true;
              }
              if (recording()) {
                std::lock_guard lock(record_mu_);
                first_touches_.push_back(loc->file_offset);
              }
            }
            if (config_.reader_serves_cached && serve(*reader_worker_, q, true) == Served::kDone) continue;
            const size_t w = loc->page_index % workers_.size();
            if (!overflow.empty() || !workers_[w]->ring.push(q)) overflow.emplace_back(w, q);
            workers_[w]->signal.notify();
          } else if (auto* fk = std::get_if<kernel::ForkEvent>(&batch[i])) {
            // The child's uffd arrived as a new fd in our table. Closing it
            // unregisters the child's ranges: it faults like plain memory.
            ::close(fk->child_uffd);
            log_.error("fork_refused", {{"session", config_.id},
                                        {"error", "the VM process forked with UFFD_FEATURE_EVENT_FORK; faultline "
                                                  "serves only the original process"}});
          } else if (auto* u = std::get_if<kernel::UnknownEvent>(&batch[i])) {
            end(SessionEnd::kFatal, "unknown userfaultfd event " + std::to_string(u->event));
          }
        }
        // The thread that madvise()d is waiting to be woken by this read and
        // needs a CPU to finish: sleep instead of polling (a fault later in
        // the batch would have restarted the window).
        if (removed_in_batch) last_event = Clock::time_point{};
        // Faults deferred on EAGAIN (and prefaults) can make progress now
        // that events were read. Only workers holding deferred faults are
        // woken: waking idle ones would cost a context switch per batch.
        for (auto& w : workers_) {
          if (!w->deferred_empty.load(std::memory_order_acquire)) w->signal.notify();
        }
        reader_progress_.notify();
        // A layout a worker was still reading at the last UNMAP/REMAP can
        // usually be freed by now.
        if (layout_->retained() > 1) layout_->reclaim();
        if (stopping_.load(std::memory_order_acquire)) break;
      }
    }
    // Hand spilled faults to their workers as rings drain, in arrival order.
    size_t kept = 0;
    for (auto& [w, f] : overflow) {
      if (kept > 0 || !workers_[w]->ring.push(f)) overflow[kept++] = {w, f};
      workers_[w]->signal.notify();
    }
    overflow.resize(kept);
  }
  // Faults read but never handed over must not be forgotten: wake their
  // threads so they fault again (the message goes back into the uffd).
  for (auto& [w, f] : overflow) wake_page(layout_->current_for_writer(), f.address);
  (void)generation;
}

// --- install workers -----------------------------------------------------

std::vector<const Session::Worker*> Session::all_workers() const {
  std::vector<const Worker*> out;
  for (const auto& w : workers_) out.push_back(w.get());
  if (reader_worker_) out.push_back(reader_worker_.get());
  return out;
}

void Session::wake_page(const GuestLayout& layout, uint64_t address) {
  if (auto loc = layout.locate(address)) {
    (void)uffd_.wake(loc->address, loc->page_size);
  } else {
    (void)uffd_.wake(address & ~(kPageSize4K - 1), kPageSize4K);
  }
}

void Session::wake_everything() {
  // A fault a thread was handling when the session ended (an exception, or
  // a fault read in the batch the reader was working on) may have been
  // dropped: waking every mapped page releases its thread. It faults again
  // and the message waits in the uffd for whoever serves next; waking a page
  // nobody waits on does nothing. Every session thread has exited here.
  if (!launched_) return;
  for (const Segment& g : layout_->current_for_writer().segments()) (void)uffd_.wake(g.base, g.size);
}

bool Session::snapshot_known_zero(uint64_t offset, uint64_t length) const {
  return (config_.zero_index && config_.zero_index->is_zero(offset, length)) || source_->known_zero(offset, length);
}

Status Session::read_source(uint64_t offset, std::span<uint8_t> out) {
  auto r = read_source_window(offset, out, 0);
  if (!r) return std::unexpected(r.error());
  return {};
}

Result<uint64_t> Session::read_source_window(uint64_t offset, std::span<uint8_t> out, uint64_t window_page_size) {
  const auto deadline = std::chrono::steady_clock::now() + config_.source_retry_deadline;
  // The store's requests and waits on the way give up at the same deadline,
  // or at once when the session stops (common/deadline.h): a store that
  // never answers must not hold a fault past it.
  const ScopedDeadline scope(deadline_in(config_.source_retry_deadline), &stopping_);
  auto backoff = std::chrono::milliseconds{1};
  for (;;) {
    HookContext hook{offset, 0};
    FAULTLINE_HOOK(HookPoint::kSourceRead, hook);
    Result<uint64_t> s = uint64_t{0};
    if (hook.inject_errno) {
      s = std::unexpected(Error{hook.inject_errno, "injected source read failure", hook.inject_errno == EAGAIN});
    } else if (window_page_size != 0) {
      s = source_->read_window(offset, out, window_page_size, /*cached_only=*/false);
    } else if (Status read = source_->read(offset, out); read) {
      s = out.size();
    } else {
      s = std::unexpected(read.error());
    }
    if (s || !s.error().retryable) return s;
    // The source says this may pass (a store short of memory or fds, a
    // timeout): wait and try again rather than kill a VM over a hiccup, but
    // not forever: a guest thread is waiting on this page.
    if (stopping_.load(std::memory_order_acquire)) return s;
    if (std::chrono::steady_clock::now() + backoff > deadline) {
      return fail(s.error().message + " (retried for " + std::to_string(config_.source_retry_deadline.count()) +
                      " ms)",
                  s.error().code);
    }
    source_retries_.fetch_add(1, std::memory_order_relaxed);
    log_.debug("source_read_retry", {{"session", config_.id}, {"offset", offset}, {"error", s.error().describe()}});
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds{100});
  }
}

PageInstaller::Result Session::install_fault_page(size_t slot, const PageLocation& loc, const uint8_t* staged,
                                                  bool protect, bool write, int inject_errno) {
  return installer_->install_run({.slot = slot,
                                  .first_page = loc.page_index,
                                  .address = loc.address,
                                  .page_size = loc.page_size,
                                  .pages = 1,
                                  .staged = staged,
                                  .protect = protect,
                                  .write = write,
                                  .demand = true,
                                  .inject_errno = inject_errno});
}

PageInstaller::Result Session::install_window(Worker& w, size_t slot, const PageLocation& loc, uint64_t pages,
                                              const uint8_t* staged, bool protect, bool write, int inject_errno) {
  if (pages <= 1) return install_fault_page(slot, loc, staged, protect, write, inject_errno);
  // Neighbours are installed for a read: write-protected under a WP
  // registration, so that the guest's first write to one is recorded. When
  // the faulting page is not (a write fault), it goes first on its own and
  // its thread is woken before the neighbours are copied.
  const bool protect_ahead = region_wp_[loc.region];
  PageInstaller::Result run;
  uint64_t ahead = 0;
  if (protect_ahead == protect) {
    run = installer_->install_run({.slot = slot,
                                   .first_page = loc.page_index,
                                   .address = loc.address,
                                   .page_size = loc.page_size,
                                   .pages = pages,
                                   .staged = staged,
                                   .protect = protect,
                                   .write = write,
                                   .demand = true,
                                   .inject_errno = inject_errno,
                                   .ahead = true});
    ahead = run.installed > 0 ? run.installed - 1 : 0;
  } else {
    run = install_fault_page(slot, loc, staged, protect, write, inject_errno);
    if (run.installed == 1) {
      ahead = installer_
                  ->install_run({.slot = slot,
                                 .first_page = loc.page_index + 1,
                                 .address = loc.address + loc.page_size,
                                 .page_size = loc.page_size,
                                 .pages = pages - 1,
                                 .staged = staged + loc.page_size,
                                 .protect = protect_ahead,
                                 .ahead = true})
                  .installed;
    }
  }
  // The kernel installed and woke the faulting page even if the run stopped
  // later (a neighbour became present, or an event became pending): the
  // fault is served.
  if (run.installed > 0) run.ioctl = {kernel::IoctlOutcome::kDone, loc.page_size, 0};
  if (ahead > 0) count_ahead(w, loc, 1, ahead);
  return run;
}

void Session::count_ahead(Worker& w, const PageLocation& loc, uint64_t first, uint64_t pages) {
  // Snapshot pages like a faulting one (pages_snapshot, bytes), and counted
  // apart too.
  w.ahead.fetch_add(pages, std::memory_order_relaxed);
  w.pages_snapshot.fetch_add(pages, std::memory_order_relaxed);
  w.bytes.fetch_add(pages * loc.page_size, std::memory_order_relaxed);
  const size_t src = static_cast<size_t>(metrics::InstallSource::kFaultAround);
  w.installed_pages[src].store(w.installed_pages[src].load(std::memory_order_relaxed) + pages,
                               std::memory_order_relaxed);
  w.installed_bytes[src].store(w.installed_bytes[src].load(std::memory_order_relaxed) + pages * loc.page_size,
                               std::memory_order_relaxed);
  // The pages installed ahead never fault: they are first touches as far as
  // the record can tell, and they are the ones a prefetch of this record
  // should install.
  std::unique_lock<std::mutex> lock(record_mu_, std::defer_lock);
  if (recording()) lock.lock();
  for (uint64_t k = first; k < first + pages; ++k) {
    if (pages_->mark_touched(loc.page_index + k) && recording()) {
      first_touches_.push_back(loc.file_offset + k * loc.page_size);
    }
  }
}

void Session::queue_readahead(Worker& w, const PageLocation& loc, const QueuedFault& fault, uint64_t pages,
                              bool by_reader) {
  QueuedFault ra;
  ra.address = loc.address + pages * loc.page_size;
  ra.window = fault.readahead;
  ra.is_readahead = true;
  if (!by_reader) {
    // This worker installs it once no fault waits in its ring. A few at
    // most: an old readahead the guest has long passed is worth nothing.
    if (w.readahead.size() >= kMaxReadahead) w.readahead.pop_front();
    w.readahead.push_back(ra);
    return;
  }
  // The reader is the producer of every worker's ring; a full ring drops
  // the readahead (a fault will ask again).
  const size_t target = (loc.page_index + pages) % workers_.size();
  if (workers_[target]->ring.push(ra)) workers_[target]->signal.notify();
}

void Session::serve_readahead(Worker& w, const QueuedFault& ra) {
  const PublishedLayout::Reader layout = layout_->read(w.layout_slot);
  const auto loc = layout->locate(ra.address);
  if (!loc || loc->page_size != kPageSize4K) return;  // unmapped or moved since
  // Cheap checks before any I/O: the guest (or a fault) got there first.
  if (pages_->state(loc->page_index) != PageState::kUntouched) return;
  const uint64_t pages = std::min<uint64_t>(ra.window, layout->pages_to_end(loc->address));
  // A readahead that cannot be read is dropped at once, never retried (no
  // thread waits for it, and a worker waiting on a slow store would hold up
  // demand faults): the fault that needs the page reads it again, with
  // retries, and reports what is wrong.
  if (!source_->read(loc->file_offset, {w.buffer.get(), pages * loc->page_size})) return;
  HookContext hook{loc->address, loc->page_index};
  FAULTLINE_HOOK(HookPoint::kBeforeReadaheadInstall, hook);
  const PageInstaller::Result run = installer_->install_run({.slot = w.index,
                                                             .first_page = loc->page_index,
                                                             .address = loc->address,
                                                             .page_size = loc->page_size,
                                                             .pages = pages,
                                                             .staged = w.buffer.get(),
                                                             .protect = region_wp_[loc->region],
                                                             .inject_errno = hook.inject_errno,
                                                             .ahead = true});
  if (run.installed > 0) {
    count_ahead(w, *loc, 0, run.installed);
    readahead_pages_.fetch_add(run.installed, std::memory_order_relaxed);
  }
}

Session::Served Session::serve(Worker& w, QueuedFault& fault, bool by_reader) {
  // The layout stays valid until `layout` is destroyed, even if the reader
  // publishes a new one meanwhile. The reader itself publishes (never while
  // it serves), so it needs no read slot: its fast path pays nothing.
  const PublishedLayout::Reader layout = by_reader ? layout_->writer_view() : layout_->read(w.layout_slot);
  const auto loc = layout->locate(fault.address);
  if (!loc) {
    // Unmapped or moved since the reader located it: wake the thread, whose
    // retry faults at the right place or finds no mapping.
    wake_page(*layout, fault.address);
    return Served::kDone;
  }
  // The reader serves only what costs a few microseconds and no I/O: 4 KiB
  // pages that are zero or already in the page cache. The rest (storage
  // reads, 2 MiB copies) goes to the workers.
  if (by_reader && (loc->page_size != kPageSize4K || fault.wp || FAULTLINE_HOOK_ARMED(HookPoint::kBeforeInstallIoctl))) {
    return Served::kNeedsWorker;
  }
  // With a WP registration, a page installed for a read is write-protected
  // so that the guest's first write to it is recorded; one installed for a
  // write is dirty from the start.
  const bool protect = region_wp_[loc->region] && !fault.write;
  if (fault.wp) {
    // A synchronous write-protect fault (WP registered without WP_ASYNC): the
    // page is present and protected; the guest wrote it. Unprotecting wakes
    // the writer; the page is dirty from now on.
    if (pages_->take_ahead(loc->page_index)) ahead_faulted_.fetch_add(1, std::memory_order_relaxed);
    HookContext hook{loc->address, loc->page_index};
    FAULTLINE_HOOK(HookPoint::kBeforeInstallIoctl, hook);
    const kernel::IoctlResult r = hook.inject_errno
                                      ? kernel::result_for_errno(hook.inject_errno)
                                      : uffd_.writeprotect(loc->address, loc->page_size, false, false);
    if (r.outcome == kernel::IoctlOutcome::kDone) pages_->mark_written(loc->page_index);
    return finish_install(*layout, w, r, PageState::kSnapshot, *loc, fault, /*count=*/false, /*zero=*/false,
                          by_reader);
  }
  // Fault-around: chosen once per fault, the first time it is served (the
  // stream table must see each fault once); a fault handed on to a worker or
  // retried keeps its window.
  if (fault.window == 0) {
    fault.window = 1;
    if (loc->page_size == kPageSize4K && fault_around_.enabled()) {
      const bool follows = loc->page_index > 0 && pages_->state(loc->page_index - 1) != PageState::kUntouched;
      const FaultAround::Plan plan = fault_around_.plan(loc->address / kPageSize4K, follows);
      fault.window = plan.pages;
      fault.readahead = plan.readahead;
    }
  }
  for (;;) {
    const PageState seen = pages_->state(loc->page_index);
    HookContext hook{loc->address, loc->page_index};
    kernel::IoctlResult r;
    PageState installed = PageState::kSnapshot;
    const bool removed = PageStateTable::serves_zero(seen);
    // A removed page serves zero alone: its snapshot neighbours may be
    // removed too, and zeros are no reason to read ahead. The window stops
    // at the end of the page's segment (contiguous in client and file).
    uint64_t pages = removed ? 1 : std::min<uint64_t>(fault.window, layout->pages_to_end(loc->address));
    // Zeros of the snapshot are installed without a read, unless a window
    // is read anyway (it then holds the zeros too).
    const bool snapshot_zero = !removed && pages == 1 && snapshot_known_zero(loc->file_offset, loc->page_size);
    if (removed || snapshot_zero) {
      installed = removed ? PageState::kZero : PageState::kSnapshot;
      FAULTLINE_HOOK(HookPoint::kBeforeInstallIoctl, hook);
      PageInstaller::Zero zero{.slot = by_reader ? PageInstaller::kReaderUnfenced : w.index,
                               .page = loc->page_index,
                               .address = loc->address,
                               .page_size = loc->page_size,
                               .protect = protect,
                               .seen = seen,
                               .installed = installed,
                               .write = fault.write,
                               .inject_errno = hook.inject_errno};
      // A page removed after the fault was read: the fault may be stale
      // (its thread woken by an install, then the page written and
      // removed); zeros would make the removed page present again. Only a
      // wake; a thread that still waits faults again and gets the zeros.
      if (removed) zero.removals = fault.removals;
      const std::optional<kernel::IoctlResult> done = installer_->install_zero(zero);
      if (!done) {
        stale_faults_.fetch_add(1, std::memory_order_relaxed);
        (void)uffd_.wake(loc->address, loc->page_size);
        return Served::kDone;
      }
      r = *done;
      if (r.outcome == kernel::IoctlOutcome::kDone && snapshot_zero) {
        w.snapshot_zero.fetch_add(1, std::memory_order_relaxed);
      }
    } else if (by_reader) {
      // The window as far as it is in memory; a first page that would wait
      // for storage goes to a worker.
      auto cached = source_->read_window(loc->file_offset, {w.buffer.get(), pages * loc->page_size}, loc->page_size,
                                         /*cached_only=*/true);
      if (!cached) {
        end(SessionEnd::kFatal, cached.error().describe());
        return Served::kDone;
      }
      if (*cached == 0) return Served::kNeedsWorker;  // it would wait for storage
      pages = *cached / loc->page_size;
      const PageInstaller::Result run = install_window(w, PageInstaller::kReaderUnfenced, *loc, pages, w.buffer.get(),
                                                       protect, fault.write, 0);
      // The reader recorded every REMOVE it read before serving: the page
      // cannot have turned zero since it looked.
      r = run.eligible == 0 ? kernel::result_for_errno(EAGAIN) : run.ioctl;
      if (fault.readahead > 0 && run.installed == pages && pages == fault.window) {
        queue_readahead(w, *loc, fault, pages, true);
      }
    } else {
      // Storage I/O happens here, before the fence, so the reader never waits
      // on it. The window is read as far as it comes without a load beyond
      // the faulting page's own (PageSource::read_window).
      Result<uint64_t> read =
          read_source_window(loc->file_offset, {w.buffer.get(), pages * loc->page_size}, loc->page_size);
      // A window that cannot be read (a file that shrank under its end) is
      // no reason to fail the fault: its own page decides. (An image's
      // window never loads a neighbour's frame, so only the fault's own
      // frame can fail it.)
      if (!read && pages > 1) {
        pages = 1;
        read = read_source_window(loc->file_offset, {w.buffer.get(), loc->page_size}, loc->page_size);
      }
      if (!read) {
        end(SessionEnd::kFatal, read.error().describe());
        return Served::kDone;
      }
      pages = *read / loc->page_size;
      FAULTLINE_HOOK(HookPoint::kBeforeInstallIoctl, hook);
      const PageInstaller::Result run =
          install_window(w, w.index, *loc, pages, w.buffer.get(), protect, fault.write, hook.inject_errno);
      // A REMOVE was recorded since we looked: the staged bytes are stale;
      // the page now serves zero.
      if (run.eligible == 0) continue;
      r = run.ioctl;
      if (fault.readahead > 0 && run.installed == pages && pages == fault.window) {
        queue_readahead(w, *loc, fault, pages, false);
      }
    }
    // A window over two VMAs of one region (a region registered in part, an
    // mprotect or madvise of part of it) fails whole with ENOENT, nothing
    // installed. Its page is then tried alone: woken instead, its thread
    // would fault into the same window again, forever.
    if (r.outcome == kernel::IoctlOutcome::kUnmapped && pages > 1) {
      fault.window = 1;
      fault.readahead = 0;
      continue;
    }
    return finish_install(*layout, w, r, installed, *loc, fault, /*count=*/true, removed || snapshot_zero, by_reader);
  }
}

Session::Served Session::finish_install(const GuestLayout& layout, Worker& w, const kernel::IoctlResult& r,
                                        PageState installed, const PageLocation& loc, const QueuedFault& fault,
                                        bool count, bool zero, bool by_reader) {
  // The fault is served: its thread runs again. One clock read, into this
  // thread's own histograms.
  auto served = [&] {
    if (!config_.record_fault_latency) return;
    const metrics::FaultPath path = fault.prefetch_late ? metrics::FaultPath::kPrefetchLate
                                    : zero              ? metrics::FaultPath::kZero
                                    : by_reader         ? metrics::FaultPath::kReader
                                                        : metrics::FaultPath::kWorker;
    w.latency.record(path, fault.read_ns);
  };
  switch (r.outcome) {
    case kernel::IoctlOutcome::kDone:
      if (count) {
        (installed == PageState::kZero ? w.pages_zero : w.pages_snapshot).fetch_add(1, std::memory_order_relaxed);
        w.bytes.fetch_add(loc.page_size, std::memory_order_relaxed);
        // One writer (this thread): a store, not an atomic increment.
        const size_t src = static_cast<size_t>(zero ? metrics::InstallSource::kZero : metrics::InstallSource::kSnapshot);
        w.installed_pages[src].store(w.installed_pages[src].load(std::memory_order_relaxed) + 1,
                                     std::memory_order_relaxed);
        w.installed_bytes[src].store(w.installed_bytes[src].load(std::memory_order_relaxed) + loc.page_size,
                                     std::memory_order_relaxed);
      }
      served();
      return Served::kDone;
    case kernel::IoctlOutcome::kExists:
      // Another fault installed the page first. The failed ioctl woke
      // nobody, and this thread is still waiting: wake it.
      w.exists.fetch_add(1, std::memory_order_relaxed);
      (void)uffd_.wake(loc.address, loc.page_size);
      served();
      return Served::kDone;
    case kernel::IoctlOutcome::kRetry:
      // An unread REMOVE/UNMAP blocks every install until the reader reads
      // it; the fault is retried after the reader's next batch.
      w.retries.fetch_add(1, std::memory_order_relaxed);
      return Served::kRetry;
    case kernel::IoctlOutcome::kGone:
      end(SessionEnd::kPeerGone);
      return Served::kDone;
    case kernel::IoctlOutcome::kUnmapped:
      // The range was unmapped or moved under us: a thread may still wait
      // on the old address; wake it so it retries against the new mapping.
      wake_page(layout, fault.address);
      return Served::kDone;
    case kernel::IoctlOutcome::kFailed:
      end(SessionEnd::kFatal, std::string(fault.wp ? "unprotecting" : installed == PageState::kZero ? "zero install"
                                                                                                  : "snapshot install") +
                                  " at " + hex(loc.address) + " (" + std::to_string(loc.page_size) +
                                  " bytes) failed: " + std::strerror(r.error));
      return Served::kDone;
  }
  return Served::kDone;
}

void Session::worker_loop(Worker& w) {
  using namespace std::chrono;
  microseconds backoff{1000};
  QueuedFault f;
  std::vector<QueuedFault> retry;
  retry.reserve(1024);
  while (!stopping_.load(std::memory_order_acquire)) {
    const uint32_t seen = w.signal.value();
    bool progressed = false;
    if (!w.deferred.empty()) {
      retry.swap(w.deferred);
      for (auto& d : retry) {
        if (serve(w, d, false) == Served::kRetry) w.deferred.push_back(d);
      }
      progressed = w.deferred.size() < retry.size();
      retry.clear();
    }
    while (!stopping_.load(std::memory_order_acquire) && w.ring.pop(f)) {
      progressed = true;
      if (f.is_readahead) {
        if (w.readahead.size() >= kMaxReadahead) w.readahead.pop_front();
        w.readahead.push_back(f);
        continue;
      }
      if (serve(w, f, false) != Served::kRetry) continue;
      // De-duplicate: one deferred entry per page and access kind.
      const uint64_t page = f.address & ~(kPageSize4K - 1);
      const bool dup = std::any_of(w.deferred.begin(), w.deferred.end(), [&](const QueuedFault& d) {
        return (d.address & ~(kPageSize4K - 1)) == page && d.write == f.write;
      });
      if (!dup) {
        w.deferred.push_back(f);
        w.deferred_empty.store(false, std::memory_order_release);
      } else {
        (void)0;  // its thread waits on the same page and is woken by that install
      }
    }
    w.deferred_empty.store(w.deferred.empty(), std::memory_order_release);
    if (stopping_.load(std::memory_order_acquire)) break;
    // Demand faults first: one readahead, only when none waits in the ring,
    // then look at the ring again.
    if (!w.readahead.empty() && w.ring.empty()) {
      const QueuedFault ra = w.readahead.front();
      w.readahead.pop_front();
      serve_readahead(w, ra);
      continue;
    }
    if (!progressed || !w.deferred.empty()) {
      // Deferred faults retry when the reader signals a new batch; the
      // timeout is a backstop that grows, so nothing busy-loops.
      if (w.deferred.empty()) {
        backoff = microseconds{1000};
        w.signal.wait(seen, microseconds{-1});
      } else {
        w.signal.wait(seen, backoff);
        backoff = std::min(backoff * 2, microseconds{64000});
      }
    }
  }
  // Shutdown: every fault this worker still holds gets its thread woken; it
  // faults again and the message waits in the uffd for whoever serves next.
  const PublishedLayout::Reader layout = layout_->read(w.layout_slot);
  for (const auto& d : w.deferred) wake_page(*layout, d.address);
  while (w.ring.pop(f)) {
    if (!f.is_readahead) wake_page(*layout, f.address);
  }
}

}  // namespace faultline

namespace faultline {

bool Session::demand_pending() const {
  for (const auto& w : workers_) {
    if (!w->ring.empty() || !w->deferred_empty.load(std::memory_order_acquire)) return true;
  }
  return false;
}

}  // namespace faultline
