// FaultRing: the single-producer single-consumer ring from the event reader
// to a worker. Order, capacity and the SPSC hand-over under two threads (run
// under ThreadSanitizer in CI: a slot read before its write is published is a
// data race it reports).
#include "server/fault_ring.h"

#include <gtest/gtest.h>

#include <barrier>
#include <thread>

namespace faultline {
namespace {

// A fault whose every field is derived from `i`, so a torn or reordered
// slot shows up as a mismatch.
kernel::PageFault fault(uint64_t i) {
  return {.address = 0x7f0000000000ull + i * 4096, .write = i % 2 == 1, .wp = i % 3 == 0,
          .tid = static_cast<uint32_t>(i * 7 + 1)};
}

::testing::AssertionResult same(const kernel::PageFault& got, uint64_t i) {
  const kernel::PageFault want = fault(i);
  if (got.address == want.address && got.write == want.write && got.wp == want.wp && got.tid == want.tid) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "fault " << i << ": got address " << std::hex << got.address << " write "
                                       << got.write << " wp " << got.wp << " tid " << std::dec << got.tid;
}

TEST(FaultRing, EmptyRingPopsNothing) {
  FaultRing ring(4);
  kernel::PageFault out;
  EXPECT_TRUE(ring.empty());
  EXPECT_FALSE(ring.pop(out));
}

TEST(FaultRing, CapacityIsRoundedUpToAPowerOfTwoAndAFullRingRefusesAPush) {
  FaultRing ring(5);  // holds 8
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(ring.push(fault(i))) << i;
  EXPECT_FALSE(ring.push(fault(8))) << "a full ring must refuse, not overwrite the oldest fault";
  kernel::PageFault out;
  ASSERT_TRUE(ring.pop(out));
  EXPECT_TRUE(same(out, 0));
  EXPECT_TRUE(ring.push(fault(8))) << "one pop frees one slot";
  EXPECT_FALSE(ring.push(fault(9)));
  for (uint64_t i = 1; i <= 8; ++i) {
    ASSERT_TRUE(ring.pop(out)) << i;
    EXPECT_TRUE(same(out, i));
  }
  EXPECT_TRUE(ring.empty());
}

TEST(FaultRing, PopsInPushOrderAcrossManyWrapArounds) {
  FaultRing ring(4);
  uint64_t pushed = 0, popped = 0;
  kernel::PageFault out;
  // Batches of 1..4 faults, so the indexes wrap at every offset of the ring.
  for (int round = 0; round < 1000; ++round) {
    const int batch = 1 + round % 4;
    for (int k = 0; k < batch; ++k) ASSERT_TRUE(ring.push(fault(pushed++)));
    for (int k = 0; k < batch; ++k) {
      ASSERT_TRUE(ring.pop(out));
      ASSERT_TRUE(same(out, popped++));
    }
    ASSERT_TRUE(ring.empty());
  }
}

// The reader and a worker at full speed: every fault arrives once, in push
// order, with its fields intact, through a ring far smaller than the stream
// (so it keeps filling and draining).
TEST(FaultRing, OneProducerAndOneConsumerLoseNothingAndKeepOrder) {
#if defined(__SANITIZE_THREAD__)
  constexpr uint64_t kFaults = 50000;
#else
  constexpr uint64_t kFaults = 1000000;
#endif
  FaultRing ring(64);
  std::barrier start(2);
  uint64_t full = 0, mismatches = 0, received = 0;
  std::thread producer([&] {
    start.arrive_and_wait();
    for (uint64_t i = 0; i < kFaults; ++i) {
      while (!ring.push(fault(i))) {
        ++full;
        std::this_thread::yield();
      }
    }
  });
  std::thread consumer([&] {
    start.arrive_and_wait();
    kernel::PageFault out;
    while (received < kFaults) {
      if (!ring.pop(out)) {
        std::this_thread::yield();
        continue;
      }
      if (!same(out, received)) ++mismatches;
      ++received;
    }
  });
  producer.join();
  consumer.join();
  EXPECT_EQ(received, kFaults);
  EXPECT_EQ(mismatches, 0u) << "faults arrived out of order or torn";
  EXPECT_TRUE(ring.empty());
  std::printf("%llu faults through a 64-slot ring; the producer found it full %llu times\n",
              static_cast<unsigned long long>(kFaults), static_cast<unsigned long long>(full));
}

}  // namespace
}  // namespace faultline
