// Which pages of another process the guest has written since they were
// installed write-protected: present and not uffd-wp (with WP_ASYNC the
// kernel clears the uffd-wp bit on the first write, with no message).
//
// Uses the PAGEMAP_SCAN ioctl (Linux 6.7+: one call returns whole ranges)
// and falls back to reading /proc/PID/pagemap entry by entry (bits 63 and 57).
//
// Thread-safety: free functions, safe from any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
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
// `force_fallback` skips PAGEMAP_SCAN (to test the fallback path).
Result<WrittenPages> scan_written_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback = false);
// Ranges of [start, start+len) in `pid` that are present at all.
Result<WrittenPages> scan_present_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback = false);

}  // namespace faultline::kernel
