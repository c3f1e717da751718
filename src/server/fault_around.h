// FaultAround: how many pages a demand fault installs, the faulting page and
// the neighbours after it, in one UFFDIO_COPY (issue 10).
//
// Why: a guest's first touches come in runs. In first-touch order 95 % of a
// real Firecracker guest's touches are followed by a touch of the next page,
// and the 64 KiB blocks it touches are 90 % used (docs/performance.md). The
// kernel's page cache serves such a guest with one fault per 16 pages
// (fault-around) and reads ahead of streams; a uffd server that installs one
// page per fault pays a round trip per page instead (~17 000 per restore).
//
// The policy is the kernel's readahead, applied to installs:
//  - Streams: each vCPU that walks memory is a stream. A table of recent
//    streams remembers where each one's last window ended. A fault at (or
//    just after) that end continues the stream: its window doubles, up to
//    `max_pages`, and ends at a boundary of its size (a multiple of the
//    power of two at or above it). A guest's allocator hands memory out in
//    aligned power-of-two blocks; an aligned window stays inside such a
//    block when the block is at least its size, instead of running past the
//    block's end into memory the guest may never touch (measured on the
//    trace replay: 7 % of installed pages untouched against 16 % for
//    unaligned windows, for 10 % more faults).
//  - Any other fault starts a stream with the starting window, which ends at
//    a boundary of its own size (16 pages: the rest of the fault's 64 KiB
//    block, as the kernel's fault-around maps).
//  - The starting window adapts per session: faults that continue a stream
//    or land right after installed memory raise a score, faults anywhere
//    else lower it. A random-access guest (no fault is near anything
//    installed) soon starts every window at 4 pages, then at one page, which
//    is no fault-around at all; streams still grow from there (1, 2, 4, ...)
//    when they appear. (The server cannot see which installed pages were
//    touched, as they never fault: where faults land is its evidence.)
// A window is a wish: the caller cuts it at the end of the mapping and at the
// first page that is not untouched (page_installer.h).
//
// Thread-safety: window() is safe from any thread (the reader and every
// worker call it). The table is a handful of atomics, no lock: two faults
// that race on one entry may both take it as a new stream or both continue
// it; either way the window is only a heuristic, never a correctness matter.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace faultline {

class FaultAround {
 public:
  // `max_pages` <= 1: off (every window is one page); at most kMaxPages.
  explicit FaultAround(uint32_t max_pages);

  static constexpr uint32_t kStartPages = 16;  // the kernel's fault_around_bytes, 64 KiB of 4 KiB pages
  static constexpr size_t kStreams = 16;       // more than the vCPUs of a typical microVM
  static constexpr uint32_t kMaxPages = 4096;  // 16 MiB: a window is staged in each worker's buffer

  bool enabled() const { return max_pages_ > 1; }
  uint32_t max_pages() const { return max_pages_; }

  // The pages to install for a demand fault on 4 KiB page `page` (a client
  // page number: address / 4096, so that windows align as in the guest),
  // the faulting page first. At least 1, at most max_pages().
  // `follows_installed`: the page before it is installed already.
  uint32_t window(uint64_t page, bool follows_installed = false);

  // The window a new stream starts with now (tests, logs).
  uint32_t start_pages() const;
  // Faults that continued a stream, and faults that started one.
  uint64_t continued() const { return continued_.load(std::memory_order_relaxed); }
  uint64_t started() const { return started_.load(std::memory_order_relaxed); }

 private:
  // An entry packs the page after the stream's last window (high 48 bits:
  // client page numbers are below 2^45) and that window's size (low 16
  // bits); 0 is empty.
  static uint64_t pack(uint64_t next, uint32_t pages) { return (next << 16) | pages; }
  static constexpr int kScoreMax = 16;
  static constexpr int kScoreMin = -16;

  const uint32_t max_pages_;
  std::array<std::atomic<uint64_t>, kStreams> streams_{};
  std::atomic<uint32_t> next_slot_{0};
  std::atomic<int> score_{0};
  std::atomic<uint64_t> continued_{0}, started_{0};
};

}  // namespace faultline
