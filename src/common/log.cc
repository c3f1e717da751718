#include "common/log.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>

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

std::string timestamp() {
  using namespace std::chrono;
  const auto now = system_clock::now();
  const auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  const std::time_t t = system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(ms));
  return buf;
}

// logfmt quotes a value only when it needs to: spaces, quotes, '=' or empty.
void append_logfmt_value(std::string& out, const std::string& v) {
  const bool needs_quotes = v.empty() || v.find_first_of(" \"=\t\n\\") != std::string::npos;
  if (!needs_quotes) {
    out += v;
    return;
  }
  out += nlohmann::json(v).dump();  // JSON string escaping is valid logfmt quoting
}

}  // namespace

std::string Logger::format_line(LogLevel level, std::string_view event,
                                std::span<const LogField> fields) const {
  if (format_ == LogFormat::kJson) {
    nlohmann::ordered_json j;
    j["ts"] = timestamp();
    j["level"] = level_name(level);
    j["event"] = std::string(event);
    for (const LogField& f : fields) {
      std::visit([&](const auto& v) { j[std::string(f.key)] = v; }, f.value);
    }
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  std::string line = timestamp();
  line += " level=";
  line += level_name(level);
  line += " event=";
  line += event;
  for (const LogField& f : fields) {
    line += ' ';
    line += f.key;
    line += '=';
    std::visit(
        [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, std::string>) {
            append_logfmt_value(line, v);
          } else if constexpr (std::is_same_v<T, bool>) {
            line += v ? "true" : "false";
          } else if constexpr (std::is_same_v<T, double>) {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.3f", v);
            line += buf;
          } else {
            line += std::to_string(v);
          }
        },
        f.value);
  }
  return line;
}

void Logger::log(LogLevel level, std::string_view event, std::span<const LogField> fields) const {
  if (level < min_level_) return;
  std::string line = format_line(level, event, fields);
  line += '\n';
  // One write(2) per line: concurrent lines never interleave.
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::write(fd_, line.data() + off, line.size() - off);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

}  // namespace faultline
