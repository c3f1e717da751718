#include "metrics/exposition.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <set>

namespace faultline::metrics {

namespace {

std::string format_double(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  if (ec != std::errc{}) return "NaN";
  return std::string(buf, end);
}

bool valid_metric_name(std::string_view s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

bool valid_label_name(std::string_view s) { return valid_metric_name(s) && s.find(':') == std::string_view::npos; }

void append_escaped_label_value(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

Result<double> parse_value(std::string_view s) {
  if (s == "+Inf" || s == "Inf") return std::numeric_limits<double>::infinity();
  if (s == "-Inf") return -std::numeric_limits<double>::infinity();
  if (s == "NaN") return std::numeric_limits<double>::quiet_NaN();
  double v = 0;
  const char* begin = s.data();
  if (!s.empty() && s[0] == '+') ++begin;  // from_chars takes no leading '+'
  auto [end, ec] = std::from_chars(begin, s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size() || begin == s.data() + s.size()) {
    // Appended piecewise: GCC 12 warns (-Wrestrict, a false positive) on
    // "'" + std::string(s) at -O3.
    std::string message = "not a number: '";
    message.append(s);
    message += '\'';
    return fail(std::move(message));
  }
  return v;
}

// Which family a sample named `name` belongs to, given the family's type.
bool belongs_to(std::string_view sample, const std::string& family, const std::string& type) {
  if (sample == family) return type != "histogram";
  if (sample.size() <= family.size() || sample.substr(0, family.size()) != family) return false;
  const std::string_view suffix = sample.substr(family.size());
  if (type == "histogram") return suffix == "_bucket" || suffix == "_sum" || suffix == "_count";
  if (type == "summary") return suffix == "_sum" || suffix == "_count";
  return false;
}

// Parses `{name="value",...}` starting at s[0] == '{'; sets `consumed`.
Result<std::vector<std::pair<std::string, std::string>>> parse_labels(std::string_view s, size_t& consumed) {
  std::vector<std::pair<std::string, std::string>> labels;
  size_t i = 1;
  for (;;) {
    if (i >= s.size()) return fail("unterminated label set");
    if (s[i] == '}') {
      ++i;
      break;
    }
    size_t name_end = i;
    while (name_end < s.size() && s[name_end] != '=') ++name_end;
    const std::string_view name = s.substr(i, name_end - i);
    if (!valid_label_name(name)) return fail("invalid label name '" + std::string(name) + "'");
    if (name_end + 1 >= s.size() || s[name_end + 1] != '"') return fail("label " + std::string(name) + " has no quoted value");
    std::string value;
    size_t j = name_end + 2;
    for (;; ++j) {
      if (j >= s.size()) return fail("unterminated value of label " + std::string(name));
      if (s[j] == '"') break;
      if (s[j] == '\\') {
        if (j + 1 >= s.size()) return fail("dangling escape in label " + std::string(name));
        const char e = s[++j];
        if (e == 'n') {
          value += '\n';
        } else if (e == '\\' || e == '"') {
          value += e;
        } else {
          return fail(std::string("unknown escape \\") + e + " in label " + std::string(name));
        }
      } else if (s[j] == '\n') {
        return fail("newline in label value");
      } else {
        value += s[j];
      }
    }
    for (const auto& [k, v] : labels) {
      if (k == name) return fail("label " + std::string(name) + " appears twice");
    }
    labels.emplace_back(std::string(name), std::move(value));
    i = j + 1;
    if (i < s.size() && s[i] == ',') ++i;
    else if (i < s.size() && s[i] != '}') return fail("expected ',' or '}' after label " + std::string(labels.back().first));
  }
  consumed = i;
  return labels;
}

std::string series_key(const Sample& s, bool without_le) {
  std::vector<std::pair<std::string, std::string>> labels = s.labels;
  if (without_le) std::erase_if(labels, [](const auto& l) { return l.first == "le"; });
  std::sort(labels.begin(), labels.end());
  std::string key;
  for (const auto& [k, v] : labels) key += k + "=\"" + v + "\",";
  return key;
}

}  // namespace

// --- writing -----------------------------------------------------------------

void ExpositionWriter::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  out_ += help;
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void ExpositionWriter::counter(std::string_view name, std::string_view help, uint64_t value) {
  family(name, "counter", help);
  sample(name, {}, value);
}

void ExpositionWriter::gauge(std::string_view name, std::string_view help, uint64_t value) {
  family(name, "gauge", help);
  sample(name, {}, value);
}

void ExpositionWriter::series(std::string_view name, std::initializer_list<Label> labels, std::string_view extra_name,
                              std::string_view extra_value) {
  out_ += name;
  if (labels.size() > 0 || !extra_name.empty()) {
    out_ += '{';
    bool first = true;
    auto one = [&](std::string_view k, std::string_view v) {
      if (!first) out_ += ',';
      first = false;
      out_ += k;
      out_ += "=\"";
      append_escaped_label_value(out_, v);
      out_ += '"';
    };
    for (const auto& [k, v] : labels) one(k, v);
    if (!extra_name.empty()) one(extra_name, extra_value);
    out_ += '}';
  }
  out_ += ' ';
}

void ExpositionWriter::sample(std::string_view name, std::initializer_list<Label> labels, uint64_t value) {
  series(name, labels);
  out_ += std::to_string(value);
  out_ += '\n';
}

void ExpositionWriter::sample(std::string_view name, std::initializer_list<Label> labels, double value) {
  series(name, labels);
  out_ += format_double(value);
  out_ += '\n';
}

void ExpositionWriter::histogram(std::string_view name, std::initializer_list<Label> labels,
                                 const HistogramCounts& counts) {
  const std::string bucket = std::string(name) + "_bucket";
  uint64_t cumulative = 0;
  for (size_t b = 0; b < kLatencyBuckets; ++b) {
    cumulative += counts.buckets[b];
    series(bucket, labels, "le", b < kLatencyBoundLabels.size() ? kLatencyBoundLabels[b] : std::string_view("+Inf"));
    out_ += std::to_string(cumulative);
    out_ += '\n';
  }
  sample(std::string(name) + "_sum", labels, static_cast<double>(counts.sum_ns) / 1e9);
  sample(std::string(name) + "_count", labels, cumulative);
}

// --- reading -------------------------------------------------------------------

std::string Sample::label(std::string_view key) const {
  for (const auto& [k, v] : labels) {
    if (k == key) return v;
  }
  return {};
}

Result<std::vector<Family>> parse_exposition(std::string_view text) {
  std::vector<Family> families;
  std::map<std::string, size_t> by_name;  // family name -> index
  std::set<std::string> seen_series;
  if (!text.empty() && text.back() != '\n') return fail("the text does not end with a newline");
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    auto bad = [&](const std::string& why) {
      return fail("line " + std::to_string(line_no) + " (" + std::string(line.substr(0, 120)) + "): " + why);
    };
    if (line.empty()) continue;
    if (line[0] == '#') {
      // "# HELP name text" / "# TYPE name type"; any other comment is ignored.
      if (line.rfind("# HELP ", 0) != 0 && line.rfind("# TYPE ", 0) != 0) continue;
      const bool help = line[2] == 'H';
      const std::string_view rest = line.substr(7);
      const size_t sp = rest.find(' ');
      const std::string_view name = rest.substr(0, sp);
      const std::string_view arg = sp == std::string_view::npos ? std::string_view{} : rest.substr(sp + 1);
      if (!valid_metric_name(name)) return bad("invalid metric name '" + std::string(name) + "'");
      auto [it, inserted] = by_name.emplace(std::string(name), families.size());
      if (inserted) families.push_back(Family{std::string(name), "untyped", "", {}});
      Family& f = families[it->second];
      if (!f.samples.empty()) return bad("# HELP/# TYPE after the family's samples");
      if (help) {
        if (!f.help.empty()) return bad("a second # HELP for " + f.name);
        if (arg.empty()) return bad("# HELP without text");
        f.help = std::string(arg);
      } else {
        static const std::set<std::string_view> kTypes{"counter", "gauge", "histogram", "summary", "untyped"};
        if (!kTypes.count(arg)) return bad("unknown type '" + std::string(arg) + "'");
        if (f.type != "untyped") return bad("a second # TYPE for " + f.name);
        f.type = std::string(arg);
      }
      // The family whose samples may follow.
      if (it->second != families.size() - 1) return bad("# lines of " + f.name + " are not together");
      continue;
    }
    // A sample: name, optional labels, one space, value, optional timestamp.
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    Sample s;
    s.name = std::string(line.substr(0, i));
    if (!valid_metric_name(s.name)) return bad("invalid metric name '" + s.name + "'");
    if (i < line.size() && line[i] == '{') {
      size_t consumed = 0;
      auto labels = parse_labels(line.substr(i), consumed);
      if (!labels) return bad(labels.error().message);
      s.labels = std::move(*labels);
      i += consumed;
    }
    if (i >= line.size() || line[i] != ' ') return bad("no space before the value");
    std::string_view rest = line.substr(i + 1);
    const size_t sp = rest.find(' ');
    auto value = parse_value(rest.substr(0, sp));
    if (!value) return bad(value.error().message);
    if (sp != std::string_view::npos) {
      int64_t ts = 0;
      const std::string_view t = rest.substr(sp + 1);
      auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), ts);
      if (ec != std::errc{} || end != t.data() + t.size()) return bad("bad timestamp");
    }
    s.value = *value;
    if (families.empty() || !belongs_to(s.name, families.back().name, families.back().type)) {
      return bad("sample " + s.name + " does not belong to the family before it (" +
                 (families.empty() ? std::string("none") : families.back().name) + ")");
    }
    if (families.back().type == "histogram" && s.name == families.back().name + "_bucket" && s.label("le").empty()) {
      return bad("histogram bucket without an le label");
    }
    if (!seen_series.insert(s.name + "{" + series_key(s, false) + "}").second) return bad("duplicate series");
    families.back().samples.push_back(std::move(s));
  }
  return families;
}

