// Reserves 2 MiB hugetlb pages (vm.nr_hugepages) for one test or run and
// gives them back when it ends. Needs root. Tests that use it take the
// `hugepages` ctest resource lock: concurrent raise/restore pairs would
// otherwise undo each other and leak pages.
//
// FAULTLINE_TEST_NO_HUGE_PAGES=1 in the environment makes every reservation
// fail without touching vm.nr_hugepages: it shows what the tests do on a host
// without huge pages (skip with the reason; fail under CI=true).
#pragma once

#include <cstdlib>
#include <fstream>
#include <string>

namespace faultline::client {

class HugePageReservation {
 public:
  explicit HugePageReservation(long extra) {
    if (const char* deny = std::getenv("FAULTLINE_TEST_NO_HUGE_PAGES"); deny != nullptr && std::string(deny) == "1") {
      reason_ = "FAULTLINE_TEST_NO_HUGE_PAGES=1 denies every 2 MiB huge page reservation";
      return;
    }
    std::ifstream in(kPath);
    if (!(in >> old_)) {
      reason_ = std::string("cannot read ") + kPath;
      return;
    }
    if (!(std::ofstream(kPath) << old_ + extra << "\n")) {
      reason_ = std::string("cannot write ") + kPath + " (raising it needs root)";
      return;
    }
    long now = -1;
    std::ifstream(kPath) >> now;
    ok_ = now >= old_ + extra;
    if (!ok_) {
      reason_ = "could not reserve " + std::to_string(extra) + " 2 MiB huge pages: vm.nr_hugepages went from " +
                std::to_string(old_) + " to " + std::to_string(now) + ", not " + std::to_string(old_ + extra) +
                " (not enough free contiguous memory)";
    }
  }
  ~HugePageReservation() {
    if (old_ >= 0) std::ofstream(kPath) << old_ << "\n";
  }
  HugePageReservation(const HugePageReservation&) = delete;
  HugePageReservation& operator=(const HugePageReservation&) = delete;
  // False when the kernel could not find that many free 2 MiB pages.
  bool ok() const { return ok_; }
  // Why ok() is false ("" when it is true).
  const std::string& reason() const { return reason_; }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  long old_ = -1;
  bool ok_ = false;
  std::string reason_;
};

}  // namespace faultline::client
