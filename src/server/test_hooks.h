// Test-only hook points inside the server.
//
// A test names a point (before an install ioctl, before the reader's read())
// and installs a callback there; the server thread that reaches the point
// runs it, so a test can park a worker at an exact step until it releases it
// and force an interleaving that timing alone would almost never produce.
// A hook may also throw, to prove that an exception on a session thread ends
// that session cleanly.
//
// Compiled only with FAULTLINE_TEST_HOOKS (on for test builds, off for
// Release): without it FAULTLINE_HOOK expands to nothing and release builds
// carry no hooks.
//
// Thread-safety: set()/clear() from any thread; fire() from server threads.
#pragma once

#include <cstdint>
#include <functional>

namespace faultline {

enum class HookPoint {
  kReaderBeforeRead,        // event reader, before it reads a batch from the uffd
  kBeforeInstallIoctl,      // worker, before an install ioctl for a fault (page staged, fence not yet entered)
  kBeforePrefaultInstall,   // prefault, before its install ioctl
  kBeforeReadaheadInstall,  // worker, before a fault-around readahead's install (pages staged, fence not yet entered)
  kServerBeforeRefuse,      // accept thread, before it drains a connection it refuses (address = the fd)
  kMetricsCollect,          // a scrape, reading a live session's counts (registry lock held)
  kBeforeMetricsFold,       // a session's end, final counts taken, before they are folded into the registry
  kSessionSetup,            // Session::start, before each step that can fail (`what` names it)
  kSourceRead,              // worker or prefault, before a read of snapshot bytes (address = file offset)
  kServerBeforePublish,  // connection thread, session started (serving), before the server lists it (address = session
                         // id)
  kLookupWaitsForStart,  // a session lookup (control), about to wait for a session mid-start (address = id, 0: any)
  kControlBeforeAccept,  // control thread, its poll saw the listener readable, before it accepts
  kControlAfterAccept,   // control thread, after its accept (address = 1 when it took a connection to serve)
  kBeforeShedAccept,  // accept_or_shed, out of fds, reserve fd closed, before the accept that sheds (address = listener
                      // fd)
  kCount,
};

struct HookContext {
  uint64_t address = 0;     // page address, when the point concerns one page
  uint64_t page_index = 0;  // global page index
  // Install points only: a hook may set an errno here to make the install
  // report that failure without issuing the ioctl (fault injection).
  // kSourceRead: the read fails with this errno, retryable when it is EAGAIN
  // (as a store that timed out), final otherwise.
  // kSessionSetup: the step fails as the real call would with this errno
  // (an eventfd returns -1, an allocation returns null or throws
  // std::bad_alloc, a thread throws std::system_error).
  int inject_errno = 0;
  // kSessionSetup: which step ("stop eventfd", "finished eventfd",
  // "page-state table", "zero page", "worker page buffer", "worker thread",
  // "reader thread", "prefetch thread").
  const char* what = "";
};

}  // namespace faultline

#ifdef FAULTLINE_TEST_HOOKS

namespace faultline::test_hooks {
using HookFn = std::function<void(HookContext&)>;
void set(HookPoint point, HookFn fn);
void clear(HookPoint point);
void clear_all();
void fire(HookPoint point, HookContext& context);
bool armed(HookPoint point);
}  // namespace faultline::test_hooks

// Whether a test has a hook at `point` (always false without hooks).
#define FAULTLINE_HOOK_ARMED(point) ::faultline::test_hooks::armed(point)

// Runs the hook at `point` with `context` (a HookContext lvalue it may modify).
#define FAULTLINE_HOOK(point, context) ::faultline::test_hooks::fire(point, context)

#else

#define FAULTLINE_HOOK(point, context) ((void)(context))
#define FAULTLINE_HOOK_ARMED(point) false

#endif
