#include "guest/layout.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>

namespace faultline {

namespace {

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

PageLocation location_in(const Segment& g, uint64_t page_in_segment) {
  return PageLocation{g.region, g.first_page + page_in_segment, g.base + page_in_segment * g.page_size,
                      g.offset + page_in_segment * g.page_size, g.page_size};
}

// Checks one region on its own: page size, alignment, bounds.
Status check_region(const GuestRegion& r, size_t i, uint64_t memory_file_size) {
  const std::string name = "region " + std::to_string(i);
  if (r.page_size != kPageSize4K && r.page_size != kPageSize2M) {
    return fail(name + ": page size " + std::to_string(r.page_size) + " is not 4096 or 2097152");
  }
  if (r.size == 0) return fail(name + ": size is 0");
  if (r.base_host_virt_addr % r.page_size != 0) {
    return fail(name + ": base address " + hex(r.base_host_virt_addr) + " is not aligned to its page size " +
                std::to_string(r.page_size));
  }
  if (r.size % r.page_size != 0) {
    return fail(name + ": size " + std::to_string(r.size) + " is not a multiple of its page size " +
                std::to_string(r.page_size));
  }
  if (r.offset % r.page_size != 0) {
    return fail(name + ": file offset " + std::to_string(r.offset) + " is not aligned to its page size " +
                std::to_string(r.page_size));
  }
  if (r.base_host_virt_addr + r.size < r.base_host_virt_addr || r.offset + r.size < r.offset) {
    return fail(name + ": base/offset + size overflows 64 bits");
  }
  if (r.offset + r.size > memory_file_size) {
    return fail(name + ": bytes " + std::to_string(r.offset) + ".." + std::to_string(r.offset + r.size) +
                " lie beyond the end of the memory file (" + std::to_string(memory_file_size) + " bytes)");
  }
  return {};
}

// Finds two regions whose [start(r), start(r)+size) ranges overlap, in
// O(n log n): sorted by start, ranges are disjoint iff each one ends before
// the next one begins (if a overlaps some later b, it overlaps the one right
// after it too). Returns the pair (lower index first), or nullopt.
template <typename Start>
std::optional<std::pair<size_t, size_t>> find_overlap(const std::vector<GuestRegion>& regions, Start start) {
  std::vector<uint32_t> order(regions.size());
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return start(regions[a]) != start(regions[b]) ? start(regions[a]) < start(regions[b]) : a < b;
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const GuestRegion& prev = regions[order[k - 1]];
    if (start(regions[order[k]]) < start(prev) + prev.size) {
      return std::pair<size_t, size_t>{std::min(order[k - 1], order[k]), std::max(order[k - 1], order[k])};
    }
  }
  return std::nullopt;
}

}  // namespace

Result<GuestLayout> GuestLayout::create(std::vector<GuestRegion> regions, uint64_t memory_file_size) {
  if (regions.empty()) return fail("the handshake describes no guest memory regions");
  if (regions.size() > UINT32_MAX) return fail("the handshake describes more than 2^32 regions");
  for (size_t i = 0; i < regions.size(); ++i) {
    if (auto ok = check_region(regions[i], i, memory_file_size); !ok) return std::unexpected(ok.error());
  }
  // Every region passed its own checks, so base + size and offset + size do
  // not overflow below.
  if (auto pair = find_overlap(regions, [](const GuestRegion& r) { return r.base_host_virt_addr; })) {
    const GuestRegion& a = regions[pair->first];
    const GuestRegion& b = regions[pair->second];
    return fail("region " + std::to_string(pair->second) + " [" + hex(b.base_host_virt_addr) + ", " + hex(b.end()) +
                ") overlaps region " + std::to_string(pair->first) + " [" + hex(a.base_host_virt_addr) + ", " +
                hex(a.end()) + ") in memory");
  }
  if (auto pair = find_overlap(regions, [](const GuestRegion& r) { return r.offset; })) {
    return fail("region " + std::to_string(pair->second) + " overlaps region " + std::to_string(pair->first) +
                " in the memory file (offsets " + std::to_string(regions[pair->second].offset) + " and " +
                std::to_string(regions[pair->first].offset) + ")");
  }
  GuestLayout layout;
  layout.segments_.reserve(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const GuestRegion& r = regions[i];
    layout.segments_.push_back(
        Segment{r.base_host_virt_addr, r.size, r.offset, r.page_size, layout.page_count_, static_cast<uint32_t>(i)});
    layout.page_count_ += r.size / r.page_size;
    layout.total_bytes_ += r.size;
  }
  layout.regions_ = std::make_shared<const std::vector<GuestRegion>>(std::move(regions));
  layout.index();
  return layout;
}

