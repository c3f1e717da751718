// Helpers shared by the files that implement Session (session.cc,
// session_prefetch.cc): thread creation and naming, and the setup-step test
// hook. Not a public interface.
#pragma once

#include <pthread.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "server/test_hooks.h"

namespace faultline::session_detail {

// Threads are named (fl-r<session>, fl-w<session>.<n>, fl-p<session>[.<n>])
// so that top, perf and gdb can tell them apart; Linux keeps 15 characters.
inline void name_this_thread(const std::string& name) { ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str()); }

inline std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Runs the test hook of a setup step (kSessionSetup) and returns the errno it
// injects, 0 for none (always 0 without test hooks).
inline int injected_setup_failure(const char* what) {
  HookContext hook;
  hook.what = what;
  FAULTLINE_HOOK(HookPoint::kSessionSetup, hook);
  return hook.inject_errno;
}

// A thread; throws std::system_error when it cannot be created (as
// std::thread does on EAGAIN), so that a test can inject exactly that.
template <typename F>
std::thread start_thread(const char* what, F&& body) {
  if (const int injected = injected_setup_failure(what); injected != 0) {
    throw std::system_error(injected, std::generic_category(), "creating a thread");
  }
  return std::thread(std::forward<F>(body));
}


}  // namespace faultline::session_detail
