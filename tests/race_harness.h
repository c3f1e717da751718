// Tools for forcing interleavings between the guest and faultline's threads,
// with gates and barriers instead of sleeps:
//   - Gate: a one-shot barrier a test opens;
//   - ReaderPause: parks the session's event reader before its next read(),
//     so events the client queues meanwhile are read as one batch;
//   - InstallPark: parks the server thread that reaches an install point for
//     a given page (after it staged the page, before the ioctl);
//   - Actor: a thread that runs one guest action and publishes its tid, so
//     the test can wait until the kernel has blocked it in the userfaultfd
//     (on a fault, or in madvise waiting for its REMOVE to be read).
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "server/test_hooks.h"
#include "tests/thread_state.h"

namespace faultline::testing {

class Gate {
 public:
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }
  // Waits at most `limit`; returns whether the gate opened.
  bool wait_for(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return open_; });
  }
  bool is_open() {
    std::lock_guard lock(mu_);
    return open_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Parks the event reader (of every session in this process) once, before its
// next read of the uffd. Released by release() or destruction.
class ReaderPause {
 public:
  ReaderPause() {
    test_hooks::set(HookPoint::kReaderBeforeRead, [this](HookContext&) {
      if (used_.exchange(true)) return;
      arrived_.open();
      release_.wait();
    });
  }
  ~ReaderPause() {
    release();
    test_hooks::clear(HookPoint::kReaderBeforeRead);
  }
  // True once the reader is parked (it saw pending events and stopped).
  bool wait_arrived() { return arrived_.wait_for(std::chrono::seconds(10)); }
  void release() { release_.open(); }

 private:
  std::atomic<bool> used_{false};
  Gate arrived_, release_;
};

// Parks the first server thread that reaches `point` for the page at
// `address` (or for any page when `address` is 0 and `all` is set: then
// every thread reaching the point parks until release()).
class InstallPark {
 public:
  InstallPark(HookPoint point, uint64_t address, bool all = false, int inject_errno_once = 0)
      : point_(point), address_(address), all_(all), inject_once_(inject_errno_once) {
    test_hooks::set(point, [this](HookContext& c) {
      if (!all_ && c.address != address_) return;
      if (inject_once_ != 0) {
        if (!injected_.exchange(true)) c.inject_errno = inject_once_;
        return;
      }
      if (!all_ && used_.exchange(true)) return;
      if (released_.is_open()) return;
      arrivals_.fetch_add(1);
      {
        std::lock_guard lock(mu_);
        cv_.notify_all();
      }
      released_.wait();
    });
  }
  ~InstallPark() {
    release();
    test_hooks::clear(point_);
  }
  // Waits until `n` threads are parked here.
  bool wait_parked(int n = 1) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return arrivals_.load() >= n; });
  }
  bool injected() const { return injected_.load(); }
  void release() { released_.open(); }

 private:
  HookPoint point_;
  uint64_t address_;
  bool all_;
  int inject_once_;
  std::atomic<bool> used_{false}, injected_{false};
  std::atomic<int> arrivals_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  Gate released_;
};

// Where a guest action waits in the kernel for faultline.
enum class UffdWait {
  kFault,        // blocked on a page fault in a registered range, until an install wakes it
  kRemoveEvent,  // in madvise(MADV_DONTNEED), until the server reads its REMOVE event
};

// Whether thread `tid` of this process sleeps in the userfaultfd, as `wait`.
// Kernel facts, verified on this project's Linux 6.18 hosts (a probe that
// faults on a registered page and madvises another, then these tests):
//   - a thread blocked on a uffd fault sleeps in handle_userfault (state S,
//     /proc/self/task/TID/syscall "-1": a fault, not a system call), for
//     4 KiB anonymous and 2 MiB hugetlb pages alike;
//   - a thread in madvise(MADV_DONTNEED) waiting for its REMOVE to be read
//     sleeps in userfaultfd_event_wait_completion (state D; stack:
//     userfaultfd_remove <- madvise_vma_behavior <- do_madvise).
// A vCPU's fault (KVM_RUN, then get_user_pages -> handle_mm_fault) should
// sleep in handle_userfault too; that is NOT verified here: the 2026-12 hosts
// have no /dev/kvm. If it differs, the Vcpu race tests fail at wait_blocked().
// A thread asleep anywhere else (a futex, poll, the page allocator) is not
// waiting for faultline, and a test that went on would race instead of
// forcing the interleaving it names.
inline bool thread_waits_in(pid_t tid, UffdWait wait) {
  const std::string wchan = thread_wchan(tid);
  return wchan == (wait == UffdWait::kFault ? "handle_userfault" : "userfaultfd_event_wait_completion");
}

// One guest action on its own thread.
class Actor {
 public:
  explicit Actor(std::function<void()> action) {
    thread_ = std::thread([this, a = std::move(action)] {
      tid_.store(current_tid());
      a();
      done_.store(true);
    });
    while (tid_.load() == 0) std::this_thread::yield();
  }
  ~Actor() { join(); }
  pid_t tid() const { return tid_.load(); }
  bool done() const { return done_.load(); }
  // Waits (bounded) until the kernel has put the action to sleep in the
  // userfaultfd as `wait` says: blocked on a fault, or in madvise waiting for
  // its REMOVE event to be read.
  bool wait_blocked(UffdWait wait) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (done_.load()) return false;
      if (thread_waits_in(tid_.load(), wait)) return true;
      std::this_thread::yield();
    }
    return false;
  }
  // Waits at most `limit` for the action to finish.
  bool finishes_within(std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done_.load()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling completion, bounded
    }
    return true;
  }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::atomic<pid_t> tid_{0};
  std::atomic<bool> done_{false};
  std::thread thread_;
};

}  // namespace faultline::testing