void GuestLayout::index() {
  std::sort(segments_.begin(), segments_.end(), [](const Segment& a, const Segment& b) { return a.base < b.base; });
  base_keys_.clear();
  page_keys_.clear();
  by_page_.clear();
  offset_keys_.clear();
  by_offset_.clear();
  if (segments_.size() <= kScanLimit) return;  // lookups scan segments_
  base_keys_.reserve(segments_.size());
  for (const Segment& g : segments_) base_keys_.push_back(g.base);
  by_page_.resize(segments_.size());
  std::iota(by_page_.begin(), by_page_.end(), 0u);
  by_offset_ = by_page_;
  std::sort(by_page_.begin(), by_page_.end(),
            [&](uint32_t a, uint32_t b) { return segments_[a].first_page < segments_[b].first_page; });
  std::sort(by_offset_.begin(), by_offset_.end(),
            [&](uint32_t a, uint32_t b) { return segments_[a].offset < segments_[b].offset; });
  page_keys_.reserve(segments_.size());
  for (uint32_t i : by_page_) page_keys_.push_back(segments_[i].first_page);
  offset_keys_.reserve(segments_.size());
  for (uint32_t i : by_offset_) offset_keys_.push_back(segments_[i].offset);
}

namespace {

constexpr size_t kNone = SIZE_MAX;

// Position of the last key <= x in sorted, non-empty `keys`, or kNone. No
// data-dependent branch in the loop (the compiler emits a conditional move):
// a fault's address is unpredictable, and a mispredicted branch per step
// would cost more than the step.
size_t last_at_or_below(const std::vector<uint64_t>& keys, uint64_t x) {
  const uint64_t* base = keys.data();
  if (x < base[0]) return kNone;
  size_t n = keys.size();
  while (n > 1) {
    const size_t half = n / 2;
    base = base[half] <= x ? base + half : base;
    n -= half;
  }
  return static_cast<size_t>(base - keys.data());
}

}  // namespace

const Segment* GuestLayout::segment_at(uint64_t address) const {
  if (segments_.size() <= kScanLimit) {
    for (const Segment& g : segments_) {
      if (address >= g.base && address < g.end()) return &g;
    }
    return nullptr;
  }
  const size_t i = last_at_or_below(base_keys_, address);
  if (i == kNone) return nullptr;
  const Segment& g = segments_[i];
  return address < g.end() ? &g : nullptr;
}

std::optional<PageLocation> GuestLayout::locate(uint64_t address) const {
  const Segment* g = segment_at(address);
  if (g == nullptr) return std::nullopt;
  return location_in(*g, (address - g->base) / g->page_size);
}

uint64_t GuestLayout::pages_to_end(uint64_t address) const {
  const Segment* g = segment_at(address);
  if (g == nullptr) return 0;
  const uint64_t page = g->base + (address - g->base) / g->page_size * g->page_size;
  return (g->end() - page) / g->page_size;
}

