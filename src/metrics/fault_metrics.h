// What the serving engine measures for metrics: fault service latency by
// path, and the counts a session reports (SessionCounts).
//
// A fault's service latency runs from the moment the event reader read its
// message from the uffd to the moment its install (or, when another fault
// installed the page first, the wake of its thread) completed. Each fault
// served is counted under exactly one path:
//   prefetch_late  a demand fault on a page the prefetch plan had not reached
//                  yet (first touch of a planned page still untouched),
//                  whoever served it;
//   zero           otherwise, installed as zeros without reading the file (a
//                  removed page, or one the zero index knows is zero);
//   reader         otherwise, served by the event reader itself (snapshot
//                  bytes from the page cache);
//   worker         otherwise, served by an install worker (bytes read from
//                  storage, 2 MiB pages, write-protect faults).
//
// Thread-safety: FaultLatencyShard as LatencyHistogram (one writer each);
// SessionCounts is a plain value.
#pragma once

#include <time.h>

#include <array>
#include <cstddef>
#include <cstdint>

#include "metrics/histogram.h"

namespace faultline::metrics {

enum class FaultPath : uint8_t { kReader, kWorker, kZero, kPrefetchLate };
inline constexpr size_t kFaultPaths = 4;
const char* to_string(FaultPath path);

// Where an installed page's bytes came from.
enum class InstallSource : uint8_t {
  kSnapshot,  // read from the memory file for a demand fault
  kZero,      // zeros for a demand fault (removed page, or zero in the snapshot): no read
  kPrefetch,  // installed ahead of any fault (--prefetch, prefault())
  kFaultAround,  // installed with a demand fault's page, ahead of faults on them (fault-around)
};
inline constexpr size_t kInstallSources = 4;
const char* to_string(InstallSource source);

// CLOCK_MONOTONIC in nanoseconds (a vDSO call, no system call).
inline int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// The latency histograms of one thread that serves faults. Aligned to a
// cache line of its own: no other thread writes the lines it occupies.
struct alignas(64) FaultLatencyShard {
  std::array<LatencyHistogram, kFaultPaths> by_path;

  // Counts a fault read at `read_ns` (now_ns()) and served just now.
  // REQUIRES: called only by the shard's owner thread.
  void record(FaultPath path, int64_t read_ns) {
    const int64_t elapsed = now_ns() - read_ns;
    by_path[static_cast<size_t>(path)].record(elapsed > 0 ? static_cast<uint64_t>(elapsed) : 0);
  }
  void add_to(std::array<HistogramCounts, kFaultPaths>& out) const {
    for (size_t p = 0; p < kFaultPaths; ++p) by_path[p].add_to(out[p]);
  }
};

// One session's counts (or a sum over sessions), as plain values.
struct SessionCounts {
  uint64_t faults = 0;           // page-fault messages read
  uint64_t already_present = 0;  // faults whose page another install got to first (EEXIST): thread woken
  uint64_t eagain_retries = 0;   // demand installs deferred by a pending event (EAGAIN)
  uint64_t removes = 0;          // REMOVE events
  uint64_t removed_pages = 0;    // whole pages those REMOVEs covered
  uint64_t ahead_faulted = 0;    // pages installed ahead by fault-around that faulted later
  std::array<uint64_t, kInstallSources> installed_pages{};
  std::array<uint64_t, kInstallSources> installed_bytes{};
  std::array<HistogramCounts, kFaultPaths> latency{};

  SessionCounts& operator+=(const SessionCounts& o);
  friend bool operator==(const SessionCounts&, const SessionCounts&) = default;
};

}  // namespace faultline::metrics
