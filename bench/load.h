// The machine's load as faultline-bench records it, and the generated load of
// scenario 1's "loaded" runs.
//
// "Other load" is the CPU time that processes other than the bench and its
// reaped children (the baseline servers, the spinner) used over a window,
// divided by the window: the number of cores something else kept busy. It is
// what decides whether a run was quiet. The 1-minute load average is recorded
// beside it, but cannot decide: it counts the bench's own threads and decays
// over minutes, so right after a loaded repetition (2 spinning threads) it
// stays above 0.5 for ~80 s however quiet the machine is.
//
// Thread-compatible free functions and value types.
#pragma once

#include <chrono>
#include <cstdint>

namespace faultline::bench {

// A run is quiet only while other processes keep at most this many cores busy.
inline constexpr double kQuietMaxOtherCores = 0.5;

// /proc/loadavg's 1-minute figure (NaN if unreadable).
double load_average_1min();
// Online cores (std::thread::hardware_concurrency, at least 1).
int core_count();
// Busy seconds of all cores since boot (/proc/stat; NaN if unreadable).
double machine_busy_seconds();
// CPU seconds of this process and its reaped children (getrusage).
double own_cpu_seconds();

// Measures other processes' CPU use from the moment it is made.
class OtherLoadMeter {
 public:
  OtherLoadMeter();
  // Cores kept busy on average since construction by processes other than
  // this one and its children reaped so far (NaN if /proc/stat is unreadable).
  double other_cores() const;
  double seconds() const;

 private:
  double machine_busy_s_;  // /proc/stat busy time of all cores
  double own_s_;           // getrusage(SELF) + getrusage(CHILDREN)
  std::chrono::steady_clock::time_point start_;
};

// Before a quiet repetition: measures other processes over windows of
// `window` until one shows at most kQuietMaxOtherCores, or `limit` has
// passed. Polling the machine for a benchmark, never ordering a test.
struct QuietWait {
  bool quiet = false;        // the last window was quiet
  double other_cores = 0;    // the last window's figure
  double waited_s = 0;
};
QuietWait wait_for_quiet(std::chrono::milliseconds limit, std::chrono::milliseconds window);

}  // namespace faultline::bench