std::optional<PageLocation> GuestLayout::page(uint64_t index) const {
  if (segments_.size() <= kScanLimit) {
    for (const Segment& g : segments_) {
      if (index < g.first_page || index >= g.first_page + g.page_count()) continue;
      return location_in(g, index - g.first_page);
    }
    return std::nullopt;
  }
  const size_t i = last_at_or_below(page_keys_, index);
  if (i == kNone) return std::nullopt;
  const Segment& g = segments_[by_page_[i]];
  if (index >= g.first_page + g.page_count()) return std::nullopt;
  return location_in(g, index - g.first_page);
}

std::optional<uint64_t> GuestLayout::page_at_offset(uint64_t offset) const {
  if (segments_.size() <= kScanLimit) {
    for (const Segment& g : segments_) {
      if (offset >= g.offset && offset < g.offset + g.size) return g.first_page + (offset - g.offset) / g.page_size;
    }
    return std::nullopt;
  }
  const size_t i = last_at_or_below(offset_keys_, offset);
  if (i == kNone) return std::nullopt;
  const Segment& g = segments_[by_offset_[i]];
  if (offset >= g.offset + g.size) return std::nullopt;
  return g.first_page + (offset - g.offset) / g.page_size;
}

std::vector<PageRange> GuestLayout::whole_pages_in(uint64_t start, uint64_t end) const {
  std::vector<PageRange> out;
  // Segments are disjoint and sorted by address, so their ends are sorted
  // too: skip every segment that ends at or before `start`.
  auto it = std::partition_point(segments_.begin(), segments_.end(), [&](const Segment& s) { return s.end() <= start; });
  for (; it != segments_.end() && it->base < end; ++it) {
    const Segment& g = *it;
    const uint64_t lo = std::max(start, g.base);
    const uint64_t hi = std::min(end, g.end());
    if (lo >= hi) continue;
    // Round inwards: only pages wholly inside [lo, hi) are dropped.
    const uint64_t first = (lo - g.base + g.page_size - 1) / g.page_size;
    const uint64_t last = (hi - g.base) / g.page_size;  // exclusive
    if (first >= last) continue;
    out.push_back(PageRange{g.region, g.first_page + first, last - first, g.base + first * g.page_size, g.page_size});
  }
  return out;
}

namespace {

// Splits `segments` (sorted by base) at [start, end): returns the pieces
// outside, still sorted, and appends the pieces inside to `inside`, in
// address order (page-aligned cuts; the kernel only unmaps or moves whole
// pages of a mapping).
std::vector<Segment> cut(const std::vector<Segment>& segments, uint64_t start, uint64_t end,
                         std::vector<Segment>* inside) {
  std::vector<Segment> out;
  out.reserve(segments.size() + 1);
  for (const Segment& g : segments) {
    const uint64_t lo = std::max(start, g.base);
    const uint64_t hi = std::min(end, g.end());
    if (lo >= hi) {
      out.push_back(g);
      continue;
    }
    const uint64_t a = (lo - g.base) / g.page_size * g.page_size;                  // bytes before the cut
    const uint64_t b = (hi - g.base + g.page_size - 1) / g.page_size * g.page_size;  // end of the cut
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

}  // namespace

GuestLayout GuestLayout::unmapped(uint64_t start, uint64_t end) const {
  GuestLayout next;
  next.regions_ = regions_;
  next.page_count_ = page_count_;
  next.total_bytes_ = total_bytes_;
  next.segments_ = cut(segments_, start, end, nullptr);
  next.index();
  return next;
}

GuestLayout GuestLayout::remapped(uint64_t from, uint64_t to, uint64_t len) const {
  GuestLayout next;
  next.regions_ = regions_;
  next.page_count_ = page_count_;
  next.total_bytes_ = total_bytes_;
  std::vector<Segment> moved;
  next.segments_ = cut(segments_, from, from + len, &moved);
  // Whatever was mapped at the destination is gone (mremap replaces it).
  next.segments_ = cut(next.segments_, to, to + len, nullptr);
  for (Segment g : moved) {
    g.base = g.base - from + to;
    next.segments_.push_back(g);
  }
  next.index();
  return next;
}

}  // namespace faultline
