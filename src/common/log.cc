#include "common/log.h"

#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <exception>
#include <new>

#include "common/text_escape.h"

namespace faultline {

namespace {

const char* level_name(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "info";
}

// "2026-11-29T17:40:01.123Z" into `buf`, without allocating (the fallback line
// of log() is built after an allocation failed).
constexpr size_t kTimestampBytes = 64;  // room for any int the compiler can imagine
void format_timestamp(char (&buf)[kTimestampBytes]) {
  using namespace std::chrono;
  const auto now = system_clock::now();
  const auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  const std::time_t t = system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(ms));
}

bool is_name_byte(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
         c == ':' || c == '/' || c == '-';
}

// logfmt keys (and the event name) are bare words: anything else would let
// a key end early or a line look like two.
void append_logfmt_name(std::string& out, std::string_view name) {
  if (name.empty()) {
    out += '_';
    return;
  }
  for (char c : name) out += is_name_byte(static_cast<unsigned char>(c)) ? c : '_';
}

void append_logfmt_value(std::string& out, std::string_view v) {
  bool bare = !v.empty();
  for (char ch : v) {
    const auto c = static_cast<unsigned char>(ch);
    if (c <= 0x20 || c >= 0x7f || c == '"' || c == '=' || c == '\\') {
      bare = false;
      break;
    }
  }
  if (bare) {
    out += v;
  } else {
    append_json_quoted(out, v);  // a JSON string literal is valid logfmt quoting
  }
}

template <typename Int>
void append_integer(std::string& out, Int v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

void append_json_double(std::string& out, double v) {
  if (!std::isfinite(v)) {
    out += "null";  // JSON has no NaN or infinity
    return;
  }
  char buf[40];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
  const std::string_view text(buf, static_cast<size_t>(r.ptr - buf));
  out += text;
  // Keep it a floating-point number for typed readers ("3" would parse as an integer).
  if (text.find_first_of(".e") == std::string_view::npos) out += ".0";
}

void append_text_value(std::string& out, const LogField::Value& value) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          append_logfmt_value(out, v);
        } else if constexpr (std::is_same_v<T, bool>) {
          out += v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          char buf[48];
          std::snprintf(buf, sizeof buf, "%.3f", v);
          out += buf;
        } else {
          append_integer(out, v);
        }
      },
      value);
}

void append_json_value(std::string& out, const LogField::Value& value) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          append_json_quoted(out, v);
        } else if constexpr (std::is_same_v<T, bool>) {
          out += v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          append_json_double(out, v);
        } else {
          append_integer(out, v);
        }
      },
      value);
}

bool reserved_json_key(std::string_view key) { return key == "ts" || key == "level" || key == "event"; }

// Bounded copy for the fallback line: no allocation, no overflow.
class FixedLine {
 public:
  void add(std::string_view s) {
    for (char c : s) {
      if (used_ + 1 < sizeof buf_) buf_[used_++] = c;
    }
  }
  // The event name, reduced to name bytes (valid in both formats unquoted).
  void add_name(std::string_view s) {
    size_t n = 0;
    for (char c : s) {
      if (++n > 64) break;
      const char safe = is_name_byte(static_cast<unsigned char>(c)) ? c : '_';
      add(std::string_view(&safe, 1));
    }
    if (s.empty()) add("_");
  }
  std::string_view view() const { return {buf_, used_}; }

 private:
  char buf_[256];
  size_t used_ = 0;
};

void write_all(int fd, std::string_view line) noexcept {
  size_t off = 0;
  while (off < line.size()) {
    const ssize_t n = ::write(fd, line.data() + off, line.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a log that cannot be written must not stop the daemon
    off += static_cast<size_t>(n);
  }
}

}  // namespace

std::string Logger::format_line(LogLevel level, std::string_view event,
                                std::span<const LogField> fields) const {
  char ts[kTimestampBytes];
  format_timestamp(ts);
  std::string line;
  line.reserve(128 + fields.size() * 24);
  if (format_ == LogFormat::kJson) {
    line += "{\"ts\":\"";
    line += ts;
    line += "\",\"level\":\"";
    line += level_name(level);
    line += "\",\"event\":";
    append_json_quoted(line, event);
    for (size_t i = 0; i < fields.size(); ++i) {
      const std::string_view key = fields[i].key;
      bool repeated = reserved_json_key(key);
      for (size_t j = 0; j < i && !repeated; ++j) repeated = fields[j].key == key;
      if (repeated) continue;  // duplicate names would make readers disagree on the value
      line += ',';
      append_json_quoted(line, key);
      line += ':';
      append_json_value(line, fields[i].value);
    }
    line += '}';
    return line;
  }
  line += ts;
  line += " level=";
  line += level_name(level);
  line += " event=";
  append_logfmt_name(line, event);
  for (const LogField& f : fields) {
    line += ' ';
    append_logfmt_name(line, f.key);
    line += '=';
    append_text_value(line, f.value);
  }
  return line;
}

void Logger::log(LogLevel level, std::string_view event, std::span<const LogField> fields) const noexcept {
  if (level < min_level_) return;
  const char* failure = nullptr;
  try {
    std::string line = format_line(level, event, fields);
    line += '\n';
    // One write(2) per line: concurrent lines never interleave.
    write_all(fd_, line);
    return;
  } catch (const std::bad_alloc&) {
    failure = "fields dropped: out of memory";
  } catch (...) {
    failure = "fields dropped: formatting failed";
  }
  // The event still shows up, so counts by event stay right.
  char ts[kTimestampBytes];
  format_timestamp(ts);
  FixedLine line;
  if (format_ == LogFormat::kJson) {
    line.add("{\"ts\":\"");
    line.add(ts);
    line.add("\",\"level\":\"");
    line.add(level_name(level));
    line.add("\",\"event\":\"");
    line.add_name(event);
    line.add("\",\"log_error\":\"");
    line.add(failure);
    line.add("\"}\n");
  } else {
    line.add(ts);
    line.add(" level=");
    line.add(level_name(level));
    line.add(" event=");
    line.add_name(event);
    line.add(" log_error=\"");
    line.add(failure);
    line.add("\"\n");
  }
  write_all(fd_, line.view());
}

}  // namespace faultline
