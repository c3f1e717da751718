// Output of faultline-bench: the tables on stdout, the targets of issue 4 as
// measured ratios (never asserted), a JSON file and a gnuplot PNG chart.
//
// Thread-compatible free functions over a finished Results.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bench/scenarios.h"

namespace faultline::bench {

struct Target {
  std::string name;      // "scenario 2: record+prefetch >= 5x faster than (c) on demand"
  std::string measured;  // "naive 1234 ms / prefetch 99 ms = 12.5x", or why it could not be measured
  double ratio = 0;      // NaN when not measured
  std::optional<bool> met;
};

std::vector<Target> evaluate_targets(const Results& results);

// Prints every scenario's table, the notes and the targets.
void print_report(const Results& results, const std::vector<Target>& targets, const Sizes& sizes, bool quick);

// Writes everything as JSON. Returns an error sentence on failure.
std::optional<std::string> write_json(const std::string& path, const Results& results,
                                      const std::vector<Target>& targets, const Sizes& sizes, bool quick);

// Draws the chart with gnuplot (data and script go to `work_dir`). Returns a
// sentence saying what happened ("written to ...", "skipped: gnuplot not
// found", or the failure).
std::string write_chart(const std::string& png_path, const std::string& work_dir, const Results& results);

}  // namespace faultline::bench
