#include "metrics/histogram.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "metrics/fault_metrics.h"

namespace faultline::metrics {
namespace {

TEST(LatencyHistogram, ADurationFallsInTheFirstBucketWhoseBoundIsAtLeastIt) {
  EXPECT_EQ(latency_bucket(0), 0u);
  EXPECT_EQ(latency_bucket(1'000), 0u);  // le is inclusive
  EXPECT_EQ(latency_bucket(1'001), 1u);
  EXPECT_EQ(latency_bucket(2'500), 1u);
  EXPECT_EQ(latency_bucket(99'999), 6u);  // le 100 us
  EXPECT_EQ(latency_bucket(kLatencyBoundsNs.back()), kLatencyBoundsNs.size() - 1);
  EXPECT_EQ(latency_bucket(kLatencyBoundsNs.back() + 1), kLatencyBuckets - 1);  // +Inf
  EXPECT_EQ(latency_bucket(UINT64_MAX), kLatencyBuckets - 1);
}

TEST(LatencyHistogram, BoundsAscendAndTheirLabelsSayTheSameInSeconds) {
  for (size_t i = 0; i < kLatencyBoundsNs.size(); ++i) {
    if (i > 0) {
      EXPECT_LT(kLatencyBoundsNs[i - 1], kLatencyBoundsNs[i]);
    }
    const double seconds = std::stod(std::string(kLatencyBoundLabels[i]));
    EXPECT_DOUBLE_EQ(seconds * 1e9, static_cast<double>(kLatencyBoundsNs[i])) << kLatencyBoundLabels[i];
  }
}

TEST(LatencyHistogram, EachRecordedDurationIsCountedOnceAndSummed) {
  LatencyHistogram h;
  h.record(500);             // bucket 0
  h.record(3'000);           // bucket 2 (le 5 us)
  h.record(3'000);
  h.record(20'000'000'000);  // +Inf
  HistogramCounts c;
  h.add_to(c);
  EXPECT_EQ(c.count(), 4u);
  EXPECT_EQ(c.buckets[0], 1u);
  EXPECT_EQ(c.buckets[2], 2u);
  EXPECT_EQ(c.buckets[kLatencyBuckets - 1], 1u);
  EXPECT_EQ(c.sum_ns, 500u + 6'000u + 20'000'000'000u);
  // add_to adds: two reads give twice the counts.
  h.add_to(c);
  EXPECT_EQ(c.count(), 8u);
}

TEST(LatencyHistogram, CountsAddUp) {
  HistogramCounts a, b;
  a.buckets[1] = 2;
  a.sum_ns = 3'000;
  b.buckets[1] = 1;
  b.buckets[5] = 4;
  b.sum_ns = 100'000;
  a += b;
  EXPECT_EQ(a.buckets[1], 3u);
  EXPECT_EQ(a.buckets[5], 4u);
  EXPECT_EQ(a.sum_ns, 103'000u);
  EXPECT_EQ(a.count(), 7u);
}

// A scraper reads while the owner records: every read must see a sum at
// least as large as the lower bounds of the durations its buckets count
// (record() publishes the sum before the bucket). Run under TSan this also
// shows the reader and the writer share no unsynchronised memory.
TEST(LatencyHistogram, AConcurrentReaderNeverSeesASumBelowWhatItsBucketsCount) {
  LatencyHistogram h;
  std::atomic<bool> done{false};
  constexpr uint64_t kRecords = 200'000;
  std::thread writer([&] {
    for (uint64_t i = 0; i < kRecords; ++i) h.record(kLatencyBoundsNs[i % kLatencyBoundsNs.size()]);
    done.store(true, std::memory_order_release);
  });
  uint64_t reads = 0, last_count = 0;
  while (!done.load(std::memory_order_acquire) || reads == 0) {
    HistogramCounts c;
    h.add_to(c);
    uint64_t lower = 0;
    for (size_t b = 1; b < kLatencyBuckets; ++b) lower += c.buckets[b] * kLatencyBoundsNs[b - 1];
    ASSERT_GE(c.sum_ns, lower) << "read " << reads;
    ASSERT_GE(c.count(), last_count) << "counts went backwards";
    last_count = c.count();
    ++reads;
  }
  writer.join();
  HistogramCounts c;
  h.add_to(c);
  EXPECT_EQ(c.count(), kRecords);
}

TEST(FaultLatencyShard, RecordsUnderItsPathTheTimeSinceTheFaultWasRead) {
  FaultLatencyShard shard;
  const int64_t read_at = now_ns();
  shard.record(FaultPath::kZero, read_at);
  shard.record(FaultPath::kZero, read_at);
  shard.record(FaultPath::kPrefetchLate, read_at);
  // A read time in the future (it cannot happen, but the clock is the
  // caller's): counted as zero, never as a huge unsigned duration.
  shard.record(FaultPath::kWorker, now_ns() + 1'000'000'000);
  std::array<HistogramCounts, kFaultPaths> c{};
  shard.add_to(c);
  EXPECT_EQ(c[static_cast<size_t>(FaultPath::kZero)].count(), 2u);
  EXPECT_EQ(c[static_cast<size_t>(FaultPath::kPrefetchLate)].count(), 1u);
  EXPECT_EQ(c[static_cast<size_t>(FaultPath::kReader)].count(), 0u);
  EXPECT_EQ(c[static_cast<size_t>(FaultPath::kWorker)].buckets[0], 1u);
  EXPECT_EQ(c[static_cast<size_t>(FaultPath::kWorker)].sum_ns, 0u);
  EXPECT_EQ(alignof(FaultLatencyShard), 64u);
}

}  // namespace
}  // namespace faultline::metrics
