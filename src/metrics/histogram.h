// Latency histograms for the fault path: fixed buckets, one writer thread per
// histogram, read by a scraper at any time.
//
// Cost on the fault path: record() is one bucket lookup (at most a few
// compares of a small constant table) and two relaxed stores into memory
// only the recording thread writes. No allocation, no lock, no
// read-modify-write instruction (a single writer needs no atomic increment,
// only atomic stores so that a concurrent reader never sees a torn value).
// Each thread that serves faults owns its own histograms (a shard, see
// fault_metrics.h); shards are summed when scraped.
//
// Thread-safety: record() from one thread at a time per histogram (its
// owner); add_to() from any thread, concurrently with record().
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace faultline::metrics {

// Upper bounds of the buckets, in nanoseconds, ascending. A fault served by
// the event reader from the page cache takes a few microseconds here; one that
// waits for storage or for a pending REMOVE takes milliseconds; a stalled one
// seconds. The last bucket (+Inf) takes everything above the last bound.
inline constexpr std::array<uint64_t, 20> kLatencyBoundsNs = {
    1'000,      2'500,       5'000,       10'000,      25'000,        50'000,        100'000,
    250'000,    500'000,     1'000'000,   2'500'000,   5'000'000,     10'000'000,    25'000'000,
    50'000'000, 100'000'000, 250'000'000, 500'000'000, 1'000'000'000, 10'000'000'000};
// The same bounds as Prometheus `le` label values, in seconds.
inline constexpr std::array<std::string_view, kLatencyBoundsNs.size()> kLatencyBoundLabels = {
    "0.000001", "0.0000025", "0.000005", "0.00001", "0.000025", "0.00005", "0.0001",
    "0.00025",  "0.0005",    "0.001",    "0.0025",  "0.005",    "0.01",    "0.025",
    "0.05",     "0.1",       "0.25",     "0.5",     "1",        "10"};
// Buckets including +Inf.
inline constexpr size_t kLatencyBuckets = kLatencyBoundsNs.size() + 1;

// Index of the bucket that counts a duration of `ns`: the first bound >= ns,
// or the +Inf bucket.
constexpr size_t latency_bucket(uint64_t ns) {
  size_t b = 0;
  while (b < kLatencyBoundsNs.size() && ns > kLatencyBoundsNs[b]) ++b;
  return b;
}

// A histogram's counts as plain values (what a scrape reads and adds up).
// `buckets` are per bucket, not cumulative; the exposition format's
// cumulative counts are computed when rendering.
struct HistogramCounts {
  std::array<uint64_t, kLatencyBuckets> buckets{};
  uint64_t sum_ns = 0;

  uint64_t count() const {
    uint64_t n = 0;
    for (uint64_t b : buckets) n += b;
    return n;
  }
  HistogramCounts& operator+=(const HistogramCounts& o) {
    for (size_t i = 0; i < buckets.size(); ++i) buckets[i] += o.buckets[i];
    sum_ns += o.sum_ns;
    return *this;
  }
  friend bool operator==(const HistogramCounts&, const HistogramCounts&) = default;
};

class LatencyHistogram {
 public:
  LatencyHistogram() = default;
  LatencyHistogram(const LatencyHistogram&) = delete;
  LatencyHistogram& operator=(const LatencyHistogram&) = delete;

  // Counts one duration. REQUIRES: called by one thread at a time (the owner).
  void record(uint64_t ns) {
    std::atomic<uint64_t>& bucket = buckets_[latency_bucket(ns)];
    // The sum first, the bucket with release: a reader that acquires the
    // bucket count sees a sum that includes every duration it counted, so a
    // scrape's _sum is never below what its buckets imply.
    sum_ns_.store(sum_ns_.load(std::memory_order_relaxed) + ns, std::memory_order_relaxed);
    bucket.store(bucket.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  // Adds the counts so far to `out`. Safe concurrently with record().
  void add_to(HistogramCounts& out) const {
    for (size_t i = 0; i < buckets_.size(); ++i) out.buckets[i] += buckets_[i].load(std::memory_order_acquire);
    out.sum_ns += sum_ns_.load(std::memory_order_relaxed);
  }

 private:
  std::array<std::atomic<uint64_t>, kLatencyBuckets> buckets_{};
  std::atomic<uint64_t> sum_ns_{0};
};

}  // namespace faultline::metrics
