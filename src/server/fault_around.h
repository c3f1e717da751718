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
//  - With readahead on, a stream whose windows reached max_pages has its
//    next window planned too, for a worker to install while the guest
//    walks this one (plan()).
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
  // `readahead`: plan() also reads ahead of continuing streams (below).
  explicit FaultAround(uint32_t max_pages, bool readahead = false);

  static constexpr uint32_t kStartPages = 16;  // the kernel's fault_around_bytes, 64 KiB of 4 KiB pages
  static constexpr size_t kStreams = 16;       // more than the vCPUs of a typical microVM
  static constexpr uint32_t kMaxPages = 4096;  // 16 MiB: a window is staged in each worker's buffer

  bool enabled() const { return max_pages_ > 1; }
  uint32_t max_pages() const { return max_pages_; }

  // The pages to install for a demand fault on 4 KiB page `page` (a client
  // page number: address / 4096, so that windows align as in the guest),
  // the faulting page first. At least 1, at most max_pages().
  // `follows_installed`: the page before it is installed already.
  uint32_t window(uint64_t page, bool follows_installed = false) { return plan(page, follows_installed).pages; }

  // What to install for a demand fault: `pages` now, with the faulting page
  // (as window()), and, with readahead on, `readahead` pages right after
  // them, installed asynchronously by a worker while the guest runs on
  // (the kernel's async readahead). Readahead is planned only for a fault
  // that continues a stream with a whole window of max_pages: the stream's
  // next window, of the same size and aligned to it.
  // The stream's next expected fault is then the end of the readahead; a
  // fault inside a readahead window that has not landed yet (the guest
  // outran it) gets the rest of that window at once, and the stream goes on.
  struct Plan {
    uint32_t pages = 1;
    uint32_t readahead = 0;
  };
  Plan plan(uint64_t page, bool follows_installed = false);

  // The window a new stream starts with now (tests, logs).
  uint32_t start_pages() const;
  // Faults that continued a stream, and faults that started one.
  uint64_t continued() const { return continued_.load(std::memory_order_relaxed); }
  uint64_t started() const { return started_.load(std::memory_order_relaxed); }
  // Faults inside a readahead window that had not been installed yet.
  uint64_t readahead_late() const { return readahead_late_.load(std::memory_order_relaxed); }

 private:
  // An entry packs the page after the stream's last window (high 48 bits:
  // client page numbers are below 2^45), whether that window was a
  // readahead (bit 15) and its size (low 15 bits: at most kMaxPages); 0 is
  // empty.
  static constexpr uint64_t kReadaheadBit = 1u << 15;
  static uint64_t pack(uint64_t next, uint32_t pages, bool readahead = false) {
    return (next << 16) | (readahead ? kReadaheadBit : 0) | pages;
  }
  void raise_score(int step);
  static constexpr int kScoreMax = 16;
  static constexpr int kScoreMin = -16;

  const uint32_t max_pages_;
  const bool readahead_;
  std::array<std::atomic<uint64_t>, kStreams> streams_{};
  std::atomic<uint32_t> next_slot_{0};
  std::atomic<int> score_{0};
  std::atomic<uint64_t> continued_{0}, started_{0}, readahead_late_{0};
};

}  // namespace faultline
