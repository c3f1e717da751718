// The Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/), both ways:
// ExpositionWriter renders metric families; parse_exposition() reads a page
// back strictly (every line a comment or `name{labels} value`), and
// check_histogram() checks a histogram family's invariants. faultline serves
// the first; its tests scrape the daemon and use the other two.
//
// Thread-safety: plain values and functions; no shared state.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"
#include "metrics/histogram.h"

namespace faultline::metrics {

using Label = std::pair<std::string_view, std::string_view>;

class ExpositionWriter {
 public:
  // Starts a family: its # HELP and # TYPE lines. `type` is counter, gauge
  // or histogram. REQUIRES: `help` holds no newline.
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, std::initializer_list<Label> labels, uint64_t value);
  void sample(std::string_view name, std::initializer_list<Label> labels, double value);
  // A family of one sample without labels: family(), then sample().
  void counter(std::string_view name, std::string_view help, uint64_t value);
  void gauge(std::string_view name, std::string_view help, uint64_t value);
  // A histogram's _bucket (cumulative, +Inf last), _sum (seconds) and
  // _count lines for one label set.
  void histogram(std::string_view name, std::initializer_list<Label> labels, const HistogramCounts& counts);

  const std::string& text() const { return out_; }
  std::string take() { return std::move(out_); }

 private:
  void series(std::string_view name, std::initializer_list<Label> labels, std::string_view extra_name = {},
              std::string_view extra_value = {});
  std::string out_;
};

// Parsed exposition text.
struct Sample {
  std::string name;  // with its _bucket/_sum/_count suffix for histograms
  std::vector<std::pair<std::string, std::string>> labels;
  double value = 0;
  // The value of label `key`, or "" when absent.
  std::string label(std::string_view key) const;
};

struct Family {
  std::string name;
  std::string type;  // counter, gauge, histogram, summary or untyped
  std::string help;
  std::vector<Sample> samples;
};

// Parses `text` strictly: every line is `# HELP name text`, `# TYPE name
// type`, another comment, or a sample `name{label="value",...} value`; each
// sample follows the # TYPE of its family (for histograms: name_bucket,
// name_sum, name_count); names and label names are valid; values are numbers
// (or +Inf, -Inf, NaN); the text ends with a newline. An error names the line.
Result<std::vector<Family>> parse_exposition(std::string_view text);

// Checks a histogram family: per label set (le aside), buckets in ascending
// `le` order ending with +Inf, counts non-decreasing, _count equal to the
// +Inf bucket, and _sum between what the buckets allow (at least the lower
// bound of each counted duration's bucket, at most its upper bound, when
// the +Inf bucket holds nothing above the last bound).
Status check_histogram(const Family& family);

// The family named `name` in `families` (as parse_exposition() returns
// them), or null.
const Family* find_family(const std::vector<Family>& families, std::string_view name);
// The value of the one sample named `name` with labels `match` (a subset of
// its labels); an error when there is none or more than one.
Result<double> sample_value(const std::vector<Family>& families, std::string_view name,
                            std::initializer_list<Label> match = {});

}  // namespace faultline::metrics
