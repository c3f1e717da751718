// faultline-install-floor: what installing a scattered working set costs at
// the kernel level alone, next to what the File backend pays for the same
// pages. It answers "how close to a page-cache mapping can a uffd server get
// on this machine?" without any server in the way: no fault messages, no
// threads waiting, just UFFDIO_COPY into pages nobody touches yet.
//
// For N pages spread at random over a guest (the set of faultline-bench's
// scenario 2: 256 MiB of a 2 GiB guest by default) it times, in one run:
//   - UFFDIO_COPY of each page from a buffer that is already in memory;
//   - pread of the page from the memory file, then UFFDIO_COPY (what
//     faultline's prefetch does);
//   - UFFDIO_COPY straight from a read-only mapping of the memory file;
//   - the same split over 2 threads;
//   - reading each page once through the file mmap'ed MAP_PRIVATE (the
//     File backend: minor faults on a warm page cache).
// Contiguous pages of the set are still installed one page per ioctl: the
// point is the per-call cost. A figure, not a test.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "client/test_memory_file.h"
#include "client/touch.h"

namespace {

constexpr uint64_t kPage = 4096;

struct Guest {
  int uffd = -1;
  uint8_t* base = nullptr;
  uint64_t bytes = 0;
  ~Guest() {
    if (base) ::munmap(base, bytes);
    if (uffd >= 0) ::close(uffd);
  }
};

bool make_guest(Guest& g, uint64_t bytes) {
  g.bytes = bytes;
  g.uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (g.uffd < 0) return false;
  uffdio_api api{};
  api.api = UFFD_API;
  if (::ioctl(g.uffd, UFFDIO_API, &api) != 0) return false;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g.base = static_cast<uint8_t*>(p);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(g.base), bytes};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  return ::ioctl(g.uffd, UFFDIO_REGISTER, &reg) == 0;
}

