#include "server/test_hooks.h"

#ifdef FAULTLINE_TEST_HOOKS

#include <array>
#include <atomic>
#include <mutex>
#include <thread>

namespace faultline::test_hooks {

namespace {
constexpr size_t kPoints = static_cast<size_t>(HookPoint::kCount);
std::mutex mu;
std::array<HookFn, kPoints> hooks;                     // GUARDED_BY(mu)
std::array<std::atomic<bool>, kPoints> armed_points{};  // fast path: no lock when no hook is set
std::array<std::atomic<int>, kPoints> running{};        // calls in progress, per point
}  // namespace

void set(HookPoint point, HookFn fn) {
  std::lock_guard lock(mu);
  hooks[static_cast<size_t>(point)] = std::move(fn);
  armed_points[static_cast<size_t>(point)].store(true, std::memory_order_release);
}

void clear(HookPoint point) {
  const size_t i = static_cast<size_t>(point);
  {
    std::lock_guard lock(mu);
    armed_points[i].store(false, std::memory_order_release);
    hooks[i] = nullptr;
  }
  // A hook usually captures its test's objects: return only once no server
  // thread is still running it, so the test may destroy them.
  while (running[i].load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

void clear_all() {
  for (size_t i = 0; i < kPoints; ++i) clear(static_cast<HookPoint>(i));
}

bool armed(HookPoint point) { return armed_points[static_cast<size_t>(point)].load(std::memory_order_acquire); }

void fire(HookPoint point, HookContext& context) {
  const size_t i = static_cast<size_t>(point);
  if (!armed_points[i].load(std::memory_order_acquire)) return;
  HookFn fn;
  {
    std::lock_guard lock(mu);
    fn = hooks[i];
    if (fn) running[i].fetch_add(1, std::memory_order_acq_rel);
  }
  if (!fn) return;
  // A hook may throw (tests of exception handling): count it out either way.
  struct Running {
    std::atomic<int>& count;
    ~Running() { count.fetch_sub(1, std::memory_order_acq_rel); }
  } running_now{running[i]};
  fn(context);
}

}  // namespace faultline::test_hooks

#endif
