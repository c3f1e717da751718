#include "guest/layout.h"

#include <algorithm>
#include <numeric>

namespace faultline {

namespace {
std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

Result<GuestLayout> GuestLayout::create(std::vector<GuestRegion> regions, uint64_t memory_file_size) {
  if (regions.empty()) return fail("the handshake describes no guest memory regions");
  GuestLayout layout;
  for (size_t i = 0; i < regions.size(); ++i) {
    const GuestRegion& r = regions[i];
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
    for (size_t j = 0; j < i; ++j) {
      const GuestRegion& o = regions[j];
      if (r.base_host_virt_addr < o.end() && o.base_host_virt_addr < r.end()) {
        return fail(name + " [" + hex(r.base_host_virt_addr) + ", " + hex(r.end()) + ") overlaps region " +
                    std::to_string(j) + " [" + hex(o.base_host_virt_addr) + ", " + hex(o.end()) + ") in memory");
      }
      if (r.offset < o.offset + o.size && o.offset < r.offset + r.size) {
        return fail(name + " overlaps region " + std::to_string(j) + " in the memory file (offsets " +
                    std::to_string(r.offset) + " and " + std::to_string(o.offset) + ")");
      }
    }
    layout.segments_.push_back(
        Segment{r.base_host_virt_addr, r.size, r.offset, r.page_size, layout.page_count_, static_cast<uint32_t>(i)});
    layout.page_count_ += r.size / r.page_size;
    layout.total_bytes_ += r.size;
  }
  layout.regions_ = std::move(regions);
  return layout;
}

std::optional<PageLocation> GuestLayout::locate(uint64_t address) const {
  // Few segments (one or two regions on x86): a linear scan beats anything cleverer.
  for (const Segment& g : segments_) {
    if (address < g.base || address >= g.end()) continue;
    const uint64_t in = (address - g.base) / g.page_size;
    return PageLocation{g.region, g.first_page + in, g.base + in * g.page_size, g.offset + in * g.page_size,
                        g.page_size};
  }
  return std::nullopt;
}

std::optional<PageLocation> GuestLayout::page(uint64_t index) const {
  for (const Segment& g : segments_) {
    const uint64_t count = g.size / g.page_size;
    if (index < g.first_page || index >= g.first_page + count) continue;
    const uint64_t in = index - g.first_page;
    return PageLocation{g.region, index, g.base + in * g.page_size, g.offset + in * g.page_size, g.page_size};
  }
  return std::nullopt;
}

std::optional<uint64_t> GuestLayout::page_at_offset(uint64_t offset) const {
  for (const Segment& g : segments_) {
    if (offset >= g.offset && offset < g.offset + g.size) return g.first_page + (offset - g.offset) / g.page_size;
  }
  return std::nullopt;
}

std::vector<PageRange> GuestLayout::whole_pages_in(uint64_t start, uint64_t end) const {
  std::vector<PageRange> out;
  for (const Segment& g : segments_) {
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

// Splits `segments` at [start, end): returns the pieces outside, and appends
// the pieces inside to `inside` (page-aligned cuts; the kernel only unmaps or
// moves whole pages of a mapping).
std::vector<Segment> cut(const std::vector<Segment>& segments, uint64_t start, uint64_t end,
                         std::vector<Segment>* inside) {
  std::vector<Segment> out;
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
  GuestLayout next = *this;
  next.segments_ = cut(segments_, start, end, nullptr);
  return next;
}

GuestLayout GuestLayout::remapped(uint64_t from, uint64_t to, uint64_t len) const {
  GuestLayout next = *this;
  std::vector<Segment> moved;
  next.segments_ = cut(segments_, from, from + len, &moved);
  // Whatever was mapped at the destination is gone (mremap replaces it).
  next.segments_ = cut(next.segments_, to, to + len, nullptr);
  for (Segment g : moved) {
    g.base = g.base - from + to;
    next.segments_.push_back(g);
  }
  return next;
}

}  // namespace faultline
