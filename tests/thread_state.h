// What the kernel says a thread of this process is doing, for tests that must
// know a thread is asleep where they expect it before they go on (a gate, not
// a sleep that hopes). Reads /proc/self/task/TID/{wchan,syscall}.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>

namespace faultline::testing {

inline pid_t current_tid() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// The kernel function thread `tid` sleeps in ("0" while it runs).
inline std::string thread_wchan(pid_t tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/wchan");
  std::string wchan;
  std::getline(f, wchan);
  return wchan;
}

// The system call thread `tid` is blocked in, or -1 (running in user space:
// "running"; blocked outside a system call, e.g. on a page fault: -1 too).
inline long thread_syscall(pid_t tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/syscall");
  std::string first;
  f >> first;
  if (first.empty() || first == "running") return -1;
  try {
    return std::stol(first);
  } catch (...) {
    return -1;
  }
}

// Whether thread `tid` sleeps in futex(2) (a WakeSignal, a condition variable).
inline bool thread_sleeps_in_futex(pid_t tid) { return thread_syscall(tid) == SYS_futex; }

// Polls `done` until it holds or `limit` has passed; returns whether it held.
// The bound turns a wait that must end (a thread reaching its sleep, a
// deadlock that must not happen) into a failure instead of a hang. It never
// asserts how long anything took.
template <typename Pred>
bool eventually(Pred done, std::chrono::seconds limit = std::chrono::seconds(30)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));  // polling a condition, not ordering a race
  }
  return true;
}

}  // namespace faultline::testing
