// Logger: one line per event, as logfmt text (key=value, what journald, Loki
// and humans read) or as JSON objects (--log-format=json, for machines).
//
// Every line has a timestamp, a level and an event name, then typed fields:
//   2026-11-29T17:40:01.123Z level=info event=session_start session=1 pid=4242
//   {"ts":"2026-11-29T17:40:01.123Z","level":"info","event":"session_start","session":1,"pid":4242}
//
// Any bytes are safe in any value, key or event name, in either format: a
// client's invalid UTF-8, NUL or newline can neither throw nor break a line.
//   - JSON: every string is rendered as common/text_escape.h describes (valid
//     UTF-8 kept, control bytes as \u00XX, each invalid byte as \ufffd), so
//     every line parses as one JSON object. A key that repeats an earlier key
//     (or "ts", "level", "event") is dropped: the first one wins.
//   - text (logfmt): a value made only of printable ASCII other than '"', '='
//     and '\' is written bare; any other value is quoted with the same JSON
//     string rendering (go-logfmt reads it back). Keys and the event name are
//     written bare with every byte outside [A-Za-z0-9_.:/-] replaced by '_'.
//   So no line ever holds a raw control byte (0x00-0x1f, 0x7f), a C1 control,
//   U+2028/U+2029 or invalid UTF-8, and each line ends with its only newline.
// log() never throws: when building a line fails (std::bad_alloc included),
// it writes a short line built without allocating, with the timestamp, level
// and event name and log_error="fields dropped: ..." instead of the fields.
//
// Thread-safety: safe for concurrent use; each line is written with a single
// write(2), so lines from different threads never interleave.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <variant>

namespace faultline {

enum class LogFormat { kText, kJson };
enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

struct LogField {
  using Value = std::variant<int64_t, uint64_t, double, bool, std::string>;
  std::string_view key;
  Value value;

  LogField(std::string_view k, int v) : key(k), value(int64_t{v}) {}
  LogField(std::string_view k, long v) : key(k), value(int64_t{v}) {}
  LogField(std::string_view k, long long v) : key(k), value(int64_t{v}) {}
  LogField(std::string_view k, unsigned v) : key(k), value(uint64_t{v}) {}
  LogField(std::string_view k, unsigned long v) : key(k), value(uint64_t{v}) {}
  LogField(std::string_view k, unsigned long long v) : key(k), value(uint64_t{v}) {}
  LogField(std::string_view k, double v) : key(k), value(v) {}
  LogField(std::string_view k, bool v) : key(k), value(v) {}
  LogField(std::string_view k, std::string v) : key(k), value(std::move(v)) {}
  LogField(std::string_view k, std::string_view v) : key(k), value(std::string(v)) {}
  LogField(std::string_view k, const char* v) : key(k), value(std::string(v)) {}
};

class Logger {
 public:
  // Writes to `fd` (stderr by default). Lines below `min_level` are dropped.
  explicit Logger(LogFormat format = LogFormat::kText, LogLevel min_level = LogLevel::kInfo, int fd = 2)
      : format_(format), min_level_(min_level), fd_(fd) {}

  void log(LogLevel level, std::string_view event, std::span<const LogField> fields) const noexcept;
  void log(LogLevel level, std::string_view event, std::initializer_list<LogField> fields = {}) const noexcept {
    log(level, event, std::span<const LogField>(fields.begin(), fields.size()));
  }
  void debug(std::string_view event, std::initializer_list<LogField> f = {}) const { log(LogLevel::kDebug, event, f); }
  void info(std::string_view event, std::initializer_list<LogField> f = {}) const { log(LogLevel::kInfo, event, f); }
  void warn(std::string_view event, std::initializer_list<LogField> f = {}) const { log(LogLevel::kWarn, event, f); }
  void error(std::string_view event, std::initializer_list<LogField> f = {}) const { log(LogLevel::kError, event, f); }

  // The line log() would write, without the trailing newline (for tests).
  // May throw std::bad_alloc (log() catches it); nothing else.
  std::string format_line(LogLevel level, std::string_view event, std::span<const LogField> fields) const;
  std::string format_line(LogLevel level, std::string_view event, std::initializer_list<LogField> fields) const {
    return format_line(level, event, std::span<const LogField>(fields.begin(), fields.size()));
  }

 private:
  LogFormat format_;
  LogLevel min_level_;
  int fd_;
};

}  // namespace faultline
