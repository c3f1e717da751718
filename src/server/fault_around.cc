#include "server/fault_around.h"

#include <algorithm>
#include <bit>

namespace faultline {

namespace {

// The pages from `page` up to the next multiple of `size`.
uint32_t aligned_rest(uint64_t page, uint32_t size) { return size - static_cast<uint32_t>(page % size); }

}  // namespace

FaultAround::FaultAround(uint32_t max_pages, bool readahead)
    : max_pages_(std::min(max_pages, kMaxPages)), readahead_(readahead && max_pages_ > 1) {}

uint32_t FaultAround::start_pages() const {
  const int score = score_.load(std::memory_order_relaxed);
  const uint32_t start = score >= -4 ? kStartPages : score >= -12 ? 4 : 1;
  return std::min(start, max_pages_);
}

void FaultAround::raise_score(int step) {
  int score = score_.load(std::memory_order_relaxed);
  while (score + step >= kScoreMin && score + step <= kScoreMax &&
         !score_.compare_exchange_weak(score, score + step, std::memory_order_relaxed)) {
  }
}

FaultAround::Plan FaultAround::plan(uint64_t page, bool follows_installed) {
  if (!enabled()) return {};
  for (auto& slot : streams_) {
    const uint64_t e = slot.load(std::memory_order_relaxed);
    if (e == 0) continue;
    const uint64_t next = e >> 16;
    const uint32_t last = static_cast<uint32_t>(e & (kReadaheadBit - 1));
    if ((e & kReadaheadBit) != 0 && page < next && page + last >= next) {
      // Inside a readahead window not installed yet: the guest outran the
      // worker. The rest of the window now; the readahead, when it comes,
      // finds these pages present and installs nothing over them.
      raise_score(1);
      readahead_late_.fetch_add(1, std::memory_order_relaxed);
      return {static_cast<uint32_t>(next - page), 0};
    }
    // The stream faulted at the end of its window, or a little past it (a
    // guest skips the odd page of a run): it used what was installed ahead.
    if (page < next || page >= next + std::max(1u, last / 2)) continue;
    const uint32_t grown = std::min(last * 2, max_pages_);
    // The window ends at a boundary of its size (the power of two at or
    // above it), as the first one does: a guest's allocator hands memory out
    // in aligned power-of-two blocks, and an aligned window never runs past
    // the end of an aligned block at least as large as itself into memory
    // the guest may never touch.
    const uint32_t w = std::min(grown, aligned_rest(page, std::bit_ceil(grown)));
    Plan out{w, 0};
    if (readahead_ && grown == max_pages_ && w == grown) {
      // A stream at full speed: its next window, installed while the guest
      // walks this one.
      out.readahead = std::min(grown, aligned_rest(page + w, std::bit_ceil(grown)));
    }
    uint64_t expected = e;  // lost to a racing fault: that fault's entry stands
    (void)slot.compare_exchange_strong(
        expected,
        out.readahead > 0 ? pack(page + w + out.readahead, out.readahead, true) : pack(page + w, grown),
        std::memory_order_relaxed);
    raise_score(1);
    continued_.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  // A new stream. Its first window ends at a boundary of its own size, as
  // the kernel's fault-around maps the rest of the fault's 64 KiB block.
  const uint32_t start = start_pages();
  const uint32_t first = aligned_rest(page, start);
  const uint32_t at = next_slot_.fetch_add(1, std::memory_order_relaxed) % kStreams;
  streams_[at].store(pack(page + first, start), std::memory_order_relaxed);
  // Right after installed memory, the guest is still walking what it walked
  // (a window that covered a whole run leaves no stream to continue, but
  // the run's end touches its neighbour); anywhere else, it jumped.
  raise_score(follows_installed ? 1 : -1);
  started_.fetch_add(1, std::memory_order_relaxed);
  return {first, 0};
}

}  // namespace faultline
