// PublishedLayout: old layouts are freed once no read slot can hold them, and
// never while one can. The concurrent test is meant for ThreadSanitizer and
// AddressSanitizer: a layout freed under a reader is a use-after-free there.
#include "server/published_layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace faultline {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBase = 0x7f0000000000;

// Layout number `n`: one 2 MiB region at kBase + n * 2 MiB.
GuestLayout layout_number(uint64_t n) {
  auto l = GuestLayout::create({GuestRegion{kBase + n * 2 * kMiB, 2 * kMiB, 0, kPageSize4K}}, 2 * kMiB);
  EXPECT_TRUE(l);
  return std::move(*l);
}

uint64_t number_of(const GuestLayout& l) { return (l.segments().at(0).base - kBase) / (2 * kMiB); }

TEST(PublishedLayout, WithNoReaderOnlyTheCurrentLayoutIsKept) {
  PublishedLayout p(layout_number(0), 3);
  for (uint64_t n = 1; n <= 1000; ++n) {
    p.publish(layout_number(n));
    ASSERT_EQ(p.retained(), 1u);
  }
  EXPECT_EQ(p.peak_retained(), 2u);  // the new one and the old one, until the old was freed
  EXPECT_EQ(p.changes(), 1000u);
  EXPECT_EQ(number_of(p.current_for_writer()), 1000u);
}

TEST(PublishedLayout, AReaderKeepsWhatItSeesAndEverythingRetiredAfterItUntilItLeaves) {
  PublishedLayout p(layout_number(0), 2);
  {
    auto r = p.read(1);
    EXPECT_EQ(number_of(*r), 0u);
    for (uint64_t n = 1; n <= 5; ++n) p.publish(layout_number(n));
    // Layout 0 is what the reader holds; 1..4 were retired while it read.
    EXPECT_EQ(p.retained(), 6u);
    EXPECT_EQ(number_of(*r), 0u);  // still readable
    {
      auto nested = p.read(1);  // the same thread again: the outer section still counts
      EXPECT_EQ(number_of(*nested), 5u);
    }
    p.reclaim();
    EXPECT_EQ(p.retained(), 6u);
    EXPECT_EQ(number_of(*r), 0u);
  }
  p.reclaim();
  EXPECT_EQ(p.retained(), 1u);
}

TEST(PublishedLayout, AReaderThatEnteredAfterAChangeDoesNotPinOlderLayouts) {
  PublishedLayout p(layout_number(0), 2);
  p.publish(layout_number(1));
  auto r = p.read(0);
  EXPECT_EQ(number_of(*r), 1u);
  p.publish(layout_number(2));
  // Layout 1 (the reader's) is kept, layout 0 is gone.
  EXPECT_EQ(p.retained(), 2u);
}

TEST(PublishedLayout, ASnapshotOutlivesItsRetirement) {
  PublishedLayout p(layout_number(0), 1);
  std::shared_ptr<const GuestLayout> held = p.snapshot();
  for (uint64_t n = 1; n <= 10; ++n) p.publish(layout_number(n));
  EXPECT_EQ(p.retained(), 1u);
  EXPECT_EQ(number_of(*held), 0u);
  EXPECT_EQ(number_of(*p.snapshot()), 10u);
}

TEST(PublishedLayout, ConcurrentReadersNeverSeeAFreedLayoutWhileTheWriterPublishesThousands) {
  constexpr size_t kReaders = 3;
  constexpr uint64_t kLayouts = 20000;
  PublishedLayout p(layout_number(0), kReaders);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> reads{0};
  // Each reader counts its own reads, so the writer can go on publishing until every reader
  // has read while it published (on a loaded host the writer alone can finish 20000 layouts
  // before a reader thread is first scheduled).
  std::array<std::atomic<uint64_t>, kReaders> reads_by{};
  std::vector<std::thread> readers;
  for (size_t slot = 0; slot < kReaders; ++slot) {
    readers.emplace_back([&, slot] {
      // A failed ASSERT returns from here: count the reader as done so the writer stops.
      const struct Leave {
        std::atomic<uint64_t>& count;
        ~Leave() { count.store(UINT64_MAX); }
      } leave{reads_by[slot]};
      uint64_t last = 0;
      while (!done.load(std::memory_order_acquire)) {
        auto r = p.read(slot);
        // Everything a fault would look at: segments, regions, lookups.
        const uint64_t n = number_of(*r);
        ASSERT_GE(n, last);  // layouts only move forward
        last = n;
        const uint64_t base = kBase + n * 2 * kMiB;
        ASSERT_EQ(r->segments().size(), 1u);
        ASSERT_EQ(r->regions().at(0).base_host_virt_addr, base);
        for (uint64_t k = 0; k < 512; k += 37) ASSERT_EQ(r->locate(base + k * 4096)->page_index, k);
        reads.fetch_add(1, std::memory_order_relaxed);
        reads_by[slot].fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  std::thread snapshots([&] {
    while (!done.load(std::memory_order_acquire)) ASSERT_EQ(p.snapshot()->segments().size(), 1u);
  });
  constexpr uint64_t kReadsEach = 100;
  const auto every_reader_read = [&] {
    return std::ranges::all_of(reads_by, [](const auto& r) { return r.load() >= kReadsEach; });
  };
  for (uint64_t n = 1; n <= kLayouts || !every_reader_read(); ++n) p.publish(layout_number(n));
  done.store(true, std::memory_order_release);
  for (auto& t : readers) t.join();
  snapshots.join();
  p.reclaim();
  EXPECT_EQ(p.retained(), 1u);
  EXPECT_GT(reads.load(), 0u);
}

}  // namespace
}  // namespace faultline
