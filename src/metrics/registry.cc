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

void Registry::set_store_source(std::function<StoreCounts()> read) {
  std::lock_guard lock(mu_);
  store_ = std::move(read);
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
    if (store_) s.store = store_();
  }
  for (size_t i = 0; i < refused_.size(); ++i) s.handshakes_refused[i] = refused_[i].load(std::memory_order_relaxed);
  return s;
}

std::string Registry::render() const { return render(snapshot()); }

std::string Registry::render(const Snapshot& s) {
  ExpositionWriter w;
  const SessionCounts& t = s.totals;

  w.gauge("faultline_sessions_live", "Sessions being served now (one per VM whose handshake was accepted).",
          s.sessions_live);
  w.counter("faultline_sessions_started_total", "Sessions started (handshakes accepted) since the daemon started.",
            s.sessions_started);
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
    w.counter("faultline_frame_cache_hits_total",
              "Image frame lookups served from the in-memory frame cache (shared by every session).", c.hits);
    w.counter("faultline_frame_cache_misses_total",
              "Image frames loaded into the cache (fetched, checksum-checked, decompressed).", c.misses);
    w.counter("faultline_frame_cache_loads_ahead_total",
              "Image frames loaded ahead of a prefetch's installs (serve --prefetch-fetches); also in misses.",
              c.loads_ahead);
    w.counter("faultline_frame_cache_load_waits_total",
              "Lookups that waited for another thread's load of the same frame instead of loading it again.",
              c.load_waits);
    w.counter("faultline_frame_cache_load_failures_total",
              "Frame loads that failed (missing blob, checksum mismatch, store error).", c.load_failures);
    w.counter("faultline_frame_cache_evictions_total", "Frames evicted to stay within the capacity.", c.evictions);
    w.gauge("faultline_frame_cache_bytes",
            "Memory the frames the frame cache holds now take (each frame's slot of frame memory).", c.bytes);
    w.gauge("faultline_frame_cache_frames", "Frames the frame cache holds now.", c.frames);
    w.gauge("faultline_frame_cache_capacity_bytes", "The frame cache's capacity (--frame-cache-size).",
            c.capacity_bytes);
    w.gauge(
        "faultline_frame_memory_bytes",
        "Frame memory mapped now: huge-page chunks (frames in use, free slots, empty chunks kept) and large frames' "
        "own mappings.",
        c.memory_bytes);
    w.counter("faultline_frame_memory_fresh_bytes_total",
              "Frame memory ever mapped, each byte first-touched once by a frame decompressed into it.",
              c.memory_fresh_bytes);
    w.counter("faultline_frame_memory_slot_reuses_total",
              "Frames decompressed into memory an earlier frame used (no first-touch cost).", c.memory_slot_reuses);
    w.gauge("faultline_frame_memory_free_slot_bytes",
            "Frame memory in the free slots of partly used chunks, usable only by frames of their slot size; beyond "
            "12 MiB the frame cache counts it against its capacity.",
            c.memory_free_slot_bytes);
  }

  if (s.store) {
    const StoreCounts& o = *s.store;
    w.counter("faultline_object_store_requests_total",
              "HTTP requests sent to object stores (S3), retries included: frame GETs, manifests, listings.",
              o.requests);
    w.counter("faultline_object_store_gets_total",
              "GET requests among them (a frame fetch is one ranged or whole GET).", o.gets);
    w.counter("faultline_object_store_get_bytes_total", "Bytes of the bodies those GETs received.", o.get_body_bytes);
    w.counter("faultline_object_store_retries_total",
              "Requests sent again after a timeout, a reset connection, a 5xx or SlowDown.", o.retries);
    if (o.disk_cache) {
      const StoreCounts::DiskCache& d = *o.disk_cache;
      w.counter("faultline_disk_cache_hits_total", "Frames read from the disk cache (--cache-dir), verified.", d.hits);
      w.counter("faultline_disk_cache_misses_total",
                "Frame reads the disk cache could not serve (absent, or damaged and deleted): fetched from the store.",
                d.misses);
      w.counter("faultline_disk_cache_damaged_total",
                "Cached files whose bytes did not match their name: deleted, fetched again (also in misses).",
                d.damaged);
      w.counter("faultline_disk_cache_evictions_total",
                "Frames evicted (least recently used) to stay within --cache-size.", d.evictions);
      w.counter("faultline_disk_cache_write_failures_total",
                "Frames that could not be written to the disk cache (a full disk): served without caching.",
                d.put_failures);
      w.gauge("faultline_disk_cache_bytes", "Bytes of frame files the disk cache holds now.", d.bytes);
      w.gauge("faultline_disk_cache_frames", "Frame files the disk cache holds now.", d.blobs);
      w.gauge("faultline_disk_cache_capacity_bytes", "The disk cache's bound (--cache-size).", d.capacity_bytes);
    }
  }

  w.counter("faultline_faults_total", "Page-fault messages read from the guests' userfaultfds.", t.faults);
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
  w.family("faultline_installed_bytes_total", "counter",
           "Bytes installed into guests, by source (as installed_pages).");
  for (size_t i = 0; i < kInstallSources; ++i) {
    w.sample("faultline_installed_bytes_total", {{"source", to_string(static_cast<InstallSource>(i))}},
             t.installed_bytes[i]);
  }
  w.counter("faultline_ahead_faulted_total",
            "Pages fault-around installed ahead that faulted later (a write-protect fault: the guest wrote one).",
            t.ahead_faulted);
  w.counter("faultline_faults_already_present_total",
            "Faults whose page another install got to first (EEXIST): their thread was woken.", t.already_present);
  w.counter("faultline_eagain_retries_total",
            "Fault installs deferred because an event was pending (EAGAIN) and retried after the reader read it.",
            t.eagain_retries);
  w.counter("faultline_remove_events_total",
            "REMOVE events read (balloon, free page reporting and hinting: madvise(MADV_DONTNEED) of guest memory).",
            t.removes);
  w.counter("faultline_removed_pages_total", "Whole guest pages the REMOVE events covered.", t.removed_pages);
  return w.take();
}

}  // namespace faultline::metrics