Status check_histogram(const Family& f) {
  if (f.type != "histogram") return fail(f.name + " is a " + f.type + ", not a histogram");
  struct Series {
    std::vector<std::pair<double, double>> buckets;  // (le, cumulative count), in text order
    bool has_sum = false, has_count = false;
    double sum = 0, count = 0;
  };
  std::map<std::string, Series> series;
  for (const Sample& s : f.samples) {
    Series& g = series[series_key(s, true)];
    if (s.name == f.name + "_bucket") {
      auto le = parse_value(s.label("le"));
      if (!le) return fail(f.name + ": bad le '" + s.label("le") + "'");
      g.buckets.emplace_back(*le, s.value);
    } else if (s.name == f.name + "_sum") {
      g.has_sum = true;
      g.sum = s.value;
    } else {
      g.has_count = true;
      g.count = s.value;
    }
  }
  if (series.empty()) return fail(f.name + " has no samples");
  for (const auto& [key, g] : series) {
    const std::string where = f.name + "{" + key + "}";
    if (g.buckets.empty()) return fail(where + ": no buckets");
    if (!std::isinf(g.buckets.back().first)) return fail(where + ": the last bucket is not le=\"+Inf\"");
    if (!g.has_sum || !g.has_count) return fail(where + ": _sum or _count missing");
    double lower = 0, upper = 0, prev_le = 0, prev_count = 0;
    bool unbounded = false;
    for (size_t i = 0; i < g.buckets.size(); ++i) {
      const auto [le, count] = g.buckets[i];
      if (i > 0 && !(le > g.buckets[i - 1].first)) return fail(where + ": le values not ascending");
      if (count < prev_count) return fail(where + ": bucket counts decrease at le=" + format_double(le));
      const double in_bucket = count - prev_count;
      lower += in_bucket * prev_le;
      if (std::isinf(le)) {
        unbounded = unbounded || in_bucket > 0;
      } else {
        upper += in_bucket * le;
      }
      prev_le = le;
      prev_count = count;
    }
    if (g.count != g.buckets.back().second) {
      return fail(where + ": _count " + format_double(g.count) + " differs from the +Inf bucket " +
                  format_double(g.buckets.back().second));
    }
    const double slack = 1e-9 * std::max(1.0, std::fabs(g.sum));
    if (g.sum < lower - slack) return fail(where + ": _sum " + format_double(g.sum) + " is below " + format_double(lower));
    if (!unbounded && g.sum > upper + slack) {
      return fail(where + ": _sum " + format_double(g.sum) + " is above " + format_double(upper));
    }
  }
  return {};
}

const Family* find_family(const std::vector<Family>& families, std::string_view name) {
  for (const Family& f : families) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

Result<double> sample_value(const std::vector<Family>& families, std::string_view name,
                            std::initializer_list<Label> match) {
  const Sample* found = nullptr;
  for (const Family& f : families) {
    for (const Sample& s : f.samples) {
      if (s.name != name) continue;
      bool all = true;
      for (const auto& [k, v] : match) all = all && s.label(k) == v;
      if (!all) continue;
      if (found) return fail("more than one sample " + std::string(name) + " matches");
      found = &s;
    }
  }
  if (!found) return fail("no sample " + std::string(name) + " with those labels");
  return found->value;
}

}  // namespace faultline::metrics
