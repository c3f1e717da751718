#include "guest/layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

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


// --- the layout as it was before lookups were sorted: the reference --------
//
// The linear code GuestLayout replaced (pairwise validation, scans on every
// lookup, segments in no particular order). The randomized tests below check
// that the sorted layout answers exactly as this one does.
class ReferenceLayout {
 public:
  static std::optional<ReferenceLayout> create(const std::vector<GuestRegion>& regions, uint64_t file) {
    if (regions.empty()) return std::nullopt;
    ReferenceLayout l;
    for (size_t i = 0; i < regions.size(); ++i) {
      const GuestRegion& r = regions[i];
      if (r.page_size != kPageSize4K && r.page_size != kPageSize2M) return std::nullopt;
      if (r.size == 0 || r.base_host_virt_addr % r.page_size || r.size % r.page_size || r.offset % r.page_size) {
        return std::nullopt;
      }
      if (r.base_host_virt_addr + r.size < r.base_host_virt_addr || r.offset + r.size < r.offset) return std::nullopt;
      if (r.offset + r.size > file) return std::nullopt;
      for (size_t j = 0; j < i; ++j) {
        const GuestRegion& o = regions[j];
        if (r.base_host_virt_addr < o.end() && o.base_host_virt_addr < r.end()) return std::nullopt;
        if (r.offset < o.offset + o.size && o.offset < r.offset + r.size) return std::nullopt;
      }
      l.segments_.push_back(Segment{r.base_host_virt_addr, r.size, r.offset, r.page_size, l.pages_, uint32_t(i)});
      l.pages_ += r.size / r.page_size;
    }
    return l;
  }
  std::optional<PageLocation> locate(uint64_t address) const {
    for (const Segment& g : segments_) {
      if (address < g.base || address >= g.end()) continue;
      const uint64_t in = (address - g.base) / g.page_size;
      return PageLocation{g.region, g.first_page + in, g.base + in * g.page_size, g.offset + in * g.page_size,
                          g.page_size};
    }
    return std::nullopt;
  }
  std::optional<PageLocation> page(uint64_t index) const {
    for (const Segment& g : segments_) {
      const uint64_t count = g.size / g.page_size;
      if (index < g.first_page || index >= g.first_page + count) continue;
      const uint64_t in = index - g.first_page;
      return PageLocation{g.region, index, g.base + in * g.page_size, g.offset + in * g.page_size, g.page_size};
    }
    return std::nullopt;
  }
  std::optional<uint64_t> page_at_offset(uint64_t offset) const {
    for (const Segment& g : segments_) {
      if (offset >= g.offset && offset < g.offset + g.size) return g.first_page + (offset - g.offset) / g.page_size;
    }
    return std::nullopt;
  }
  std::vector<PageRange> whole_pages_in(uint64_t start, uint64_t end) const {
    std::vector<PageRange> out;
    for (const Segment& g : segments_) {
      const uint64_t lo = std::max(start, g.base);
      const uint64_t hi = std::min(end, g.end());
      if (lo >= hi) continue;
      const uint64_t first = (lo - g.base + g.page_size - 1) / g.page_size;
      const uint64_t last = (hi - g.base) / g.page_size;
      if (first >= last) continue;
      out.push_back(PageRange{g.region, g.first_page + first, last - first, g.base + first * g.page_size, g.page_size});
    }
    return out;
  }
  ReferenceLayout unmapped(uint64_t start, uint64_t end) const {
    ReferenceLayout next = *this;
    next.segments_ = cut(segments_, start, end, nullptr);
    return next;
  }
  ReferenceLayout remapped(uint64_t from, uint64_t to, uint64_t len) const {
    ReferenceLayout next = *this;
    std::vector<Segment> moved;
    next.segments_ = cut(segments_, from, from + len, &moved);
    next.segments_ = cut(next.segments_, to, to + len, nullptr);
    for (Segment g : moved) {
      g.base = g.base - from + to;
      next.segments_.push_back(g);
    }
    return next;
  }
  const std::vector<Segment>& segments() const { return segments_; }
  uint64_t page_count() const { return pages_; }

