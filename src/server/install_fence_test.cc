// InstallFence: the reader's [read + record REMOVEs] and snapshot installs
// are mutually exclusive; workers never exclude each other. Run under
// ThreadSanitizer in CI (label `sanitizers`): the contention test's plain,
// non-atomic shared data is a data race unless the fence orders it.
#include "server/install_fence.h"

#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#include "tests/thread_state.h"

namespace faultline {
namespace {

using testing::current_tid;
using testing::eventually;
using testing::thread_sleeps_in_futex;

TEST(InstallFence, BeginReadWaitsForAnInstallAlreadyInside) {
  InstallFence fence(2);
  fence.enter(1);
  std::atomic<pid_t> reader_tid{0};
  std::atomic<bool> reading{false};
  std::thread reader([&] {
    reader_tid = current_tid();
    fence.begin_read();
    reading = true;
    fence.end_read();
  });
  // The reader goes to sleep on the fence's futex, waiting for slot 1,
  // without getting in while the install is inside.
  EXPECT_TRUE(eventually([&] { return reading || (reader_tid != 0 && thread_sleeps_in_futex(reader_tid)); }));
  EXPECT_FALSE(reading.load()) << "begin_read() returned while an install was inside the fence";
  fence.exit(1);
  reader.join();
  EXPECT_TRUE(reading.load());
}

TEST(InstallFence, EnterWaitsWhileTheReaderReads) {
  InstallFence fence(2);
  fence.begin_read();  // nobody inside: returns at once
  std::atomic<pid_t> worker_tid{0};
  std::atomic<bool> entered{false};
  std::thread worker([&] {
    worker_tid = current_tid();
    fence.enter(0);
    entered = true;
    fence.exit(0);
  });
  EXPECT_TRUE(eventually([&] { return entered || (worker_tid != 0 && thread_sleeps_in_futex(worker_tid)); }));
  EXPECT_FALSE(entered.load()) << "enter() returned while the reader was between begin_read() and end_read()";
  fence.end_read();
  worker.join();
  EXPECT_TRUE(entered.load());
}

TEST(InstallFence, WorkersNeverExcludeEachOther) {
  InstallFence fence(3);
  fence.enter(0);
  fence.enter(1);  // same thread, other slot: would block forever if slots excluded each other
  std::atomic<bool> third_in{false};
  std::thread other([&] {
    fence.enter(2);
    third_in = true;
    fence.exit(2);
  });
  other.join();
  EXPECT_TRUE(third_in.load());
  fence.exit(1);
  fence.exit(0);
  fence.begin_read();  // every slot is out again: the reader gets in
  fence.end_read();
}

// One reader and three workers hammer the fence together. The reader checks
// that no worker is inside while it reads; each worker checks the reader is
// not reading while it is inside. Besides the counters, plain (non-atomic)
// data crosses the fence both ways, as the page-state table and staged
// buffers do in the server: ThreadSanitizer reports it unless the fence
// orders every access.
TEST(InstallFence, ReadsAndInstallsAreMutuallyExclusiveUnderContention) {
  constexpr int kWorkers = 3;
#if defined(__SANITIZE_THREAD__)
  constexpr int kReads = 5000;
#else
  constexpr int kReads = 50000;
#endif
  // The reader goes on until the workers got in this often too, so the two
  // sides really overlap however the threads are scheduled.
  constexpr uint64_t kMinInstalls = 1000;
  InstallFence fence(kWorkers);
  std::atomic<int> workers_inside{0};
  std::atomic<bool> reader_inside{false}, reads_done{false};
  std::atomic<uint64_t> violations{0}, installs{0};
  uint64_t epoch = 0;                          // written by the reader inside its read section only
  uint64_t epochs_seen = 0;                    // the reader's, printed at the end
  std::vector<uint64_t> seen_epoch(kWorkers);  // slot i written by worker i inside the fence only
  std::barrier start(kWorkers + 1);
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    start.arrive_and_wait();
    for (int i = 0; i < kReads || installs.load() < kMinInstalls; ++i) {
      fence.begin_read();
      reader_inside = true;
      if (workers_inside.load() != 0) violations++;
      ++epoch;
      for (uint64_t s : seen_epoch) epochs_seen += s;  // the workers' plain writes
      reader_inside = false;
      fence.end_read();
    }
    reads_done = true;
  });
  for (int w = 0; w < kWorkers; ++w) {
    threads.emplace_back([&, w] {
      start.arrive_and_wait();
      while (!reads_done.load()) {
        fence.enter(static_cast<size_t>(w));
        workers_inside++;
        if (reader_inside.load()) violations++;
        seen_epoch[static_cast<size_t>(w)] = epoch;  // the reader's plain write
        workers_inside--;
        fence.exit(static_cast<size_t>(w));
        installs++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(violations.load(), 0u) << "a read section and an install overlapped";
  EXPECT_GE(installs.load(), kMinInstalls);
  std::printf("%llu read sections, %llu installs (epoch sum %llu)\n", static_cast<unsigned long long>(epoch),
              static_cast<unsigned long long>(installs.load()), static_cast<unsigned long long>(epochs_seen));
}

}  // namespace
}  // namespace faultline
