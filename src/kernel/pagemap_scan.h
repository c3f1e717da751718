// Which pages of another process the guest has written since they were
// installed write-protected: present and not uffd-wp (with WP_ASYNC the
// kernel clears the uffd-wp bit on the first write, with no message).
//
// Uses the PAGEMAP_SCAN ioctl (Linux 6.7+: one call returns whole ranges)
// and falls back to reading /proc/PID/pagemap entry by entry (bits 63 and 57).
//
// The answer is never partial: a diff built from it that missed a written
// page would lose guest data. A PAGEMAP_SCAN walk that stops early is
// continued from where the kernel stopped (walk_end); one that stops making
// progress has the rest of its range read from /proc/PID/pagemap; anything
// else is an error, never a shorter list.
//
// Thread-safety: free functions, safe from any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "common/error.h"

namespace faultline::kernel {

struct AddressRange {
  uint64_t start = 0;
  uint64_t end = 0;  // exclusive
};

enum class ScanMethod { kPagemapScan, kPagemap };
const char* to_string(ScanMethod method);

struct WrittenPages {
  std::vector<AddressRange> ranges;  // sorted, merged
  ScanMethod method = ScanMethod::kPagemapScan;
};

// Ranges of [start, start+len) in `pid` that are present and not uffd-wp.
// `method` is kPagemap when any part of the range was read from
// /proc/PID/pagemap.
// `force_fallback` skips PAGEMAP_SCAN (to test the fallback path).
Result<WrittenPages> scan_written_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback = false);
// Ranges of [start, start+len) in `pid` that are present at all.
Result<WrittenPages> scan_present_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback = false);

// The walk behind the two functions above, with its system calls passed in
// so that tests can make the kernel stop anywhere.

// What to do after a PAGEMAP_SCAN call that started at `cursor`, for a range
// ending at `end`, returned `walk_end`.
struct ScanStep {
  enum Action { kDone, kContinue, kFallbackFrom } action = kDone;
  uint64_t next = 0;  // kContinue: the next call's start; kFallbackFrom: where the fallback starts
};
ScanStep next_scan_step(uint64_t cursor, uint64_t end, uint64_t walk_end);

// One PAGEMAP_SCAN call over [cursor, end): appends the ranges it found to
// `out` and returns the kernel's walk_end, or nullopt when the kernel has no
// PAGEMAP_SCAN (ENOTTY/EINVAL).
using ScanCall = std::function<Result<std::optional<uint64_t>>(uint64_t cursor, uint64_t end,
                                                               std::vector<AddressRange>& out)>;
// Appends the ranges of [from, end) found through /proc/PID/pagemap.
using FallbackCall = std::function<Status(uint64_t from, uint64_t end, std::vector<AddressRange>& out)>;
// Covers all of [start, end): PAGEMAP_SCAN calls from where the previous one
// stopped, and the fallback for whatever the kernel would not walk. Returns
// the method that covered the range (kPagemap if the fallback covered any
// of it); `out` ends up sorted and merged.
Result<ScanMethod> walk_scan_range(uint64_t start, uint64_t end, const ScanCall& scan_call,
                                   const FallbackCall& fallback_call, std::vector<AddressRange>& out);

}  // namespace faultline::kernel