 private:
  static std::vector<Segment> cut(const std::vector<Segment>& segments, uint64_t start, uint64_t end,
                                  std::vector<Segment>* inside) {
    std::vector<Segment> out;
    for (const Segment& g : segments) {
      const uint64_t lo = std::max(start, g.base);
      const uint64_t hi = std::min(end, g.end());
      if (lo >= hi) {
        out.push_back(g);
        continue;
      }
      const uint64_t a = (lo - g.base) / g.page_size * g.page_size;
      const uint64_t b = (hi - g.base + g.page_size - 1) / g.page_size * g.page_size;
      auto piece = [&](uint64_t from, uint64_t to) {
        return Segment{g.base + from, to - from, g.offset + from, g.page_size, g.first_page + from / g.page_size,
                       g.region};
      };
      if (a > 0) out.push_back(piece(0, a));
      if (inside != nullptr) inside->push_back(piece(a, b));
      if (b < g.size) out.push_back(piece(b, g.size));
    }
    return out;
  }
  std::vector<Segment> segments_;
  uint64_t pages_ = 0;
};

std::vector<PageRange> sorted_by_address(std::vector<PageRange> v) {
  std::sort(v.begin(), v.end(), [](const PageRange& a, const PageRange& b) { return a.address < b.address; });
  return v;
}

// Random regions as a VMM could lay them out: in a random address order with
// random gaps (some none: adjacent regions), a random mix of 4 KiB and 2 MiB
// pages, and file offsets in a different random order, back to back.
struct RandomRegions {
  std::vector<GuestRegion> regions;
  uint64_t file_size = 0;
};

RandomRegions random_regions(std::mt19937_64& rng, size_t n) {
  RandomRegions out;
  out.regions.resize(n);
  std::vector<size_t> address_order(n), file_order(n);
  for (size_t i = 0; i < n; ++i) address_order[i] = file_order[i] = i;
  std::shuffle(address_order.begin(), address_order.end(), rng);
  std::shuffle(file_order.begin(), file_order.end(), rng);
  for (GuestRegion& r : out.regions) {
    r.page_size = rng() % 8 == 0 ? kPageSize2M : kPageSize4K;
    r.size = (1 + rng() % 6) * r.page_size;
  }
  uint64_t address = 0x7f0000000000;
  for (size_t i : address_order) {
    GuestRegion& r = out.regions[i];
    address += (rng() % 3) * kPageSize2M;  // gap: none, or a few huge pages
    r.base_host_virt_addr = address;
    address += (r.size + kPageSize2M - 1) / kPageSize2M * kPageSize2M;
  }
  uint64_t offset = 0;
  for (size_t i : file_order) {
    GuestRegion& r = out.regions[i];
    offset = (offset + r.page_size - 1) / r.page_size * r.page_size;
    r.offset = offset;
    offset += r.size;
  }
  out.file_size = offset;
  return out;
}

// Every lookup of `l` answers as the reference does: at every segment's
// edges (and a byte either side), at random addresses, page indexes and file
// offsets, and for random ranges of whole pages.
void expect_same_answers(const GuestLayout& l, const ReferenceLayout& ref, std::mt19937_64& rng, uint64_t lo,
                         uint64_t hi) {
  std::vector<Segment> expected = ref.segments();
  std::sort(expected.begin(), expected.end(), [](const Segment& a, const Segment& b) { return a.base < b.base; });
  ASSERT_EQ(l.segments(), expected);
  std::vector<uint64_t> addresses;
  for (const Segment& g : expected) {
    for (uint64_t a : {g.base - 1, g.base, g.base + 1, g.end() - 1, g.end(), g.base + g.size / 2}) {
      addresses.push_back(a);
    }
    ASSERT_EQ(l.page(g.first_page), ref.page(g.first_page));
    ASSERT_EQ(l.page(g.first_page + g.page_count() - 1), ref.page(g.first_page + g.page_count() - 1));
    ASSERT_EQ(l.page(g.first_page + g.page_count()), ref.page(g.first_page + g.page_count()));
    ASSERT_EQ(l.page_at_offset(g.offset), ref.page_at_offset(g.offset));
    ASSERT_EQ(l.page_at_offset(g.offset + g.size - 1), ref.page_at_offset(g.offset + g.size - 1));
    ASSERT_EQ(l.page_at_offset(g.offset + g.size), ref.page_at_offset(g.offset + g.size));
  }
  for (int k = 0; k < 200; ++k) addresses.push_back(lo + rng() % (hi - lo));
  for (uint64_t a : addresses) ASSERT_EQ(l.locate(a), ref.locate(a)) << std::hex << a;
  for (int k = 0; k < 200; ++k) {
    const uint64_t index = rng() % (ref.page_count() + 2);
    ASSERT_EQ(l.page(index), ref.page(index)) << index;
    const uint64_t offset = rng() % (l.total_bytes() + 2 * kPageSize2M);
    ASSERT_EQ(l.page_at_offset(offset), ref.page_at_offset(offset)) << offset;
  }
  for (int k = 0; k < 50; ++k) {
    uint64_t a = lo + rng() % (hi - lo), b = lo + rng() % (hi - lo);
    if (a > b) std::swap(a, b);
    ASSERT_EQ(l.whole_pages_in(a, b), sorted_by_address(ref.whole_pages_in(a, b)));
  }
}

