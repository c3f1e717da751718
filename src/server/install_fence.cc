#include "server/install_fence.h"

#include <sched.h>

namespace faultline {

void InstallFence::wait_while(const std::atomic<bool>& flag, bool value) {
  for (int spins = 0; flag.load(std::memory_order_seq_cst) == value; ++spins) {
    if (spins < 128) {
      __builtin_ia32_pause();
    } else {
      ::sched_yield();
    }
  }
}

}  // namespace faultline
