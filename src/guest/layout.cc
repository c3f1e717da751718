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
    layout.first_page_.push_back(layout.page_count_);
    layout.page_count_ += r.size / r.page_size;
    layout.total_bytes_ += r.size;
  }
  layout.regions_ = std::move(regions);
  return layout;
}

std::optional<PageLocation> GuestLayout::locate(uint64_t address) const {
  // Few regions (one or two on x86): a linear scan beats anything cleverer.
  for (uint32_t i = 0; i < regions_.size(); ++i) {
    const GuestRegion& r = regions_[i];
    if (!r.contains(address)) continue;
    const uint64_t in_region = (address - r.base_host_virt_addr) / r.page_size;
    return PageLocation{i, first_page_[i] + in_region, r.base_host_virt_addr + in_region * r.page_size,
                        r.offset + in_region * r.page_size, r.page_size};
  }
  return std::nullopt;
}

PageLocation GuestLayout::page(uint64_t index) const {
  auto it = std::upper_bound(first_page_.begin(), first_page_.end(), index);
  const uint32_t i = static_cast<uint32_t>(it - first_page_.begin() - 1);
  const GuestRegion& r = regions_[i];
  const uint64_t in_region = index - first_page_[i];
  return PageLocation{i, index, r.base_host_virt_addr + in_region * r.page_size, r.offset + in_region * r.page_size,
                      r.page_size};
}

std::vector<PageRange> GuestLayout::whole_pages_in(uint64_t start, uint64_t end) const {
  std::vector<PageRange> out;
  for (uint32_t i = 0; i < regions_.size(); ++i) {
    const GuestRegion& r = regions_[i];
    const uint64_t lo = std::max(start, r.base_host_virt_addr);
    const uint64_t hi = std::min(end, r.end());
    if (lo >= hi) continue;
    // Round inwards: only pages wholly inside [lo, hi) are dropped.
    const uint64_t first = (lo - r.base_host_virt_addr + r.page_size - 1) / r.page_size;
    const uint64_t last = (hi - r.base_host_virt_addr) / r.page_size;  // exclusive
    if (first >= last) continue;
    out.push_back(PageRange{i, first_page_[i] + first, last - first, r.base_host_virt_addr + first * r.page_size,
                            r.page_size});
  }
  return out;
}

}  // namespace faultline
