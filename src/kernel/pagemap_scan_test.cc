// The dirty query never under-reports: a PAGEMAP_SCAN walk that stops early
// is continued, one that stops making progress is finished from
// /proc/PID/pagemap, and a failure is an error rather than a shorter list.
#include "kernel/pagemap_scan.h"

#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace faultline::kernel {
namespace {

bool operator==(const AddressRange& a, const AddressRange& b) { return a.start == b.start && a.end == b.end; }

TEST(NextScanStep, ContinuesFromWhereTheKernelStopped) {
  const ScanStep s = next_scan_step(0x1000, 0x10000, 0x5000);
  EXPECT_EQ(s.action, ScanStep::kContinue);
  EXPECT_EQ(s.next, 0x5000u);
}

TEST(NextScanStep, IsDoneWhenTheWalkReachedTheEnd) {
  EXPECT_EQ(next_scan_step(0x1000, 0x10000, 0x10000).action, ScanStep::kDone);
}

TEST(NextScanStep, NoProgressFallsBackFromTheCursorInsteadOfStopping) {
  for (uint64_t walk_end : {0x3000ull, 0x2000ull, 0ull}) {
    const ScanStep s = next_scan_step(0x3000, 0x10000, walk_end);
    EXPECT_EQ(s.action, ScanStep::kFallbackFrom) << walk_end;
    EXPECT_EQ(s.next, 0x3000u) << walk_end;
  }
}

TEST(WalkScanRange, StalledWalkReadsTheRestFromThePagemapFallback) {
  std::vector<std::pair<uint64_t, uint64_t>> fallback_calls;
  int scan_calls = 0;
  auto scan = [&](uint64_t cursor, uint64_t, std::vector<AddressRange>& out) -> Result<std::optional<uint64_t>> {
    ++scan_calls;
    if (cursor == 0x0) {
      out.push_back({0x1000, 0x2000});
      return std::optional<uint64_t>(0x4000);  // stopped early (vector full)
    }
    return std::optional<uint64_t>(cursor);  // no progress
  };
  auto fallback = [&](uint64_t from, uint64_t end, std::vector<AddressRange>& out) -> Status {
    fallback_calls.emplace_back(from, end);
    out.push_back({0x4000, 0x6000});
    out.push_back({0x8000, 0x9000});
    return {};
  };
  std::vector<AddressRange> out;
  auto method = walk_scan_range(0, 0x10000, scan, fallback, out);
  ASSERT_TRUE(method) << method.error().describe();
  EXPECT_EQ(*method, ScanMethod::kPagemap);
  EXPECT_EQ(scan_calls, 2);
  ASSERT_EQ(fallback_calls.size(), 1u);
  EXPECT_EQ(fallback_calls[0], std::make_pair(uint64_t{0x4000}, uint64_t{0x10000}));
  ASSERT_EQ(out.size(), 3u);
  EXPECT_TRUE(out[0] == (AddressRange{0x1000, 0x2000}));
  EXPECT_TRUE(out[1] == (AddressRange{0x4000, 0x6000}));
  EXPECT_TRUE(out[2] == (AddressRange{0x8000, 0x9000}));
}

TEST(WalkScanRange, RangesAStalledCallReportedBeyondTheCursorAreNotCountedTwice) {
  auto scan = [&](uint64_t cursor, uint64_t, std::vector<AddressRange>& out) -> Result<std::optional<uint64_t>> {
    out.push_back({0x2000, 0x3000});  // a region reported, yet walk_end did not move
    return std::optional<uint64_t>(cursor);
  };
  auto fallback = [&](uint64_t from, uint64_t, std::vector<AddressRange>& out) -> Status {
    EXPECT_EQ(from, 0x1000u);
    out.push_back({0x2000, 0x3000});
    return {};
  };
  std::vector<AddressRange> out;
  auto method = walk_scan_range(0x1000, 0x4000, scan, fallback, out);
  ASSERT_TRUE(method);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out[0] == (AddressRange{0x2000, 0x3000}));
}

TEST(WalkScanRange, KernelWithoutPagemapScanUsesTheFallbackForTheWholeRange) {
  auto scan = [&](uint64_t, uint64_t, std::vector<AddressRange>&) -> Result<std::optional<uint64_t>> {
    return std::optional<uint64_t>();
  };
  std::pair<uint64_t, uint64_t> called{};
  auto fallback = [&](uint64_t from, uint64_t end, std::vector<AddressRange>& out) -> Status {
    called = {from, end};
    out.push_back({0x1000, 0x2000});
    return {};
  };
  std::vector<AddressRange> out;
  auto method = walk_scan_range(0x1000, 0x9000, scan, fallback, out);
  ASSERT_TRUE(method);
  EXPECT_EQ(*method, ScanMethod::kPagemap);
  EXPECT_EQ(called, std::make_pair(uint64_t{0x1000}, uint64_t{0x9000}));
  EXPECT_EQ(out.size(), 1u);
}

TEST(WalkScanRange, AFailedCallIsAnErrorNotAShorterList) {
  int calls = 0;
  auto scan = [&](uint64_t cursor, uint64_t, std::vector<AddressRange>& out) -> Result<std::optional<uint64_t>> {
    if (calls++ == 0) {
      out.push_back({cursor, cursor + 0x1000});
      return std::optional<uint64_t>(cursor + 0x2000);
    }
    errno = EIO;
    return fail_errno("PAGEMAP_SCAN failed");
  };
  auto fallback = [&](uint64_t, uint64_t, std::vector<AddressRange>&) -> Status {
    ADD_FAILURE() << "a failure is not a reason to guess";
    return {};
  };
  std::vector<AddressRange> out;
  auto method = walk_scan_range(0, 0x10000, scan, fallback, out);
  ASSERT_FALSE(method);
  EXPECT_EQ(method.error().code, EIO);
}

// The real kernel: more present runs than one PAGEMAP_SCAN call's output
// vector holds (512), so the walk must continue from walk_end several times.
TEST(ScanPresentPages, MoreRunsThanOneCallReturnsAreAllReported) {
  constexpr uint64_t kPages = 4096;
  void* p = ::mmap(nullptr, kPages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  // 4 KiB pages only: a transparent huge page would make every page present.
  ::madvise(p, kPages * 4096, MADV_NOHUGEPAGE);
  auto* bytes = static_cast<uint8_t*>(p);
  const uint64_t base = reinterpret_cast<uint64_t>(p);
  std::vector<AddressRange> expected;
  for (uint64_t i = 0; i < kPages; i += 2) {
    bytes[i * 4096] = 1;
    expected.push_back({base + i * 4096, base + (i + 1) * 4096});
  }
  for (bool force_fallback : {false, true}) {
    auto present = scan_present_pages(::getpid(), base, kPages * 4096, force_fallback);
    ASSERT_TRUE(present) << present.error().describe();
    EXPECT_EQ(present->method, force_fallback ? ScanMethod::kPagemap : ScanMethod::kPagemapScan);
    ASSERT_EQ(present->ranges.size(), expected.size()) << "fallback " << force_fallback;
    for (size_t k = 0; k < expected.size(); ++k) {
      ASSERT_TRUE(present->ranges[k] == expected[k]) << "range " << k << " fallback " << force_fallback;
    }
  }
  ::munmap(p, kPages * 4096);
}

}  // namespace
}  // namespace faultline::kernel
