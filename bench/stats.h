// Small statistics helpers for faultline-bench: percentiles of latency samples
// and medians of repetitions. Pure functions; thread-compatible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace faultline::bench {

// The p-th percentile (0 <= p <= 100, nearest rank) of `samples`; sorts them.
// NaN when empty.
inline double percentile(std::vector<uint32_t>& samples, double p) {
  if (samples.empty()) return std::nan("");
  std::sort(samples.begin(), samples.end());
  const double rank = std::ceil(p / 100.0 * static_cast<double>(samples.size()));
  const size_t i = static_cast<size_t>(std::clamp(rank, 1.0, static_cast<double>(samples.size()))) - 1;
  return samples[i];
}

// Median of the non-NaN values; NaN when there are none.
inline double median(std::vector<double> v) {
  std::erase_if(v, [](double x) { return std::isnan(x); });
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace faultline::bench
