// WakeSignal: a futex counter that never loses a notify. A lost wake-up
// leaves a thread asleep for good (the session's workers wait with no
// timeout), so the tests that wait with no timeout run in a child process:
// the parent kills it after a generous bound and reports a lost notify,
// instead of hanging until ctest's timeout. Run under ThreadSanitizer in CI.
#include "server/wake_signal.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <functional>
#include <thread>
#include <vector>

#include "tests/thread_state.h"

namespace faultline {
namespace {

using testing::current_tid;
using testing::eventually;
using testing::thread_sleeps_in_futex;

constexpr std::chrono::microseconds kNoLimit{-1};

// Runs `body` in a forked child (this process is single-threaded between
// tests). Returns "" when it returned true, else why not: it returned false
// (its message), crashed, or was still running after `limit` (a thread that
// never woke) and was killed.
std::string in_child(const std::function<bool()>& body, std::chrono::seconds limit = std::chrono::seconds(60)) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) ::_exit(body() ? 0 : 1);
  int status = 0;
  const bool ended = testing::eventually([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, limit);
  if (!ended) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return "still asleep after " + std::to_string(limit.count()) + " s: a notify was lost";
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFEXITED(status)) return "the child exited with " + std::to_string(WEXITSTATUS(status));
  return "the child died of signal " + std::to_string(WTERMSIG(status));
}

TEST(WakeSignal, NotifyBumpsTheCounter) {
  WakeSignal s;
  const uint32_t v = s.value();
  s.notify();
  EXPECT_EQ(s.value(), v + 1);
  s.notify_all();
  EXPECT_EQ(s.value(), v + 2);
}

// The notify came between the waiter's look at the counter and its sleep:
// the wait must return at once instead of sleeping through it.
TEST(WakeSignal, AWaitOnAStaleValueReturnsAtOnce) {
  EXPECT_EQ(in_child([] {
              WakeSignal s;
              const uint32_t seen = s.value();
              s.notify();
              s.wait(seen, kNoLimit);
              return true;
            }),
            "");
}

TEST(WakeSignal, AWaitWithATimeoutReturnsWithoutANotify) {
  WakeSignal s;
  const uint32_t seen = s.value();
  s.wait(seen, std::chrono::microseconds(1000));
  EXPECT_EQ(s.value(), seen);
}

// notify() wakes a thread already asleep on the futex with no timeout.
TEST(WakeSignal, NotifyWakesASleepingWaiter) {
  EXPECT_EQ(in_child([] {
              WakeSignal s;
              std::atomic<pid_t> tid{0};
              std::atomic<bool> woke{false};
              const uint32_t seen = s.value();
              std::thread waiter([&] {
                tid = current_tid();
                s.wait(seen, kNoLimit);
                woke = true;
              });
              eventually([&] { return woke || (tid != 0 && thread_sleeps_in_futex(tid)); });
              const bool slept = !woke.load();  // else wait() returned with no notify
              s.notify();
              waiter.join();
              return slept;
            }),
            "");
}

TEST(WakeSignal, NotifyAllWakesEveryWaiter) {
  EXPECT_EQ(in_child([] {
              constexpr int kWaiters = 8;
              WakeSignal s;
              const uint32_t seen = s.value();
              std::vector<std::atomic<pid_t>> tids(kWaiters);
              std::atomic<int> woke{0};
              std::vector<std::thread> waiters;
              for (int i = 0; i < kWaiters; ++i) {
                waiters.emplace_back([&, i] {
                  tids[i] = current_tid();
                  s.wait(seen, kNoLimit);
                  woke++;
                });
              }
              for (int i = 0; i < kWaiters; ++i) {
                eventually([&] { return woke > 0 || (tids[i] != 0 && thread_sleeps_in_futex(tids[i])); });
              }
              const bool slept = woke.load() == 0;
              s.notify_all();
              for (auto& t : waiters) t.join();
              return slept;
            }),
            "");
}

// Two threads hand a turn back and forth, each sleeping with no timeout until
// the other notifies it: the pattern of the session's workers and reader.
// One lost notify leaves both asleep for good.
TEST(WakeSignal, PingPongWithoutTimeoutsNeverMissesANotify) {
#if defined(__SANITIZE_THREAD__)
  constexpr int kRounds = 20000;
#else
  constexpr int kRounds = 200000;
#endif
  EXPECT_EQ(in_child([] {
              WakeSignal to_a, to_b;
              std::atomic<int> turn{0};  // 0: a's turn, 1: b's turn
              auto player = [&](int me, WakeSignal& mine, WakeSignal& other) {
                for (int i = 0; i < kRounds; ++i) {
                  for (;;) {
                    const uint32_t seen = mine.value();  // look, then check: a later notify ends the wait
                    if (turn.load() == me) break;
                    mine.wait(seen, kNoLimit);
                  }
                  turn.store(1 - me);
                  other.notify();
                }
              };
              std::barrier start(2);
              std::thread a([&] {
                start.arrive_and_wait();
                player(0, to_a, to_b);
              });
              std::thread b([&] {
                start.arrive_and_wait();
                player(1, to_b, to_a);
              });
              a.join();
              b.join();
              return true;
            }, std::chrono::seconds(120)),
            "");
}

}  // namespace
}  // namespace faultline
