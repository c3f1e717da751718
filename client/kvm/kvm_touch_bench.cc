// Prints how fast one vCPU of a KvmGuest touches pages, so tests can be
// sized: on kvm_pvm the guest program runs in KVM's instruction emulator.
//
// Usage: kvm_touch_bench [pages]   (default 1000)
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <algorithm>

#include "client/kvm/kvm_guest.h"
#include "client/kvm/pattern_fault_server.h"
#include "common/mapping.h"

using faultline::Mapping;
using faultline::client::KvmGuest;
using faultline::client::VcpuAccess;

namespace {

constexpr uint64_t k4K = 4096;

int run(uint64_t pages, bool uffd, VcpuAccess access, const char* label) {
  auto mem = Mapping::map(pages * k4K, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  if (!mem) {
    std::fprintf(stderr, "%s\n", mem.error().describe().c_str());
    return 1;
  }
  faultline::client::testing::PatternFaultServer server;
  if (uffd) {
    auto started = server.start(mem->bytes(), mem->size());
    if (!started) {
      std::fprintf(stderr, "%s\n", started.error().describe().c_str());
      return 1;
    }
  } else {
    faultline::client::testing::fill_pattern(mem->bytes(), 0, mem->size());
  }
  auto guest = KvmGuest::create({{mem->bytes(), mem->size()}}, 1, k4K);
  if (!guest) {
    std::fprintf(stderr, "%s\n", guest.error().describe().c_str());
    return 1;
  }
  std::vector<uint64_t> offsets(pages);
  for (uint64_t i = 0; i < pages; ++i) offsets[i] = i * k4K;
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(1));

  auto start = std::chrono::steady_clock::now();
  auto r = guest->run_touch(0, offsets, access, 1);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  server.stop();
  if (!r) {
    std::fprintf(stderr, "%s\n", r.error().describe().c_str());
    return 1;
  }
  std::printf("%-34s %6llu pages  %8.2f ms  %9.0f pages/s  %7.1f us/page\n", label,
              static_cast<unsigned long long>(pages), seconds * 1e3, pages / seconds,
              seconds * 1e6 / pages);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t pages = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 1000;
  if (!KvmGuest::available()) {
    std::fprintf(stderr, "/dev/kvm absent\n");
    return 1;
  }
  int rc = 0;
  rc |= run(pages, false, VcpuAccess::kRead, "read, populated by host");
  rc |= run(pages, false, VcpuAccess::kWrite, "write, populated by host");
  rc |= run(pages, false, VcpuAccess::kReadThenWrite, "read+write, populated by host");
  rc |= run(pages, true, VcpuAccess::kRead, "read, every page via uffd");
  rc |= run(pages, true, VcpuAccess::kReadThenWrite, "read+write, every page via uffd");
  return rc;
}
