// The fault-around policy: windows start at the rest of the fault's 64 KiB
// block, double while a stream keeps faulting at its end, and shrink to one
// page when faults stop continuing streams. Meant for ThreadSanitizer too.
#include "server/fault_around.h"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

namespace faultline {
namespace {

TEST(FaultAround, OffInstallsOnlyTheFaultingPage) {
  for (uint32_t max : {0u, 1u}) {
    FaultAround fa(max);
    EXPECT_FALSE(fa.enabled());
    for (uint64_t page : {0ull, 1ull, 2ull, 16ull, 17ull}) EXPECT_EQ(fa.window(page), 1u) << "max " << max;
  }
}

TEST(FaultAround, ANewStreamGetsTheRestOfItsSixteenPageBlock) {
  FaultAround a(64);
  EXPECT_EQ(a.window(32), 16u);
  FaultAround b(64);
  EXPECT_EQ(b.window(35), 13u) << "pages 35..47: the block ends at 48";
  FaultAround c(64);
  EXPECT_EQ(c.window(47), 1u);
  FaultAround d(8);
  EXPECT_EQ(d.window(3), 5u) << "a maximum below 16 bounds the first window too";
}

TEST(FaultAround, ASequentialStreamDoublesUpToTheMaximumInWindowsAlignedToTheirSize) {
  FaultAround fa(64);
  uint64_t page = 1024;
  std::vector<uint32_t> windows;
  for (int i = 0; i < 6; ++i) {
    const uint32_t w = fa.window(page);
    windows.push_back(w);
    page += w;  // the guest touched every page installed ahead, then faults at the end
  }
  // 1024..1039 (the block), 1040..1055 (a 32-page window ends at a multiple
  // of 32), 1056..1087, then 64 pages from a multiple of 64 on.
  EXPECT_EQ(windows, (std::vector<uint32_t>{16, 16, 32, 64, 64, 64}));
  EXPECT_EQ(fa.started(), 1u);
  EXPECT_EQ(fa.continued(), 5u);
}

TEST(FaultAround, AMaximumThatIsNoPowerOfTwoIsReachedAndNoWindowCrossesAPowerOfTwoBoundaryAboveIt) {
  FaultAround fa(24);
  EXPECT_EQ(fa.window(0), 16u);
  EXPECT_EQ(fa.window(16), 16u) << "24 pages, cut at 32";
  EXPECT_EQ(fa.window(32), 24u);
  EXPECT_EQ(fa.window(56), 8u) << "24 pages, cut at 64";
}

TEST(FaultAround, AFaultAShortWayPastTheWindowStillContinuesTheStream) {
  FaultAround fa(64);
  ASSERT_EQ(fa.window(0), 16u);  // next expected: 16, up to half a window later
  EXPECT_EQ(fa.window(23), 9u) << "pages 16..22 skipped: still the stream (32 pages, cut at 32)";
  EXPECT_EQ(fa.continued(), 1u);
  FaultAround far(64);
  ASSERT_EQ(far.window(0), 16u);
  EXPECT_EQ(far.window(24), 8u) << "past half a window: a new stream (the rest of block 16..31)";
  EXPECT_EQ(far.continued(), 0u);
}

TEST(FaultAround, AFaultInsideTheLastWindowIsNoContinuation) {
  // A page inside the window faults when the window was cut short (a
  // present or removed neighbour): that is not the guest running ahead.
  FaultAround fa(64);
  ASSERT_EQ(fa.window(0), 16u);
  EXPECT_EQ(fa.window(5), 11u);
  EXPECT_EQ(fa.continued(), 0u);
}

TEST(FaultAround, InterleavedStreamsGrowEachOnItsOwn) {
  FaultAround fa(64);
  // Four vCPUs walking four areas, one fault each in turn.
  std::vector<uint64_t> next{0, 100000, 200000, 300000};
  std::vector<std::vector<uint32_t>> windows(4);
  for (int round = 0; round < 4; ++round) {
    for (size_t v = 0; v < next.size(); ++v) {
      const uint32_t w = fa.window(next[v]);
      windows[v].push_back(w);
      next[v] += w;
    }
  }
  // Each stream's windows are those it gets walking alone.
  for (size_t v = 0; v < windows.size(); ++v) {
    FaultAround alone(64);
    uint64_t page = v * 100000;
    std::vector<uint32_t> expected;
    for (int round = 0; round < 4; ++round) {
      expected.push_back(alone.window(page));
      page += expected.back();
    }
    EXPECT_EQ(windows[v], expected) << "vCPU " << v;
    EXPECT_EQ(alone.continued(), 3u);
  }
  EXPECT_EQ(fa.started(), 4u);
  EXPECT_EQ(fa.continued(), 12u);
}

TEST(FaultAround, RandomAccessShrinksTheStartingWindowToOnePage) {
  FaultAround fa(64);
  std::mt19937_64 rng(7);
  uint64_t installed = 0;
  const int faults = 1000;
  for (int i = 0; i < faults; ++i) installed += fa.window(rng() % (1ull << 30));
  EXPECT_EQ(fa.start_pages(), 1u);
  // The first few random faults paid a window (16 pages for 5 faults, 4 for
  // 8 more); all the rest one page.
  EXPECT_LE(installed, static_cast<uint64_t>(faults) + 5 * 15 + 8 * 3);
  EXPECT_EQ(fa.continued(), 0u);
}

TEST(FaultAround, AStreamAfterRandomAccessGrowsFromOnePageAndRestoresTheStart) {
  FaultAround fa(64);
  std::mt19937_64 rng(9);
  for (int i = 0; i < 100; ++i) (void)fa.window(rng() % (1ull << 30));
  ASSERT_EQ(fa.start_pages(), 1u);
  uint64_t page = 5ull << 32;
  std::vector<uint32_t> windows;
  for (int i = 0; i < 9; ++i) {
    const uint32_t w = fa.window(page);
    windows.push_back(w);
    page += w;
  }
  // The second window (2 pages) starts on an odd page: cut to 1 at the
  // multiple of 2; from then on every window starts aligned to its size.
  EXPECT_EQ(windows, (std::vector<uint32_t>{1, 1, 2, 4, 8, 16, 32, 64, 64}));
  // Faults continuing the stream raised the score again: new streams start
  // with more than one page once the stream has run a while.
  for (int i = 0; i < 20; ++i) page += fa.window(page);
  EXPECT_EQ(fa.start_pages(), 16u);
}

TEST(FaultAround, NewRunsRightAfterInstalledMemoryKeepTheStartingWindow) {
  // Runs of 12 pages, each a new stream (every window covers its run whole,
  // so no stream is ever continued), each starting right after memory the
  // guest touched before: the locality keeps windows at 16.
  FaultAround fa(64);
  for (uint64_t run = 0; run < 100; ++run) (void)fa.window(run * 1000, /*follows_installed=*/true);
  EXPECT_EQ(fa.start_pages(), 16u);
  FaultAround jumps(64);
  for (uint64_t run = 0; run < 100; ++run) (void)jumps.window(run * 1000, /*follows_installed=*/false);
  EXPECT_EQ(jumps.start_pages(), 1u);
}

TEST(FaultAround, AStreamAtFullSpeedReadsItsNextWindowAheadAndFaultsAtItsEnd) {
  FaultAround fa(64, /*readahead=*/true);
  using P = FaultAround::Plan;
  auto eq = [](P a, P b) { return a.pages == b.pages && a.readahead == b.readahead; };
  EXPECT_TRUE(eq(fa.plan(1024), P{16, 0})) << "a new stream: its block, nothing ahead";
  EXPECT_TRUE(eq(fa.plan(1040), P{16, 0})) << "still growing: nothing ahead";
  EXPECT_TRUE(eq(fa.plan(1056), P{32, 0})) << "64 pages cut to 32 at a multiple of 64: not yet a full window";
  const P full = fa.plan(1088);
  EXPECT_TRUE(eq(full, P{64, 64})) << full.pages << "+" << full.readahead
                                   << ": 1088..1151 now, 1152..1215 ahead";
  const P next = fa.plan(1216);  // the guest walked the readahead: its end
  EXPECT_TRUE(eq(next, P{64, 64})) << next.pages << "+" << next.readahead;
  EXPECT_EQ(fa.continued(), 4u);
  EXPECT_EQ(fa.readahead_late(), 0u);
}

TEST(FaultAround, AFaultInsideAReadaheadThatHasNotLandedGetsTheRestOfItAndTheStreamGoesOn) {
  FaultAround fa(64, true);
  for (uint64_t page : {1024u, 1040u, 1056u}) (void)fa.plan(page);
  ASSERT_EQ(fa.plan(1088).readahead, 64u);  // 1152..1215 ahead
  const FaultAround::Plan late = fa.plan(1160);
  EXPECT_EQ(late.pages, 56u) << "1160..1215: the rest of the readahead window";
  EXPECT_EQ(late.readahead, 0u);
  EXPECT_EQ(fa.readahead_late(), 1u);
  const FaultAround::Plan next = fa.plan(1216);
  EXPECT_EQ(next.pages, 64u) << "the stream continues at the readahead's end";
  EXPECT_EQ(next.readahead, 64u);
}

TEST(FaultAround, WithoutReadaheadNothingIsPlannedAhead) {
  FaultAround fa(64, false);
  uint64_t page = 1024;
  for (int i = 0; i < 6; ++i) {
    const FaultAround::Plan p = fa.plan(page);
    EXPECT_EQ(p.readahead, 0u);
    page += p.pages;
  }
  EXPECT_EQ(fa.continued(), 5u);
}

TEST(FaultAround, ConcurrentFaultsGetWindowsWithinBounds) {
  for (const bool readahead : {false, true}) {
    FaultAround fa(64, readahead);
    std::atomic<bool> bad{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(t);
        uint64_t page = static_cast<uint64_t>(t % 2) << 20;  // two threads share each stream
        for (int i = 0; i < 20000; ++i) {
          const FaultAround::Plan p = (i % 7 == 0) ? fa.plan(rng() % (1ull << 30)) : fa.plan(page);
          if (p.pages < 1 || p.pages > 64 || p.readahead > 64 || (!readahead && p.readahead != 0)) bad = true;
          page += p.pages + p.readahead;
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_FALSE(bad) << "readahead " << readahead;
    EXPECT_EQ(fa.started() + fa.continued() + fa.readahead_late(), 4u * 20000u) << "readahead " << readahead;
  }
}

}  // namespace
}  // namespace faultline
