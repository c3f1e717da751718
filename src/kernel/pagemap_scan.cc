#include "kernel/pagemap_scan.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <string>

#include "common/unique_fd.h"
#include "kernel/uffd_abi.h"

// Debian 12's <linux/fs.h> predates PAGEMAP_SCAN (Linux 6.7): the UAPI values.
namespace {
struct pm_page_region {
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};
struct pm_scan_arg {
  uint64_t size;
  uint64_t flags;
  uint64_t start;
  uint64_t end;
  uint64_t walk_end;
  uint64_t vec;
  uint64_t vec_len;
  uint64_t max_pages;
  uint64_t category_inverted;
  uint64_t category_mask;
  uint64_t category_anyof_mask;
  uint64_t return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, struct pm_scan_arg);
constexpr uint64_t kPageIsWritten = 1 << 1;
constexpr uint64_t kPageIsPresent = 1 << 3;
}  // namespace

namespace faultline::kernel {

const char* to_string(ScanMethod m) { return m == ScanMethod::kPagemapScan ? "pagemap_scan" : "pagemap"; }

namespace {

void append(std::vector<AddressRange>& out, uint64_t start, uint64_t end) {
  if (!out.empty() && out.back().end == start) {
    out.back().end = end;
  } else {
    out.push_back({start, end});
  }
}

}  // namespace

ScanStep next_scan_step(uint64_t cursor, uint64_t end, uint64_t walk_end) {
  if (walk_end >= end) return {ScanStep::kDone, end};
  // The kernel stops early when the output vector is full (or at max_pages)
  // and reports in walk_end where it stopped; the next call starts there.
  if (walk_end > cursor) return {ScanStep::kContinue, walk_end};
  // No progress (walk_end at or before the cursor): the kernel did not say
  // why. Whatever it left unwalked is read entry by entry instead, so that a
  // dirty page is never left out of the answer.
  return {ScanStep::kFallbackFrom, cursor};
}

Result<ScanMethod> walk_scan_range(uint64_t start, uint64_t end, const ScanCall& scan_call,
                                   const FallbackCall& fallback_call, std::vector<AddressRange>& out) {
  // The rest of the range, [from, end), entry by entry; whatever a call
  // reported at or beyond `from` is dropped first, so nothing is counted twice.
  auto fall_back_from = [&](uint64_t from) -> Result<ScanMethod> {
    while (!out.empty() && out.back().start >= from) out.pop_back();
    if (!out.empty() && out.back().end > from) out.back().end = from;
    if (auto st = fallback_call(from, end, out); !st) return std::unexpected(st.error());
    return ScanMethod::kPagemap;
  };
  uint64_t cursor = start;
  while (cursor < end) {
    auto walk_end = scan_call(cursor, end, out);
    if (!walk_end) return std::unexpected(walk_end.error());
    // No PAGEMAP_SCAN (a kernel before 6.7) or, after earlier calls, a
    // refusal never seen: the range must still be covered.
    if (!*walk_end) return fall_back_from(cursor);
    const ScanStep step = next_scan_step(cursor, end, **walk_end);
    switch (step.action) {
      case ScanStep::kDone:
        return ScanMethod::kPagemapScan;
      case ScanStep::kContinue:
        cursor = step.next;
        break;
      case ScanStep::kFallbackFrom:
        return fall_back_from(step.next);
    }
  }
  return ScanMethod::kPagemapScan;
}

namespace {

// One PAGEMAP_SCAN call from `cursor`: appends what it found and returns the
// kernel's walk_end, or nullopt when the kernel has no PAGEMAP_SCAN.
Result<std::optional<uint64_t>> pagemap_scan_once(int fd, uint64_t cursor, uint64_t end, uint64_t mask,
                                                  std::vector<pm_page_region>& vec, std::vector<AddressRange>& out) {
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.start = cursor;
  arg.end = end;
  arg.vec = reinterpret_cast<uint64_t>(vec.data());
  arg.vec_len = vec.size();
  // Pages in every category of `mask` (present, and written = not uffd-wp).
  arg.category_mask = mask;
  arg.return_mask = mask;
  const long n = ::ioctl(fd, kPagemapScan, &arg);
  if (n < 0) {
    // ENOTTY/EINVAL: a kernel without PAGEMAP_SCAN; use the fallback.
    if (errno == ENOTTY || errno == EINVAL) return std::optional<uint64_t>();
    return fail_errno("PAGEMAP_SCAN of [" + std::to_string(cursor) + ", " + std::to_string(end) + ") failed");
  }
  for (long i = 0; i < n; ++i) append(out, vec[i].start, vec[i].end);
  return std::optional<uint64_t>(arg.walk_end);
}

// [start, end) from /proc/PID/pagemap, one 8-byte entry per 4 KiB page.
Status read_pagemap_range(int fd, const std::string& path, uint64_t start, uint64_t end, bool need_written,
                          std::vector<AddressRange>& out) {
  constexpr uint64_t kChunk = 4096;  // entries per pread
  std::vector<uint64_t> entries(kChunk);
  for (uint64_t page = start / 4096; page < end / 4096; page += kChunk) {
    const uint64_t count = std::min<uint64_t>(kChunk, end / 4096 - page);
    const ssize_t want = static_cast<ssize_t>(count * sizeof(uint64_t));
    if (::pread(fd, entries.data(), want, static_cast<off_t>(page * sizeof(uint64_t))) != want) {
      return fail_errno("reading " + path + " failed");
    }
    for (uint64_t k = 0; k < count; ++k) {
      const uint64_t e = entries[k];
      if ((e & kPagemapPresent) && !(need_written && (e & kPagemapUffdWp))) {
        append(out, (page + k) * 4096, (page + k + 1) * 4096);
      }
    }
  }
  return {};
}

Result<WrittenPages> scan(pid_t pid, uint64_t start, uint64_t len, bool force_fallback, bool need_written) {
  const std::string path = "/proc/" + std::to_string(pid) + "/pagemap";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open " + path);
  WrittenPages result;
  const uint64_t end = start + len;
  auto fallback = [&](uint64_t from, uint64_t to, std::vector<AddressRange>& out) {
    return read_pagemap_range(fd.get(), path, from, to, need_written, out);
  };
  if (force_fallback) {
    if (auto st = fallback(start, end, result.ranges); !st) return std::unexpected(st.error());
    result.method = ScanMethod::kPagemap;
    return result;
  }
  std::vector<pm_page_region> vec(512);
  const uint64_t mask = kPageIsPresent | (need_written ? kPageIsWritten : 0);
  auto once = [&](uint64_t cursor, uint64_t to, std::vector<AddressRange>& out) {
    return pagemap_scan_once(fd.get(), cursor, to, mask, vec, out);
  };
  auto method = walk_scan_range(start, end, once, fallback, result.ranges);
  if (!method) return std::unexpected(method.error());
  result.method = *method;
  return result;
}

}  // namespace

Result<WrittenPages> scan_written_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback) {
  return scan(pid, start, len, force_fallback, true);
}

Result<WrittenPages> scan_present_pages(pid_t pid, uint64_t start, uint64_t len, bool force_fallback) {
  return scan(pid, start, len, force_fallback, false);
}

}  // namespace faultline::kernel
