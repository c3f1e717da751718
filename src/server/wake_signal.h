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

  void notify() {
    seq_.fetch_add(1, std::memory_order_release);
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&seq_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }

  void notify_all() {
    seq_.fetch_add(1, std::memory_order_release);
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&seq_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }

  // Sleeps while the counter still equals `seen`, at most `timeout` (negative: no limit).
  void wait(uint32_t seen, std::chrono::microseconds timeout) const {
    timespec ts{};
    timespec* tsp = nullptr;
    if (timeout.count() >= 0) {
      ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
      ts.tv_nsec = static_cast<long>((timeout.count() % 1000000) * 1000);
      tsp = &ts;
    }
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(const_cast<std::atomic<uint32_t>*>(&seq_)), FUTEX_WAIT_PRIVATE,
              seen, tsp, nullptr, 0);
  }

 private:
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
  std::atomic<uint32_t> seq_{0};
};

}  // namespace faultline
