// InstallFence: orders snapshot installs against the reading of REMOVE events.
//
// The race it closes (DESIGN.md §4): the kernel wakes a madvise()ing thread
// the moment our read() dequeues its REMOVE event, and that thread then zaps
// the range. A worker that decided "serve from the snapshot" before the REMOVE
// was recorded, and whose UFFDIO_COPY lands after the zap, would bring stale
// snapshot bytes back into a page the guest gave away. While a REMOVE is
// still unread every install fails with EAGAIN, so the only dangerous window
// is between the dequeue and the moment the reader has recorded the REMOVE in
// the page-state table. The fence makes that window and snapshot installs
// mutually exclusive:
//   reader:  begin_read(); read(uffd); record REMOVEs; end_read();
//   worker:  enter(); re-check page state; UFFDIO_COPY; record; exit();
// Workers never exclude each other (one cache line each). The reader waits
// only for installs already inside the fence, which copy from memory the
// worker staged beforehand: it never waits on storage I/O. Zero installs need
// no fence: zeros are never stale.
//
// Thread-safety: enter/exit for slot i from one thread at a time (the worker
// owning slot i); begin_read/end_read from the single reader thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>

#include "server/wake_signal.h"

namespace faultline {

class InstallFence {
 public:
  explicit InstallFence(size_t slots) : count_(slots), slots_(std::make_unique<Slot[]>(slots)) {}
  InstallFence(const InstallFence&) = delete;
  InstallFence& operator=(const InstallFence&) = delete;

  // Worker: blocks while the reader is between begin_read() and end_read().
  void enter(size_t slot) {
    for (;;) {
      // Dekker-style handshake with begin_read(): announce, then check. Both
      // sides use seq_cst so that at least one of them sees the other.
      slots_[slot].active.store(true, std::memory_order_seq_cst);
      if (!reading_.load(std::memory_order_seq_cst)) return;
      exit(slot);
      wait_until([&] { return !reading_.load(std::memory_order_seq_cst); }, read_done_, workers_waiting_);
    }
  }
  void exit(size_t slot) {
    slots_[slot].active.store(false, std::memory_order_seq_cst);
    if (reader_waiting_.load(std::memory_order_seq_cst) != 0) slot_exited_.notify();
  }

  // Reader: waits until no worker is inside the fence, and keeps new ones out
  // until end_read().
  void begin_read() {
    reading_.store(true, std::memory_order_seq_cst);
    for (size_t i = 0; i < count_; ++i) {
      wait_until([&] { return !slots_[i].active.load(std::memory_order_seq_cst); }, slot_exited_, reader_waiting_);
    }
  }
  void end_read() {
    reading_.store(false, std::memory_order_seq_cst);
    if (workers_waiting_.load(std::memory_order_seq_cst) != 0) read_done_.notify_all();
  }

 private:
  struct alignas(64) Slot {
    std::atomic<bool> active{false};
  };
  // Both sides hold the fence for microseconds (a memory-to-memory ioctl, or
  // a non-blocking read plus table stores): spin briefly, then sleep on a
  // futex that the other side bumps (never sched_yield, which on a busy
  // 2-core machine can cost a whole time slice).
  template <typename Pred>
  static void wait_until(Pred done, WakeSignal& signal, std::atomic<int>& waiting) {
    for (int spins = 0; spins < 200; ++spins) {
      if (done()) return;
      __builtin_ia32_pause();
    }
    for (;;) {
      const uint32_t seen = signal.value();
      waiting.fetch_add(1, std::memory_order_seq_cst);
      const bool ready = done();
      if (!ready) signal.wait(seen, std::chrono::microseconds(500));  // the timeout is only a backstop
      waiting.fetch_sub(1, std::memory_order_seq_cst);
      if (ready || done()) return;
    }
  }

  size_t count_;
  std::unique_ptr<Slot[]> slots_;
  alignas(64) std::atomic<bool> reading_{false};
  alignas(64) std::atomic<int> reader_waiting_{0};
  alignas(64) std::atomic<int> workers_waiting_{0};
  WakeSignal slot_exited_;
  WakeSignal read_done_;
};

}  // namespace faultline
