// with_no_free_fd(): runs a call with the process's fd table full, as a busy
// daemon's may be for a moment, so that whatever the call opens fails with
// EMFILE. RLIMIT_NOFILE is lowered to 256 and every free slot below it
// taken; both are given back before it returns.
#pragma once

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <vector>

namespace faultline::testing {

template <typename F>
auto with_no_free_fd(F&& call) {
  rlimit old{};
  EXPECT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlimit low = old;
  low.rlim_cur = 256;
  EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> fillers;
  for (int fd; (fd = ::dup(0)) >= 0;) fillers.push_back(fd);
  auto result = call();
  for (int fd : fillers) ::close(fd);
  EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
  return result;
}

}  // namespace faultline::testing
