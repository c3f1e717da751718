#include "metrics/registry.h"

#include <algorithm>

#include "metrics/exposition.h"

namespace faultline::metrics {

const char* to_string(FaultPath path) {
  switch (path) {
    case FaultPath::kReader: return "reader";
    case FaultPath::kWorker: return "worker";
    case FaultPath::kZero: return "zero";
    case FaultPath::kPrefetchLate: return "prefetch_late";
  }
  return "?";
}

const char* to_string(InstallSource source) {
  switch (source) {
    case InstallSource::kSnapshot: return "snapshot";
    case InstallSource::kZero: return "zero";
    case InstallSource::kPrefetch: return "prefetch";
    case InstallSource::kFaultAround: return "fault_around";
  }
  return "?";
}

const char* to_string(RefusalCause cause) {
  switch (cause) {
    case RefusalCause::kHandshakeFailed: return "handshake_failed";
    case RefusalCause::kSessionRejected: return "session_rejected";
    case RefusalCause::kPeerNotAllowed: return "peer_not_allowed";
    case RefusalCause::kTooManyHandshakes: return "too_many_handshakes";
    case RefusalCause::kTooManySessions: return "too_many_sessions";
    case RefusalCause::kTooManyRegions: return "too_many_regions";
    case RefusalCause::kOutOfResources: return "out_of_resources";
    case RefusalCause::kHandshakeTimeout: return "handshake_timeout";
  }
  return "?";
}

SessionCounts& SessionCounts::operator+=(const SessionCounts& o) {
  faults += o.faults;
  already_present += o.already_present;
  eagain_retries += o.eagain_retries;
  removes += o.removes;
  removed_pages += o.removed_pages;
  ahead_faulted += o.ahead_faulted;
  for (size_t i = 0; i < kInstallSources; ++i) {
    installed_pages[i] += o.installed_pages[i];
    installed_bytes[i] += o.installed_bytes[i];
  }
  for (size_t p = 0; p < kFaultPaths; ++p) latency[p] += o.latency[p];
  return *this;
}

Registry::Registry(std::vector<std::string> end_reasons) {
  for (std::string& r : end_reasons) ended_by_reason_.emplace_back(std::move(r), 0);
}

void Registry::session_started(const SessionSource& source) {
  std::lock_guard lock(mu_);
  live_.push_back(&source);
  ++started_;
}

void Registry::session_ended(const SessionSource& source, std::string_view reason, const SessionCounts& final_counts) {
  std::lock_guard lock(mu_);
  auto it = std::find(live_.begin(), live_.end(), &source);
  if (it == live_.end()) return;  // never started here, or already ended: count nothing twice
  live_.erase(it);
  ended_totals_ += final_counts;
  auto r = std::find_if(ended_by_reason_.begin(), ended_by_reason_.end(),
                        [&](const auto& e) { return e.first == reason; });
  if (r == ended_by_reason_.end()) {
    ended_by_reason_.emplace_back(std::string(reason), 1);
  } else {
    ++r->second;
  }
}

void Registry::handshake_refused(RefusalCause cause) {
  const size_t i = static_cast<size_t>(cause);
  if (i < refused_.size()) refused_[i].fetch_add(1, std::memory_order_relaxed);
}

void Registry::set_frame_cache_source(std::function<FrameCacheCounts()> read) {
  std::lock_guard lock(mu_);
  frame_cache_ = std::move(read);
}

Registry::Snapshot Registry::snapshot() const {
  Snapshot s;
  {
    // Totals and live sessions under one lock: a session's end (which takes
    // the same lock) moves it from one to the other atomically.
    std::lock_guard lock(mu_);
    s.totals = ended_totals_;
    for (const SessionSource* src : live_) src->collect(s.totals);
    s.sessions_live = live_.size();
    s.sessions_started = started_;
    s.sessions_ended = ended_by_reason_;
    if (frame_cache_) s.frame_cache = frame_cache_();
  }
  for (size_t i = 0; i < refused_.size(); ++i) s.handshakes_refused[i] = refused_[i].load(std::memory_order_relaxed);
  return s;
}

std::string Registry::render() const { return render(snapshot()); }

std::string Registry::render(const Snapshot& s) {
  ExpositionWriter w;
  const SessionCounts& t = s.totals;

  w.family("faultline_sessions_live", "gauge", "Sessions being served now (one per VM whose handshake was accepted).");
  w.sample("faultline_sessions_live", {}, s.sessions_live);
  w.family("faultline_sessions_started_total", "counter", "Sessions started (handshakes accepted) since the daemon started.");
  w.sample("faultline_sessions_started_total", {}, s.sessions_started);
  w.family("faultline_sessions_ended_total", "counter",
           "Sessions ended, by reason (the state field of the session_end log line).");
  for (const auto& [reason, n] : s.sessions_ended) w.sample("faultline_sessions_ended_total", {{"reason", reason}}, n);
  w.family("faultline_handshakes_refused_total", "counter",
           "Connections refused before they became a session, by cause.");
  for (size_t i = 0; i < kRefusalCauses; ++i) {
    w.sample("faultline_handshakes_refused_total", {{"cause", to_string(static_cast<RefusalCause>(i))}},
             s.handshakes_refused[i]);
  }

  if (s.frame_cache) {
    const FrameCacheCounts& c = *s.frame_cache;
    w.family("faultline_frame_cache_hits_total", "counter",
             "Image frame lookups served from the in-memory frame cache (shared by every session).");
    w.sample("faultline_frame_cache_hits_total", {}, c.hits);
    w.family("faultline_frame_cache_misses_total", "counter",
             "Image frames loaded into the cache (fetched, checksum-checked, decompressed).");
    w.sample("faultline_frame_cache_misses_total", {}, c.misses);
    w.family("faultline_frame_cache_loads_ahead_total", "counter",
             "Image frames loaded ahead of a prefetch's installs (serve --prefetch-fetches); also in misses.");
    w.sample("faultline_frame_cache_loads_ahead_total", {}, c.loads_ahead);
    w.family("faultline_frame_cache_load_waits_total", "counter",
             "Lookups that waited for another thread's load of the same frame instead of loading it again.");
    w.sample("faultline_frame_cache_load_waits_total", {}, c.load_waits);
    w.family("faultline_frame_cache_load_failures_total", "counter",
             "Frame loads that failed (missing blob, checksum mismatch, store error).");
    w.sample("faultline_frame_cache_load_failures_total", {}, c.load_failures);
    w.family("faultline_frame_cache_evictions_total", "counter", "Frames evicted to stay within the capacity.");
    w.sample("faultline_frame_cache_evictions_total", {}, c.evictions);
    w.family("faultline_frame_cache_bytes", "gauge",
             "Memory the frames the frame cache holds now take (each frame's slot of frame memory).");
    w.sample("faultline_frame_cache_bytes", {}, c.bytes);
    w.family("faultline_frame_cache_frames", "gauge", "Frames the frame cache holds now.");
    w.sample("faultline_frame_cache_frames", {}, c.frames);
    w.family("faultline_frame_cache_capacity_bytes", "gauge", "The frame cache's capacity (--frame-cache-size).");
    w.sample("faultline_frame_cache_capacity_bytes", {}, c.capacity_bytes);
    w.family("faultline_frame_memory_bytes", "gauge",
             "Frame memory mapped now: huge-page chunks (frames in use, free slots, empty chunks kept) and large frames' "
             "own mappings.");
    w.sample("faultline_frame_memory_bytes", {}, c.memory_bytes);
    w.family("faultline_frame_memory_fresh_bytes_total", "counter",
             "Frame memory ever mapped, each byte first-touched once by a frame decompressed into it.");
    w.sample("faultline_frame_memory_fresh_bytes_total", {}, c.memory_fresh_bytes);
    w.family("faultline_frame_memory_slot_reuses_total", "counter",
             "Frames decompressed into memory an earlier frame used (no first-touch cost).");
    w.sample("faultline_frame_memory_slot_reuses_total", {}, c.memory_slot_reuses);
  }

  w.family("faultline_faults_total", "counter", "Page-fault messages read from the guests' userfaultfds.");
  w.sample("faultline_faults_total", {}, t.faults);
  w.family("faultline_fault_service_seconds", "histogram",
           "Time from reading a fault message to the end of its install (or of the wake, when another install got "
           "there first), by path: reader, worker, zero, prefetch_late.");
  for (size_t p = 0; p < kFaultPaths; ++p) {
    w.histogram("faultline_fault_service_seconds", {{"path", to_string(static_cast<FaultPath>(p))}}, t.latency[p]);
  }
  w.family("faultline_installed_pages_total", "counter",
           "Pages installed into guests, by source: snapshot (read from the memory file for a fault), zero "
           "(zeros for a fault: removed, or zero in the snapshot), prefetch (installed ahead of any fault), "
           "fault_around (installed with a fault's page, ahead of faults on them).");
  for (size_t i = 0; i < kInstallSources; ++i) {
    w.sample("faultline_installed_pages_total", {{"source", to_string(static_cast<InstallSource>(i))}},
             t.installed_pages[i]);
  }
  w.family("faultline_installed_bytes_total", "counter", "Bytes installed into guests, by source (as installed_pages).");
  for (size_t i = 0; i < kInstallSources; ++i) {
    w.sample("faultline_installed_bytes_total", {{"source", to_string(static_cast<InstallSource>(i))}},
             t.installed_bytes[i]);
  }
  w.family("faultline_ahead_faulted_total", "counter",
           "Pages fault-around installed ahead that faulted later (a write-protect fault: the guest wrote one).");
  w.sample("faultline_ahead_faulted_total", {}, t.ahead_faulted);
  w.family("faultline_faults_already_present_total", "counter",
           "Faults whose page another install got to first (EEXIST): their thread was woken.");
  w.sample("faultline_faults_already_present_total", {}, t.already_present);
  w.family("faultline_eagain_retries_total", "counter",
           "Fault installs deferred because an event was pending (EAGAIN) and retried after the reader read it.");
  w.sample("faultline_eagain_retries_total", {}, t.eagain_retries);
  w.family("faultline_remove_events_total", "counter",
           "REMOVE events read (balloon, free page reporting and hinting: madvise(MADV_DONTNEED) of guest memory).");
  w.sample("faultline_remove_events_total", {}, t.removes);
  w.family("faultline_removed_pages_total", "counter", "Whole guest pages the REMOVE events covered.");
  w.sample("faultline_removed_pages_total", {}, t.removed_pages);
  return w.take();
}

}  // namespace faultline::metrics
