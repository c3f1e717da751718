#include "bench/load.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <thread>

namespace faultline::bench {

// Busy seconds of all cores since boot: user + nice + system + irq + softirq
// of /proc/stat's "cpu" line (guest time is inside user; steal is time the
// hypervisor gave to other machines, not load on this one).
double machine_busy_seconds() {
  FILE* f = std::fopen("/proc/stat", "re");
  if (!f) return std::nan("");
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0;
  const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &system, &idle, &iowait, &irq,
                            &softirq);
  std::fclose(f);
  if (n != 7) return std::nan("");
  return static_cast<double>(user + nice + system + irq + softirq) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

double own_cpu_seconds() {
  auto seconds = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; };
  rusage self{}, children{};
  ::getrusage(RUSAGE_SELF, &self);
  ::getrusage(RUSAGE_CHILDREN, &children);
  return seconds(self.ru_utime) + seconds(self.ru_stime) + seconds(children.ru_utime) + seconds(children.ru_stime);
}

double load_average_1min() {
  double l[3] = {std::nan(""), 0, 0};
  return ::getloadavg(l, 3) >= 1 ? l[0] : std::nan("");
}

int core_count() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

OtherLoadMeter::OtherLoadMeter()
    : machine_busy_s_(machine_busy_seconds()), own_s_(own_cpu_seconds()), start_(std::chrono::steady_clock::now()) {}

double OtherLoadMeter::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

double OtherLoadMeter::other_cores() const {
  const double wall = seconds();
  if (wall <= 0) return std::nan("");
  const double other = (machine_busy_seconds() - machine_busy_s_) - (own_cpu_seconds() - own_s_);
  if (std::isnan(other)) return other;  // unknown is never quiet
  // /proc/stat counts in clock ticks, rusage to the microsecond: a window
  // where only the bench ran can come out a tick below zero.
  return std::max(0.0, other / wall);
}

QuietWait wait_for_quiet(std::chrono::milliseconds limit, std::chrono::milliseconds window) {
  const auto start = std::chrono::steady_clock::now();
  QuietWait w;
  for (;;) {
    OtherLoadMeter meter;
    std::this_thread::sleep_for(window);
    w.other_cores = meter.other_cores();
    w.quiet = w.other_cores <= kQuietMaxOtherCores;
    w.waited_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (w.quiet || std::chrono::steady_clock::now() - start >= limit) return w;
  }
}

}  // namespace faultline::bench
