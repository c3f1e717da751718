#include "guest/layout.h"

#include <gtest/gtest.h>

namespace faultline {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

GuestRegion region(uint64_t base, uint64_t size, uint64_t offset, uint64_t page = kPageSize4K) {
  return GuestRegion{base, size, offset, page};
}

TEST(GuestLayout, SingleRegionMapsAddressToPageAndFileOffset) {
  auto l = GuestLayout::create({region(0x7f0000000000, 64 * kMiB, 0)}, 64 * kMiB);
  ASSERT_TRUE(l) << l.error().describe();
  EXPECT_EQ(l->page_count(), 64 * kMiB / 4096);
  auto loc = l->locate(0x7f0000000000 + 5 * 4096 + 123);
  ASSERT_TRUE(loc);
  EXPECT_EQ(loc->page_index, 5u);
  EXPECT_EQ(loc->address, 0x7f0000000000 + 5 * 4096);
  EXPECT_EQ(loc->file_offset, 5u * 4096);
  EXPECT_FALSE(l->locate(0x7f0000000000 + 64 * kMiB));
  EXPECT_FALSE(l->locate(0x7f0000000000 - 1));
}

TEST(GuestLayout, MultiRegionUsesCumulativeOffsetsAndGlobalPageIndexes) {
  // Two regions in reverse address order, as an MMIO hole split can produce.
  auto l = GuestLayout::create({region(0x20000000, 8 * kMiB, 0), region(0x10000000, 4 * kMiB, 8 * kMiB)}, 12 * kMiB);
  ASSERT_TRUE(l) << l.error().describe();
  auto loc = l->locate(0x10000000 + 4096);
  ASSERT_TRUE(loc);
  EXPECT_EQ(loc->region, 1u);
  EXPECT_EQ(loc->page_index, 8 * kMiB / 4096 + 1);
  EXPECT_EQ(loc->file_offset, 8 * kMiB + 4096);
  PageLocation p = *l->page(loc->page_index);
  EXPECT_EQ(p.address, loc->address);
  EXPECT_EQ(p.file_offset, loc->file_offset);
}

TEST(GuestLayout, HugePageRegionIndexesTwoMegabytePages) {
  auto l = GuestLayout::create({region(0x40000000, 8 * kMiB, 0, kPageSize2M)}, 8 * kMiB);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->page_count(), 4u);
  auto loc = l->locate(0x40000000 + 3 * kMiB);
  ASSERT_TRUE(loc);
  EXPECT_EQ(loc->page_index, 1u);
  EXPECT_EQ(loc->address, 0x40000000 + 2 * kMiB);
  EXPECT_EQ(loc->page_size, kPageSize2M);
}

TEST(GuestLayout, RejectsBadRegionsWithTheReason) {
  struct Case {
    std::vector<GuestRegion> regions;
    uint64_t file;
    const char* needle;
  } cases[] = {
      {{}, 4096, "no guest memory regions"},
      {{region(0x1000, 4096, 0, 8192)}, 8192, "page size 8192"},
      {{region(0x1000, 0, 0)}, 4096, "size is 0"},
      {{region(0x1001, 4096, 0)}, 8192, "not aligned"},
      {{region(0x1000, 4097, 0)}, 8192, "not a multiple"},
      {{region(0x1000, 4096, 17)}, 8192, "file offset 17"},
      {{region(0x200000, 4096, 0, kPageSize2M)}, kPageSize2M, "not a multiple"},
      {{region(0x1000, 8192, 0)}, 4096, "beyond the end of the memory file"},
      {{region(0x1000, 8192, 0), region(0x2000, 4096, 8192)}, 12288, "overlaps region 0"},
      {{region(0x1000, 4096, 0), region(0x9000, 4096, 0)}, 8192, "in the memory file"},
      {{region(0xfffffffffffff000, 8192, 0)}, 8192, "overflows"},
  };
  for (const auto& c : cases) {
    auto l = GuestLayout::create(c.regions, c.file);
    ASSERT_FALSE(l) << c.needle;
    EXPECT_NE(l.error().message.find(c.needle), std::string::npos) << l.error().message;
  }
}

TEST(GuestLayout, WholePagesInRoundsInwardsAndSplitsAcrossRegions) {
  auto l = GuestLayout::create({region(0x10000, 4 * 4096, 0), region(0x14000, 4 * 4096, 4 * 4096)}, 8 * 4096);
  ASSERT_TRUE(l);
  // Starts mid-page 1 of region 0, ends mid-page 2 of region 1.
  auto ranges = l->whole_pages_in(0x10000 + 4096 + 10, 0x14000 + 2 * 4096 + 10);
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0].first_page, 2u);
  EXPECT_EQ(ranges[0].page_count, 2u);
  EXPECT_EQ(ranges[1].first_page, 4u);
  EXPECT_EQ(ranges[1].page_count, 2u);
  // Less than a page: nothing.
  EXPECT_TRUE(l->whole_pages_in(0x10000 + 1, 0x10000 + 4096).empty());
  // Outside the guest: nothing.
  EXPECT_TRUE(l->whole_pages_in(0x1000, 0x2000).empty());
}

TEST(GuestLayout, UnmapCutsASegmentAndKeepsTheOtherPagesIndexes) {
  auto l = GuestLayout::create({region(0x10000, 8 * 4096, 0)}, 8 * 4096);
  ASSERT_TRUE(l);
  GuestLayout u = l->unmapped(0x10000 + 2 * 4096, 0x10000 + 4 * 4096);
  EXPECT_EQ(u.segments().size(), 2u);
  EXPECT_FALSE(u.locate(0x10000 + 2 * 4096));
  EXPECT_FALSE(u.locate(0x10000 + 3 * 4096));
  EXPECT_FALSE(u.page(2));
  auto loc = u.locate(0x10000 + 5 * 4096);
  ASSERT_TRUE(loc);
  EXPECT_EQ(loc->page_index, 5u);
  EXPECT_EQ(loc->file_offset, 5u * 4096);
}

TEST(GuestLayout, RemapMovesPagesWithTheirIndexesAndFileOffsets) {
  auto l = GuestLayout::create({region(0x10000, 8 * 4096, 0)}, 8 * 4096);
  ASSERT_TRUE(l);
  // Move pages 4..7 to 0x900000.
  GuestLayout m = l->remapped(0x10000 + 4 * 4096, 0x900000, 4 * 4096);
  EXPECT_FALSE(m.locate(0x10000 + 4 * 4096));
  auto loc = m.locate(0x900000 + 4096);
  ASSERT_TRUE(loc);
  EXPECT_EQ(loc->page_index, 5u);
  EXPECT_EQ(loc->file_offset, 5u * 4096);
  EXPECT_EQ(m.page(5)->address, 0x900000u + 4096);
  EXPECT_EQ(m.page(1)->address, 0x10000u + 4096);
  // Whole pages in a range of the moved part.
  auto r = m.whole_pages_in(0x900000, 0x900000 + 2 * 4096);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].first_page, 4u);
}

}  // namespace
}  // namespace faultline