TEST(GuestLayout, ManyRegionsAnswerAsTheLinearReferenceThroughUnmapsAndRemaps) {
  std::mt19937_64 rng(20251129);
  for (size_t n : {1u, 2u, 3u, 5u, 64u, 700u}) {
    SCOPED_TRACE("regions=" + std::to_string(n));
    RandomRegions rr = random_regions(rng, n);
    auto l = GuestLayout::create(rr.regions, rr.file_size);
    ASSERT_TRUE(l) << l.error().describe();
    auto ref = ReferenceLayout::create(rr.regions, rr.file_size);
    ASSERT_TRUE(ref);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const GuestRegion& r : rr.regions) {
      lo = std::min(lo, r.base_host_virt_addr);
      hi = std::max(hi, r.end());
    }
    const uint64_t span = hi - lo;
    hi += span;  // remaps may land beyond the regions
    GuestLayout cur = *l;
    expect_same_answers(cur, *ref, rng, lo - kPageSize2M, hi + kPageSize2M);
    for (int step = 0; step < 60; ++step) {
      if (rng() % 2 == 0) {
        // munmap: any byte range (the cut rounds to whole pages).
        const uint64_t start = lo + rng() % span;
        const uint64_t end = start + 1 + rng() % (8 * kPageSize2M);
        cur = cur.unmapped(start, end);
        *ref = ref->unmapped(start, end);
      } else {
        // mremap: 2 MiB-aligned (the kernel moves whole pages of every kind),
        // to a destination that does not overlap the source.
        const uint64_t len = (1 + rng() % 4) * kPageSize2M;
        const uint64_t from = (lo + rng() % span) / kPageSize2M * kPageSize2M;
        uint64_t to = (lo + rng() % (hi - lo)) / kPageSize2M * kPageSize2M;
        if (to < from + len && from < to + len) to = from + len + (rng() % 4) * kPageSize2M;
        cur = cur.remapped(from, to, len);
        *ref = ref->remapped(from, to, len);
      }
      hi = std::max(hi, lo + 3 * span);
      expect_same_answers(cur, *ref, rng, lo - kPageSize2M, hi + kPageSize2M);
      if (::testing::Test::HasFatalFailure()) return;
    }
    EXPECT_EQ(cur.page_count(), ref->page_count());
  }
}

TEST(GuestLayout, UnmappingEveryOtherPageOfARegionLeavesThousandsOfSegmentsFoundBySearch) {
  // Each unmap copies the layout: quadratic, 55 s under ThreadSanitizer at
  // 8192 pages, where this single-threaded test has no race to find.
#if defined(__SANITIZE_THREAD__)
  constexpr uint64_t kPages = 2048;
#else
  constexpr uint64_t kPages = 8192;
#endif
  auto l = GuestLayout::create({region(0x10000000, kPages * 4096, 0)}, kPages * 4096);
  ASSERT_TRUE(l);
  GuestLayout cur = *l;
  for (uint64_t p = 1; p < kPages; p += 2) cur = cur.unmapped(0x10000000 + p * 4096, 0x10000000 + (p + 1) * 4096);
  ASSERT_EQ(cur.segments().size(), kPages / 2);
  for (uint64_t p = 0; p < kPages; ++p) {
    auto loc = cur.locate(0x10000000 + p * 4096 + 7);
    auto by_index = cur.page(p);
    auto by_offset = cur.page_at_offset(p * 4096);
    if (p % 2 == 1) {
      EXPECT_FALSE(loc);
      EXPECT_FALSE(by_index);
      EXPECT_FALSE(by_offset);
      continue;
    }
    ASSERT_TRUE(loc);
    EXPECT_EQ(loc->page_index, p);
    EXPECT_EQ(loc->file_offset, p * 4096);
    ASSERT_TRUE(by_index);
    EXPECT_EQ(*by_index, *loc);
    EXPECT_EQ(by_offset, p);
  }
}

