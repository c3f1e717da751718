// GuestLayout: the guest's memory regions, validated against the memory file,
// and the arithmetic from a client address to a page and a file offset.
//
// Immutable after create(): safe for concurrent use from any thread.
//
// Cost: create() is O(n log n) in the number of regions (overlaps are found
// by sorting, not pairwise); locate(), page() and page_at_offset() are
// O(log n) in the number of mapped segments (binary search over arrays kept
// sorted by address, by page index and by file offset), and the plain scan
// of before for one or two segments, the fault path of most Firecracker
// guests.
// unmapped() and remapped() build a new layout in O(n log n).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "guest/region.h"

namespace faultline {

// Where one guest page lives.
struct PageLocation {
  uint32_t region = 0;       // index into regions() (the handshake region the page belongs to)
  uint64_t page_index = 0;   // global index over all regions' pages (page-state table slot)
  uint64_t address = 0;      // page-aligned client address
  uint64_t file_offset = 0;  // byte offset of the page in the memory file
  uint64_t page_size = 0;    // bytes
  friend bool operator==(const PageLocation&, const PageLocation&) = default;
};

// A run of whole pages of one region, e.g. the pages a REMOVE covers.
struct PageRange {
  uint32_t region = 0;
  uint64_t first_page = 0;  // global page index
  uint64_t page_count = 0;
  uint64_t address = 0;     // client address of the first page
  uint64_t page_size = 0;
  friend bool operator==(const PageRange&, const PageRange&) = default;
};

// A mapped stretch of one region: where (part of) a region lives in the
// client's address space now. A new layout has one segment per region;
// munmap (UNMAP events) and mremap (REMAP events) split and move them.
struct Segment {
  uint64_t base = 0;        // client address
  uint64_t size = 0;        // bytes
  uint64_t offset = 0;      // memory-file offset of `base`
  uint64_t page_size = 0;
  uint64_t first_page = 0;  // global page index of `base`
  uint32_t region = 0;      // handshake region it came from
  uint64_t end() const { return base + size; }
  uint64_t page_count() const { return size / page_size; }
  friend bool operator==(const Segment&, const Segment&) = default;
};

class GuestLayout {
 public:
  // Validates the regions: page size 4 KiB or 2 MiB; base, size and offset
  // aligned to the page size; size > 0; no two regions overlapping in the
  // client's address space or in the file; every region inside the file
  // (offset + size <= memory_file_size, no overflow). Each failure is an
  // error naming the region (both regions, for an overlap) and the numbers.
  static Result<GuestLayout> create(std::vector<GuestRegion> regions, uint64_t memory_file_size);

  // The regions as the handshake listed them (shared by every layout derived
  // from this one: UNMAP and REMAP move segments, never regions).
  const std::vector<GuestRegion>& regions() const { return *regions_; }
  uint64_t page_count() const { return page_count_; }
  uint64_t total_bytes() const { return total_bytes_; }

  // The mapped segments, sorted by client address; disjoint.
  const std::vector<Segment>& segments() const { return segments_; }

  // The page containing `address`, or nullopt when no segment holds it.
  std::optional<PageLocation> locate(uint64_t address) const;
  // Pages from the one containing `address` to the end of its segment, that
  // page included: within them client addresses, page indexes and file
  // offsets all run contiguously. 0 when no segment holds `address`.
  uint64_t pages_to_end(uint64_t address) const;
  // Location of a page by its global index; nullopt when it is unmapped.
  std::optional<PageLocation> page(uint64_t index) const;

  // Global index of the page at byte `offset` of the memory file; nullopt if
  // no mapped segment holds it.
  std::optional<uint64_t> page_at_offset(uint64_t offset) const;

  // This layout with [start, end) unmapped (munmap). Page indexes of the
  // pages that stay are unchanged.
  GuestLayout unmapped(uint64_t start, uint64_t end) const;
  // This layout with [from, from+len) moved to `to` (mremap): the same pages
  // (same indexes and file offsets) at new addresses.
  GuestLayout remapped(uint64_t from, uint64_t to, uint64_t len) const;

  // The whole pages inside [start, end), split per segment, in address
  // order. Partial pages at either end are left out: the kernel only drops
  // whole pages, so a partial page keeps its contents.
  std::vector<PageRange> whole_pages_in(uint64_t start, uint64_t end) const;

 private:
  // Up to this many segments, lookups scan: the code from before sorting,
  // unchanged, so a guest of one or two regions (every Firecracker guest
  // without memory hotplug) finds its pages exactly as fast as before.
  // Beyond, a branch-free binary search over a compact array of keys, which
  // is already faster at three segments when faults spread over them
  // (measured: bench/layout_bench.cc, docs/performance.md).
  static constexpr size_t kScanLimit = 2;

  GuestLayout() = default;  // only create() makes a layout from nothing
  // The segment holding `address`, or null.
  const Segment* segment_at(uint64_t address) const;
  // Sorts segments_ by address and rebuilds the search keys.
  void index();

  std::shared_ptr<const std::vector<GuestRegion>> regions_;
  std::vector<Segment> segments_;  // sorted by base
  // Beyond kScanLimit segments only: the keys binary searches run over (one
  // cache line holds eight), and the segment each belongs to.
  std::vector<uint64_t> base_keys_;    // segments_[i].base
  std::vector<uint64_t> page_keys_;    // first_page, sorted
  std::vector<uint32_t> by_page_;      // segment of page_keys_[i]
  std::vector<uint64_t> offset_keys_;  // offset, sorted
  std::vector<uint32_t> by_offset_;    // segment of offset_keys_[i]
  uint64_t page_count_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace faultline