bool copy_page(const Guest& g, uint64_t offset, const void* src) {
  uffdio_copy c{};
  c.dst = reinterpret_cast<uint64_t>(g.base + offset);
  c.src = reinterpret_cast<uint64_t>(src);
  c.len = kPage;
  return ::ioctl(g.uffd, UFFDIO_COPY, &c) == 0;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faultline-install-floor: the kernel cost of installing a scattered working set with UFFDIO_COPY, "
               "next to the File backend's page-cache mapping"};
  uint64_t guest_mib = 2048, set_mib = 256;
  app.add_option("--guest-mib", guest_mib, "guest (and memory file) size in MiB (default 2048)");
  app.add_option("--set-mib", set_mib, "working set in MiB, pages at random over the guest (default 256)");
  CLI11_PARSE(app, argc, argv);
  const uint64_t guest = guest_mib << 20;
  if (set_mib == 0 || set_mib > guest_mib) {
    std::fprintf(stderr, "--set-mib must be between 1 and --guest-mib\n");
    return 2;
  }

  char tmpl[] = "/tmp/faultline-floor-XXXXXX";
  if (!::mkdtemp(tmpl)) return 1;
  const std::string dir = tmpl;
  const std::string file = dir + "/mem";
  auto cleanup = [&] { std::filesystem::remove_all(dir); };
  if (auto st = faultline::client::write_test_memory_file(file, guest, 7, 0.0); !st) {
    std::fprintf(stderr, "%s\n", st.error().describe().c_str());
    cleanup();
    return 1;
  }
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  auto* shared = static_cast<uint8_t*>(::mmap(nullptr, guest, PROT_READ, MAP_SHARED, fd, 0));
  auto* priv = static_cast<uint8_t*>(::mmap(nullptr, guest, PROT_READ, MAP_PRIVATE, fd, 0));
  if (fd < 0 || shared == MAP_FAILED || priv == MAP_FAILED) {
    std::perror("memory file");
    cleanup();
    return 1;
  }
  // Warm the page cache, as faultline-bench does.
  std::vector<uint8_t> chunk(1 << 20);
  for (uint64_t off = 0; off < guest; off += chunk.size()) (void)!::pread(fd, chunk.data(), chunk.size(), static_cast<off_t>(off));

  std::vector<uint64_t> set = faultline::client::select_pages(guest / kPage, kPage,
                                                              static_cast<double>(set_mib) / static_cast<double>(guest_mib),
                                                              faultline::client::PageOrder::kRandom, 11);
  std::vector<uint64_t> sorted = set;
  std::sort(sorted.begin(), sorted.end());
  const double n = static_cast<double>(sorted.size());
  std::printf("%zu pages (%llu MiB) at random over a %llu MiB guest; one UFFDIO_COPY per page\n\n", sorted.size(),
              static_cast<unsigned long long>(set_mib), static_cast<unsigned long long>(guest_mib));
  std::printf("%-44s %10s %10s %10s\n", "method", "ms", "us/page", "x file");

  // The File backend: first read of each page through a MAP_PRIVATE mapping.
  auto t0 = std::chrono::steady_clock::now();
  uint64_t sink = 0;
  for (uint64_t off : set) sink += *reinterpret_cast<volatile const uint64_t*>(priv + off);
  const double file_ms = ms_since(t0);
  asm volatile("" ::"r"(sink));

  struct Method {
    const char* name;
    int threads;
    std::function<bool(const Guest&, uint64_t, uint8_t*)> install;
  };
  const std::vector<Method> methods{
      {"UFFDIO_COPY from a buffer in memory", 1, [](const Guest& g, uint64_t off, uint8_t* buf) { return copy_page(g, off, buf); }},
      {"pread + UFFDIO_COPY (faultline's prefetch)", 1,
       [fd](const Guest& g, uint64_t off, uint8_t* buf) {
         return ::pread(fd, buf, kPage, static_cast<off_t>(off)) == static_cast<ssize_t>(kPage) && copy_page(g, off, buf);
       }},
      {"UFFDIO_COPY from the file mapping", 1, [shared](const Guest& g, uint64_t off, uint8_t*) { return copy_page(g, off, shared + off); }},
      {"pread + UFFDIO_COPY, 2 threads", 2,
       [fd](const Guest& g, uint64_t off, uint8_t* buf) {
         return ::pread(fd, buf, kPage, static_cast<off_t>(off)) == static_cast<ssize_t>(kPage) && copy_page(g, off, buf);
       }},
      {"UFFDIO_COPY from the file mapping, 2 threads", 2,
       [shared](const Guest& g, uint64_t off, uint8_t*) { return copy_page(g, off, shared + off); }},
  };
  int rc = 0;
  for (const Method& m : methods) {
    Guest g;
    if (!make_guest(g, guest)) {
      std::perror("userfaultfd guest");
      rc = 1;
      break;
    }
    std::vector<std::thread> pool;
    std::atomic<bool> ok{true};
    t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < m.threads; ++t) {
      pool.emplace_back([&, t] {
        auto* buf = static_cast<uint8_t*>(std::aligned_alloc(kPage, kPage));
        std::memset(buf, 1, kPage);
        const size_t b = sorted.size() * static_cast<size_t>(t) / static_cast<size_t>(m.threads);
        const size_t e = sorted.size() * static_cast<size_t>(t + 1) / static_cast<size_t>(m.threads);
        for (size_t i = b; i < e; ++i) {
          if (!m.install(g, sorted[i], buf)) ok = false;
        }
        std::free(buf);
      });
    }
    for (auto& th : pool) th.join();
    const double ms = ms_since(t0);
    if (!ok) {
      std::fprintf(stderr, "%s: an install failed: %s\n", m.name, std::strerror(errno));
      rc = 1;
    }
    std::printf("%-44s %10.1f %10.2f %10.2f\n", m.name, ms, ms * 1000 / n, ms / file_ms);
  }
  std::printf("%-44s %10.1f %10.2f %10.2f\n", "file mmap MAP_PRIVATE, first read (File backend)", file_ms,
              file_ms * 1000 / n, 1.0);
  ::munmap(shared, guest);
  ::munmap(priv, guest);
  ::close(fd);
  cleanup();
  return rc;
}