TEST(GuestLayout, CreatesTheMaximumNumberOfRegionsAndFindsEachOne) {
  std::mt19937_64 rng(7);
  RandomRegions rr = random_regions(rng, kMaxRegionsCeiling);
  auto l = GuestLayout::create(rr.regions, rr.file_size);
  ASSERT_TRUE(l) << l.error().describe();
  ASSERT_EQ(l->segments().size(), kMaxRegionsCeiling);
  uint64_t pages = 0;
  for (const GuestRegion& r : rr.regions) pages += r.size / r.page_size;
  EXPECT_EQ(l->page_count(), pages);
  // Every region's first and last page, by address, index and file offset.
  uint64_t first_page = 0;
  for (size_t i = 0; i < rr.regions.size(); ++i) {
    const GuestRegion& r = rr.regions[i];
    const uint64_t count = r.size / r.page_size;
    for (uint64_t k : {uint64_t{0}, count - 1}) {
      auto loc = l->locate(r.base_host_virt_addr + k * r.page_size + 1);
      ASSERT_TRUE(loc) << "region " << i;
      EXPECT_EQ(loc->region, i);
      EXPECT_EQ(loc->page_index, first_page + k);
      EXPECT_EQ(loc->file_offset, r.offset + k * r.page_size);
      EXPECT_EQ(l->page(first_page + k), loc);
      EXPECT_EQ(l->page_at_offset(r.offset + k * r.page_size), first_page + k);
    }
    first_page += count;
  }
}

TEST(GuestLayout, FindsOneOverlapAmongTheMaximumNumberOfRegionsAndNamesBothRegions) {
  std::mt19937_64 rng(11);
  const RandomRegions valid = random_regions(rng, kMaxRegionsCeiling);
  // Two 4 KiB regions far apart in the list; j is shrunk to fit inside i, so
  // that it overlaps i and nothing else.
  size_t i = 100, j = 7000;
  while (valid.regions[i].page_size != kPageSize4K) ++i;
  while (valid.regions[j].page_size != kPageSize4K) ++j;
  const std::string names = "region " + std::to_string(j) + " ";
  const std::string other = "overlaps region " + std::to_string(i) + " ";

  RandomRegions rr = valid;
  rr.regions[j].base_host_virt_addr = rr.regions[i].base_host_virt_addr;
  rr.regions[j].size = std::min(rr.regions[j].size, rr.regions[i].size);
  auto l = GuestLayout::create(rr.regions, rr.file_size);
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().message.rfind(names, 0), 0u) << l.error().message;
  EXPECT_NE(l.error().message.find(other), std::string::npos) << l.error().message;
  EXPECT_NE(l.error().message.find("in memory"), std::string::npos) << l.error().message;

  rr = valid;
  rr.regions[j].offset = rr.regions[i].offset;
  rr.regions[j].size = std::min(rr.regions[j].size, rr.regions[i].size);
  l = GuestLayout::create(rr.regions, rr.file_size);
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().message.rfind(names, 0), 0u) << l.error().message;
  EXPECT_NE(l.error().message.find(other + "in the memory file"), std::string::npos) << l.error().message;
}

TEST(GuestLayout, AcceptsAndRejectsRandomRegionSetsExactlyAsThePairwiseCheckDid) {
  std::mt19937_64 rng(99);
  for (int round = 0; round < 300; ++round) {
    RandomRegions rr = random_regions(rng, 2 + rng() % 40);
    // Nudge one region onto another's addresses or offsets, sometimes.
    const size_t a = rng() % rr.regions.size(), b = rng() % rr.regions.size();
    switch (rng() % 3) {
      case 0: rr.regions[a].base_host_virt_addr = rr.regions[b].base_host_virt_addr + (rng() % 2) * kPageSize2M; break;
      case 1: rr.regions[a].offset = rr.regions[b].offset + (rng() % 2) * rr.regions[b].size; break;
      default: break;
    }
    auto l = GuestLayout::create(rr.regions, rr.file_size);
    auto ref = ReferenceLayout::create(rr.regions, rr.file_size);
    ASSERT_EQ(l.has_value(), ref.has_value()) << (l ? std::string("accepted") : l.error().message);
  }
}

}  // namespace
}  // namespace faultline
