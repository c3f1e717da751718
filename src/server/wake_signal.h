// WakeSignal: a counter a thread can sleep on until another bumps it, with a
// timeout. A thin futex wrapper: no allocation, no lock, no lost wake-ups
// (the sleeper passes the value it last saw; a bump in between returns at once).
//
// Thread-safety: any number of notifiers; one or more waiters.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <climits>
#include <ctime>

namespace faultline {

class WakeSignal {
 public:
  uint32_t value() const { return seq_.load(std::memory_order_acquire); }

  // The futex syscall is made only when someone sleeps: on the fault path
  // most notifications find the other thread awake and cost one atomic add.
  // (A sleeper registers before it sleeps and sleeps only while the counter
  // still holds the value it saw, so a bump it missed wakes it at once.)
  void notify() { bump(1); }
  void notify_all() { bump(INT32_MAX); }

  // Sleeps while the counter still equals `seen`, at most `timeout` (negative: no limit).
  void wait(uint32_t seen, std::chrono::microseconds timeout) const {
    timespec ts{};
    timespec* tsp = nullptr;
    if (timeout.count() >= 0) {
      ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
      ts.tv_nsec = static_cast<long>((timeout.count() % 1000000) * 1000);
      tsp = &ts;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(const_cast<std::atomic<uint32_t>*>(&seq_)), FUTEX_WAIT_PRIVATE,
              seen, tsp, nullptr, 0);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  void bump(int wake) {
    seq_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&seq_), FUTEX_WAKE_PRIVATE, wake, nullptr, nullptr, 0);
    }
  }

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
  std::atomic<uint32_t> seq_{0};
  mutable std::atomic<int> sleepers_{0};
};

}  // namespace faultline
