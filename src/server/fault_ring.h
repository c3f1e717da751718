// FaultRing: single-producer single-consumer ring of page faults, from the
// event reader to one worker. Fixed capacity, allocated once: the fault path
// allocates nothing and takes no lock.
//
// The element type defaults to the kernel's fault message; a session queues
// its own record of a fault (the message plus when it was read).
//
// Thread-safety: push() from one producer thread, pop() from one consumer.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernel/userfaultfd.h"

namespace faultline {

template <typename Fault = kernel::PageFault>
class FaultRing {
 public:
  // `capacity` is rounded up to a power of two.
  explicit FaultRing(size_t capacity) {
    size_t c = 1;
    while (c < capacity) c <<= 1;
    mask_ = c - 1;
    slots_ = std::make_unique<Fault[]>(c);
  }

  bool push(const Fault& f) {
    const uint64_t tail = tail_.load(std::memory_order_relaxed);
    if (tail - head_.load(std::memory_order_acquire) > mask_) return false;  // full
    slots_[tail & mask_] = f;
    tail_.store(tail + 1, std::memory_order_release);
    return true;
  }

  bool pop(Fault& out) {
    const uint64_t head = head_.load(std::memory_order_relaxed);
    if (head == tail_.load(std::memory_order_acquire)) return false;
    out = slots_[head & mask_];
    head_.store(head + 1, std::memory_order_release);
    return true;
  }

  bool empty() const { return head_.load(std::memory_order_acquire) == tail_.load(std::memory_order_acquire); }

 private:
  std::unique_ptr<Fault[]> slots_;
  size_t mask_ = 0;
  alignas(64) std::atomic<uint64_t> head_{0};
  alignas(64) std::atomic<uint64_t> tail_{0};
};

}  // namespace faultline
