#include "kernel/pagemap_scan.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

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

Result<bool> try_pagemap_scan(int fd, uint64_t start, uint64_t len, uint64_t mask, std::vector<AddressRange>& out) {
  std::vector<pm_page_region> vec(512);
  uint64_t cursor = start;
  const uint64_t end = start + len;
  while (cursor < end) {
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
      if (errno == ENOTTY || errno == EINVAL) return false;
      return fail_errno("PAGEMAP_SCAN failed");
    }
    for (long i = 0; i < n; ++i) append(out, vec[i].start, vec[i].end);
    if (arg.walk_end <= cursor) break;
    cursor = arg.walk_end;
  }
  return true;
}

}  // namespace

namespace {

Result<WrittenPages> scan(pid_t pid, uint64_t start, uint64_t len, bool force_fallback, bool need_written) {
  const std::string path = "/proc/" + std::to_string(pid) + "/pagemap";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open " + path);
  WrittenPages result;
  if (!force_fallback) {
    auto ok = try_pagemap_scan(fd.get(), start, len, kPageIsPresent | (need_written ? kPageIsWritten : 0),
                               result.ranges);
    if (!ok) return std::unexpected(ok.error());
    if (*ok) {
      result.method = ScanMethod::kPagemapScan;
      return result;
    }
    result.ranges.clear();
  }
  result.method = ScanMethod::kPagemap;
  constexpr uint64_t kChunk = 4096;  // entries per pread
  std::vector<uint64_t> entries(kChunk);
  for (uint64_t page = start / 4096; page < (start + len) / 4096; page += kChunk) {
    const uint64_t count = std::min<uint64_t>(kChunk, (start + len) / 4096 - page);
    const ssize_t want = static_cast<ssize_t>(count * sizeof(uint64_t));
    if (::pread(fd.get(), entries.data(), want, static_cast<off_t>(page * sizeof(uint64_t))) != want) {
      return fail_errno("reading " + path + " failed");
    }
    for (uint64_t k = 0; k < count; ++k) {
      const uint64_t e = entries[k];
      if ((e & kPagemapPresent) && !(need_written && (e & kPagemapUffdWp))) {
        append(result.ranges, (page + k) * 4096, (page + k + 1) * 4096);
      }
    }
  }
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
