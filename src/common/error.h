// Error values for every fallible boundary in faultline.
//
// faultline does not throw across module boundaries: a call that can fail
// returns Result<T> (std::expected<T, Error>). An Error carries the errno that
// caused it (0 when the failure is not a system error, e.g. malformed JSON)
// and one human sentence that says what went wrong and, where it helps, what
// to do about it. Errors are plain values: cheap to copy, safe to hand to any
// thread.
#pragma once

#include <cerrno>
#include <cstring>
#include <expected>
#include <string>
#include <utility>

namespace faultline {

struct Error {
  int code = 0;         // errno value, or 0 when not a system error
  std::string message;  // one sentence, no trailing newline
  // The same call may succeed if tried again later (a store that timed out,
  // ran out of fds or memory for a moment). Errors that would only repeat
  // themselves (bad bytes, a missing file) leave it false.
  bool retryable = false;

  // "message: strerror(code)" when code != 0, else message.
  std::string describe() const {
    if (code == 0) return message;
    return message + ": " + std::strerror(code);
  }
};

template <typename T>
using Result = std::expected<T, Error>;

// Result for operations that produce no value.
using Status = std::expected<void, Error>;

inline std::unexpected<Error> fail(std::string message, int code = 0) {
  return std::unexpected<Error>(Error{code, std::move(message)});
}

// Builds an error from the current errno. Call right after the failing syscall.
inline std::unexpected<Error> fail_errno(std::string message) {
  return std::unexpected<Error>(Error{errno, std::move(message)});
}

}  // namespace faultline
