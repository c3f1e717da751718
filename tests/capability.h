// Host capabilities some tests need (2 MiB huge pages, /dev/kvm, root) and
// what a test does when one is missing.
//
// ctest counts a skipped test as passed, so a CI host that lost its huge pages
// or its /dev/kvm would pass while running none of the tests that need them.
// Every test that depends on a capability therefore checks it through
// FAULTLINE_REQUIRE_CAPABILITY:
//   - with CI=true in the environment (.ci/run exports it) a missing
//     capability FAILS the test, with the reason;
//   - otherwise (a developer's machine) the test is skipped, with the reason;
//     scripts/test.sh prints every skipped test and its reason at the end of
//     each stage.
// Header-only, so that tests in tests/, client/ and client/kvm/ share it
// without a library dependency (includes are rooted at the repository).
#pragma once

#include <cstdlib>
#include <string_view>

#include <gtest/gtest.h>

namespace faultline::testing {

// Whether this run must have every capability: CI=true (or 1), as CI systems set it.
inline bool capabilities_required() {
  const char* ci = std::getenv("CI");
  if (ci == nullptr) return false;
  const std::string_view v(ci);
  return v == "true" || v == "1";
}

}  // namespace faultline::testing

// Usable in a void function (a TEST body, SetUp()): returns from it, failing
// or skipping the test, when `available` is false. `reason` is streamed, so it
// may be `"..." << value`. In SetUp() either outcome keeps the body from running.
#define FAULTLINE_REQUIRE_CAPABILITY(available, reason)                                                    \
  do {                                                                                                    \
    if (!(available)) {                                                                                   \
      if (::faultline::testing::capabilities_required()) {                                                \
        GTEST_FAIL() << "missing capability, and CI=true makes that a failure: " << reason;             \
      } else {                                                                                            \
        GTEST_SKIP() << "missing capability: " << reason;                                                 \
      }                                                                                                   \
    }                                                                                                     \
  } while (0)
