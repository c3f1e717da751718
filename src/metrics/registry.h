// Registry: the daemon's metrics, rendered in the Prometheus text format.
//
// Counters stay monotonic across session ends: a live session's counts are
// read from the session itself (its SessionSource) at scrape time, and when
// a session ends its final counts are folded into daemon-wide totals in the
// same critical section that removes it from the live set. A scrape holds
// that same lock while it reads the totals and every live session, so a
// session that ends during a scrape is counted exactly once: as live if the
// scrape got the lock first, as ended otherwise; never both, never neither.
//
// Nothing here is on the fault path: sessions count faults in their own
// per-thread shards (fault_metrics.h) and the registry only reads them when
// scraped.
//
// Thread-safety: every method is safe from any thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "metrics/fault_metrics.h"

namespace faultline::metrics {

// Why a connection never became a session. A fixed label set: every cause
// is rendered (with 0) from the start, so rates work from the first scrape.
enum class RefusalCause : uint8_t {
  kHandshakeFailed,     // bad handshake: malformed JSON, no fd, not a uffd, ... (log event handshake_failed)
  kSessionRejected,     // regions the memory file cannot serve (log event session_rejected)
  kPeerNotAllowed,      // peer uid/gid not in the allow-list
  kTooManyHandshakes,   // concurrent handshake limit reached
  kTooManySessions,     // concurrent session limit reached
  kTooManyRegions,      // more regions than allowed in one handshake
  kOutOfResources,      // an fd, thread or allocation could not be had (EMFILE, ENOMEM, ...)
  kHandshakeTimeout,    // the client did not finish its handshake in time
};
inline constexpr size_t kRefusalCauses = 8;
const char* to_string(RefusalCause cause);

// One live session's counts, as the registry reads them at scrape time.
class SessionSource {
 public:
  // Adds the session's counts so far to `into`. Called with the registry's
  // lock held: it must not call back into the registry.
  virtual void collect(SessionCounts& into) const = 0;

 protected:
  ~SessionSource() = default;
};

// The daemon's shared cache of decompressed image frames, as scraped.
struct FrameCacheCounts {
  uint64_t hits = 0, misses = 0, load_waits = 0, load_failures = 0, evictions = 0;
  uint64_t bytes = 0, frames = 0, capacity_bytes = 0;
  uint64_t loads_ahead = 0;
  // Frame memory of the process (image::FrameBuffer::totals()).
  uint64_t memory_bytes = 0, memory_fresh_bytes = 0, memory_slot_reuses = 0;
  uint64_t memory_free_slot_bytes = 0;  // free slots of partly used chunks (FrameBuffer::free_slot_bytes())
};

// The daemon's object-store traffic and disk cache of frames, as scraped.
struct StoreCounts {
  // Every S3 client of the process (objstore::S3Client::process_totals()):
  // requests that reached the network, retries included; of those, GETs and
  // the bytes of their bodies; attempts after the first of a request.
  uint64_t requests = 0, gets = 0, get_body_bytes = 0, retries = 0;
  // The disk cache (serve --cache-dir); absent without one.
  struct DiskCache {
    uint64_t hits = 0, misses = 0, damaged = 0, evictions = 0, put_failures = 0;
    uint64_t bytes = 0, blobs = 0, capacity_bytes = 0;
  };
  std::optional<DiskCache> disk_cache;
};

class Registry {
 public:
  // `end_reasons`: the label values of faultline_sessions_ended_total, each
  // rendered from the start (a reason not listed is added when first seen).
  explicit Registry(std::vector<std::string> end_reasons = {});
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // A session started: its counts are read from `source` until it ends.
  // REQUIRES: `source` stays valid until session_ended(source, ...).
  void session_started(const SessionSource& source);
  // The session behind `source` ended for `reason`; `final_counts` are its
  // counts once nothing can change them any more (its threads joined).
  // Atomic with respect to scrapes (see the top of this file).
  void session_ended(const SessionSource& source, std::string_view reason, const SessionCounts& final_counts);

  // A connection was refused before it became a session. The lead's call
  // sites in server.cc: Server::count_refused(cause), which calls this.
  void handshake_refused(RefusalCause cause);

  // Everything the registry would render, as values.
  struct Snapshot {
    SessionCounts totals;  // ended sessions plus live ones
    uint64_t sessions_live = 0;
    uint64_t sessions_started = 0;
    std::vector<std::pair<std::string, uint64_t>> sessions_ended;  // by reason
    std::array<uint64_t, kRefusalCauses> handshakes_refused{};
    std::optional<FrameCacheCounts> frame_cache;  // only when serving an image
    std::optional<StoreCounts> store;             // only once set_store_source() was called
  };
  // Reads the frame cache's counts at every scrape (set once, before the
  // first scrape; the server does when it serves an image).
  void set_frame_cache_source(std::function<FrameCacheCounts()> read);
  // Reads the object-store and disk-cache counts at every scrape (set once,
  // before the first scrape; the server always does).
  void set_store_source(std::function<StoreCounts()> read);
  Snapshot snapshot() const;

  // The Prometheus text exposition (version 0.0.4) of snapshot().
  std::string render() const;
  static std::string render(const Snapshot& s);

 private:
  mutable std::mutex mu_;
  std::vector<const SessionSource*> live_;                       // GUARDED_BY(mu_)
  SessionCounts ended_totals_;                                    // GUARDED_BY(mu_)
  std::vector<std::pair<std::string, uint64_t>> ended_by_reason_; // GUARDED_BY(mu_)
  uint64_t started_ = 0;                                          // GUARDED_BY(mu_)
  std::array<std::atomic<uint64_t>, kRefusalCauses> refused_{};
  std::function<FrameCacheCounts()> frame_cache_;  // GUARDED_BY(mu_)
  std::function<StoreCounts()> store_;             // GUARDED_BY(mu_)
};

}  // namespace faultline::metrics
