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
// A CI whose hosts cannot have a capability may waive it explicitly, by name:
// FAULTLINE_CI_WAIVE=kvm (comma-separated). Its tests then skip with a reason
// that says so, scripts/test.sh counts and lists them apart, and every other
// skip still fails the stage. A waiver is a decision written in .ci/run, never
// a default.
//
// Capability names: "hugepages" (2 MiB hugetlb pages reserved through
// vm.nr_hugepages, which needs root), "kvm" (a usable /dev/kvm), "root"
// (other privileged setup, such as mounting a small tmpfs), "thp"
// (transparent huge pages not turned off: /sys/kernel/mm/transparent_hugepage/enabled),
// "direct-io" (/tmp on a disk-backed file system that takes O_DIRECT).
//
// Header-only, so that tests in tests/, client/ and client/kvm/ share it
// without a library dependency (includes are rooted at the repository).
#pragma once

#include <cstdlib>
#include <string>
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

// Whether FAULTLINE_CI_WAIVE names `capability`.
inline bool capability_waived(std::string_view capability) {
  const char* waive = std::getenv("FAULTLINE_CI_WAIVE");
  if (waive == nullptr) return false;
  std::string_view list(waive);
  while (!list.empty()) {
    const size_t comma = list.find(',');
    if (list.substr(0, comma) == capability) return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

// The words scripts/ctest_summary.awk looks for to count a skip as waived.
inline constexpr const char* kWaivedMarker = "(waived in CI by FAULTLINE_CI_WAIVE)";

}  // namespace faultline::testing

// Usable in a void function (a TEST body, SetUp()): returns from it, failing
// or skipping the test, when `available` is false. `capability` is one of the
// names above; `reason` is streamed, so it may be `"..." << value`. In SetUp()
// either outcome keeps the test body from running.
#define FAULTLINE_REQUIRE_CAPABILITY(capability, available, reason)                                        \
  do {                                                                                                    \
    if (!(available)) {                                                                                   \
      if (!::faultline::testing::capabilities_required()) {                                               \
        GTEST_SKIP() << "missing capability " capability ": " << reason;                                  \
      } else if (::faultline::testing::capability_waived(capability)) {                                   \
        GTEST_SKIP() << "missing capability " capability " " << ::faultline::testing::kWaivedMarker << ": " \
                     << reason;                                                                           \
      } else {                                                                                            \
        GTEST_FAIL() << "missing capability " capability ", and CI=true makes that a failure: " << reason; \
      }                                                                                                   \
    }                                                                                                     \
  } while (0)
