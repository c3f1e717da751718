// format_message(): the small subset of std::format that faultline_kvm's
// error messages use ("{}" and "{:#x}"), because GCC 12's libstdc++ has no
// <format>. Internal to client/kvm. Thread-safe (pure function).
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace faultline::client::detail {

template <typename T>
std::string render_format_arg(const T& value, bool hex) {
  if constexpr (std::is_integral_v<T>) {
    if (hex) {
      char buf[24];
      std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(value));
      return buf;
    }
    return std::to_string(value);
  } else {
    return std::string(value);
  }
}

inline void format_message_to(std::string& out, std::string_view fmt) { out += fmt; }

template <typename T, typename... Rest>
void format_message_to(std::string& out, std::string_view fmt, const T& value, const Rest&... rest) {
  size_t open = fmt.find('{');
  size_t close = open == std::string_view::npos ? open : fmt.find('}', open);
  if (close == std::string_view::npos) {  // more arguments than placeholders
    out += fmt;
    return;
  }
  out += fmt.substr(0, open);
  out += render_format_arg(value, fmt.substr(open, close - open + 1) == "{:#x}");
  format_message_to(out, fmt.substr(close + 1), rest...);
}

// format_message("page {:#x} of {}", 4096, "guest") == "page 0x1000 of guest"
template <typename... Args>
std::string format_message(std::string_view fmt, const Args&... args) {
  std::string out;
  format_message_to(out, fmt, args...);
  return out;
}

}  // namespace faultline::client::detail
