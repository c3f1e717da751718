// Reserves 2 MiB hugetlb pages (vm.nr_hugepages) for one test or run and
// gives them back when it ends. Needs root. Tests that use it take the
// `hugepages` ctest resource lock: concurrent raise/restore pairs would
// otherwise undo each other and leak pages.
#pragma once

#include <fstream>

namespace faultline::client {

class HugePageReservation {
 public:
  explicit HugePageReservation(long extra) {
    std::ifstream in(kPath);
    if (!(in >> old_)) return;
    std::ofstream(kPath) << old_ + extra << "\n";
    long now = -1;
    std::ifstream(kPath) >> now;
    ok_ = now >= old_ + extra;
  }
  ~HugePageReservation() {
    if (old_ >= 0) std::ofstream(kPath) << old_ << "\n";
  }
  HugePageReservation(const HugePageReservation&) = delete;
  HugePageReservation& operator=(const HugePageReservation&) = delete;
  // False when the kernel could not find that many free 2 MiB pages.
  bool ok() const { return ok_; }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  long old_ = -1;
  bool ok_ = false;
};

}  // namespace faultline::client
