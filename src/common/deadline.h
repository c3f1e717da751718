// ScopedDeadline: a deadline, and a stop flag, for the blocking calls the
// calling thread makes while the scope lives.
//
// A session serving a fault may wait for its page's bytes only until its
// store deadline (serve --store-deadline). The calls it makes on the way
// (an S3 GET with its retries, a wait for another thread's load of the same
// frame) know nothing of sessions; they ask current_deadline() instead, and
// give up (with a retryable error) once it has passed or the flag is set, so
// that a store that accepts connections and never answers ends the session
// at its deadline rather than after every timeout and retry of every layer.
//
// Scopes nest: the inner one's deadline is the earlier of the two, and it
// is cancelled by its own flag and by every flag of the scopes around it (up
// to kMaxFlags in all; an innermost scope past that keeps the outer ones').
//
// Thread-safety: per thread (thread_local); the flag is read from any thread.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <optional>
#include <thread>

namespace faultline {

struct ThreadDeadline {
  static constexpr size_t kMaxFlags = 4;

  std::chrono::steady_clock::time_point at;
  // Any of them set: give up now. The first `flag_count` are in use.
  std::array<const std::atomic<bool>*, kMaxFlags> flags{};
  size_t flag_count = 0;

  bool has_flags() const { return flag_count != 0; }
  bool cancelled() const {
    for (size_t i = 0; i < flag_count; ++i) {
      if (flags[i]->load(std::memory_order_acquire)) return true;
    }
    return false;
  }
  bool passed() const { return cancelled() || std::chrono::steady_clock::now() >= at; }
};

namespace detail {
inline thread_local std::optional<ThreadDeadline> g_thread_deadline;
}  // namespace detail

// The calling thread's deadline, if a ScopedDeadline is live on it.
inline std::optional<ThreadDeadline> current_deadline() { return detail::g_thread_deadline; }

// The deadline `wait` from now for a ScopedDeadline; none (the far
// future) when `wait` is zero or less. A caller that will not wait for a
// store at all (serve --store-deadline 0: its first failure counts) still
// lets each request make its attempts: a passed deadline would send none.
inline std::chrono::steady_clock::time_point deadline_in(std::chrono::milliseconds wait) {
  if (wait.count() <= 0) return std::chrono::steady_clock::time_point::max();
  return std::chrono::steady_clock::now() + wait;
}

// Sleeps for `pause`: true; or until `deadline` has passed or its scope is
// cancelled: false, within 50 ms of the cancellation.
inline bool sleep_unless_given_up(std::chrono::milliseconds pause, const ThreadDeadline& deadline) {
  constexpr auto kSlice = std::chrono::milliseconds(50);
  const auto until = std::chrono::steady_clock::now() + pause;
  for (auto now = std::chrono::steady_clock::now(); now < until; now = std::chrono::steady_clock::now()) {
    if (deadline.passed()) return false;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(until - now, kSlice));
  }
  return !deadline.passed();
}

// Waits on `cv` (with `lock` held) until `done()` holds: true; or until
// `deadline` has passed or its scope is cancelled: false. It looks every
// 50 ms, since nothing notifies the wait of a cancellation.
template <typename Predicate>
bool wait_unless_given_up(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                          const ThreadDeadline& deadline, Predicate done) {
  constexpr auto kSlice = std::chrono::milliseconds(50);
  while (!done()) {
    if (deadline.passed()) return false;
    cv.wait_until(lock, std::min(deadline.at, std::chrono::steady_clock::now() + kSlice), done);
  }
  return true;
}

class ScopedDeadline {
 public:
  explicit ScopedDeadline(std::chrono::steady_clock::time_point at, const std::atomic<bool>* cancelled = nullptr)
      : outer_(detail::g_thread_deadline) {
    ThreadDeadline d{.at = at};
    if (outer_) {
      d = *outer_;
      d.at = std::min(at, outer_->at);
    }
    if (cancelled != nullptr && d.flag_count < ThreadDeadline::kMaxFlags) d.flags[d.flag_count++] = cancelled;
    detail::g_thread_deadline = d;
  }
  // Replaces this thread's deadline with `replacement` (none: no deadline)
  // until the scope ends, whatever scopes are around it: a helper thread
  // doing part of another thread's work adopts that thread's
  // current_deadline(), and cleanup that must run even past its caller's
  // deadline (aborting a multipart upload) gets a bounded one of its own.
  explicit ScopedDeadline(const std::optional<ThreadDeadline>& replacement) : outer_(detail::g_thread_deadline) {
    detail::g_thread_deadline = replacement;
  }
  ~ScopedDeadline() { detail::g_thread_deadline = outer_; }
  ScopedDeadline(const ScopedDeadline&) = delete;
  ScopedDeadline& operator=(const ScopedDeadline&) = delete;

 private:
  std::optional<ThreadDeadline> outer_;
};

}  // namespace faultline
