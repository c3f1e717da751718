// End-to-end: a Firecracker-faithful client restores guest memory through an
// in-process faultline Server; every byte the guest reads is checked against
// the memory file (or zero after a REMOVE, or the client's own writes).
#include <sys/mman.h>
#include <sys/uio.h>

#include <atomic>
#include <barrier>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "client/firecracker_client.h"
#include "kernel/process.h"
#include "kernel/uffd_abi.h"
#include "client/restore_scenario.h"
#include "client/touch.h"
#include "client/vcpu_touch.h"
#include "client/verifier.h"
#include "harness.h"

namespace faultline::testing {
namespace {

using client::Access;
using client::FirecrackerClient;
using client::PageOrder;
using client::RestoreOptions;

RestoreOptions restore_options(const ServerHarness& h) {
  RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  return o;
}

void expect_clean(const Result<client::RestoreReport>& r) {
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  EXPECT_GT(r->pages_verified, 0u);
}

TEST(Serve, FirstTouchReadsAndWritesReturnSnapshotBytes) {
  ServerHarness h;
  RestoreOptions o = restore_options(h);
  o.remove_fraction = 0;
  auto r = client::run_restore(o);
  expect_clean(r);
  EXPECT_EQ(r->pages_touched, 64 * kMiB / 4096);
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed);  // v1.14 keeps its socket open until it exits
  EXPECT_EQ(s.counters.pages_snapshot, 64 * kMiB / 4096);
  EXPECT_EQ(s.counters.bytes_installed, 64 * kMiB);
  EXPECT_FALSE(s.write_protect);
}

// A large guest: 256 MiB, 64 MiB under ThreadSanitizer, where the two
// threads and the server's interleave the same way but every MiB the client
// verifies first touches 4 MiB of shadow memory (30 s in CI at 256 MiB).
#if defined(__SANITIZE_THREAD__)
constexpr uint64_t kLargeGuest = 64 * kMiB;
#else
constexpr uint64_t kLargeGuest = 256 * kMiB;
#endif

TEST(Serve, RandomTouchOfALargeGuestFromTwoThreads) {
  ServerHarness::Options ho;
  ho.memory_bytes = kLargeGuest;
  ho.reader_serves_cached = false;  // every fault through the workers
  ServerHarness h(ho);
  RestoreOptions o = restore_options(h);
  o.order = PageOrder::kRandom;
  o.threads = 2;
  o.remove_fraction = 0.02;
  expect_clean(client::run_restore(o));
}

// Makes every page of `path` (`bytes` long) readable with RWF_NOWAIT, as the
// reader reads, and keeps it so: the whole file is read (a page read by
// RWF_NOWAIT fails with EAGAIN while it carries a readahead mark, which a
// plain read clears) until a RWF_NOWAIT pass finds every page, then pinned
// with mlock so that reclaim cannot take a page back. Returns the pinned
// mapping (munmap it), MAP_FAILED after a test failure.
void* pin_in_page_cache(const std::string& path, size_t bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_TRUE(fd) << std::strerror(errno);
  if (!fd) return MAP_FAILED;
  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd.get(), 0);
  EXPECT_NE(map, MAP_FAILED) << std::strerror(errno);
  if (map == MAP_FAILED) return MAP_FAILED;
  EXPECT_EQ(::mlock(map, bytes), 0) << std::strerror(errno);
  std::vector<char> page(4096);
  size_t not_cached = 0;
  for (int pass = 0; pass < 10; ++pass) {
    not_cached = 0;
    for (size_t off = 0; off < bytes; off += page.size()) {
      iovec iov{page.data(), page.size()};
      if (::preadv2(fd.get(), &iov, 1, static_cast<off_t>(off), RWF_NOWAIT) == static_cast<ssize_t>(page.size())) {
        continue;
      }
      ++not_cached;
      EXPECT_EQ(::pread(fd.get(), page.data(), page.size(), static_cast<off_t>(off)),
                static_cast<ssize_t>(page.size()));
    }
    if (not_cached == 0) break;
  }
  EXPECT_EQ(not_cached, 0u) << "pages of " << path << " that RWF_NOWAIT cannot read after 10 passes";
  return map;
}

TEST(Serve, UncachedSnapshotPagesGoToWorkersAndCachedOnesAreServedByTheReader) {
  ServerHarness::Options ho;
  ho.memory_bytes = 64 * kMiB;
  ServerHarness h(ho);
  // The client verifies against a copy, so that only the server reads the
  // served file; then drop the served file from the page cache.
  const std::string copy = h.dir().file("mem.copy");
  std::filesystem::copy_file(h.memory(), copy);
  {
    int fd = ::open(h.memory().c_str(), O_RDONLY);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
  void* pinned = MAP_FAILED;
  for (int round = 0; round < 2; ++round) {
    if (round == 1) pinned = pin_in_page_cache(h.memory(), 64 * kMiB);
    auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    auto v = client::Verifier::open(copy, c->guest_size(), c->page_size());
    auto pages = client::select_pages(c->page_count(), 4096, 1.0, PageOrder::kRandom, 5);
    auto r = client::touch_pages(*c, **v, pages, Access::kRead);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->mismatches, 0u);
    c->close_socket();
    ASSERT_TRUE(h.wait_ended(round + 1));
  }
  auto s = h.server().finished_sessions();
  const uint64_t pages = 64 * kMiB / 4096;
  EXPECT_EQ(s.at(0).counters.pages_snapshot, pages);
  EXPECT_EQ(s.at(1).counters.pages_snapshot, pages);
  // Cold cache: storage reads went to the workers (readahead then warms
  // neighbours, which the reader serves). Warm cache: the reader served
  // them, all but a few at most: RWF_NOWAIT also fails with EAGAIN on a
  // resident page while the kernel holds its folio lock (migration,
  // compaction), and a worker then serves that page. CI under TSan saw 16
  // of 16384 pinned pages go to workers that way; a reader that served only
  // from a cold cache's readahead would serve far fewer.
  EXPECT_LT(s.at(0).counters.reader_served, pages);
  EXPECT_GE(s.at(1).counters.reader_served, pages - pages / 100);
  EXPECT_GT(s.at(1).counters.reader_served, s.at(0).counters.reader_served);
  if (pinned != MAP_FAILED) ::munmap(pinned, 64 * kMiB);
}

// The state letter and kernel wait channel of one of this process's threads,
// found by name (faultline names its threads fl-r<session>, fl-w...).
struct ThreadState {
  char state = '?';
  std::string wchan;
};
std::optional<ThreadState> thread_state(const std::string& name) {
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(e.path() / "comm");
    std::string c;
    std::getline(comm, c);
    if (c != name) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    std::getline(stat, line);
    ThreadState t;
    if (auto at = line.rfind(')'); at != std::string::npos && at + 2 < line.size()) t.state = line[at + 2];
    std::ifstream wchan(e.path() / "wchan");
    std::getline(wchan, t.wchan);
    return t;
  }
  return std::nullopt;
}

// Busy-polling: while faults keep coming the reader finds them without
// sleeping (counted), and once they stop it goes back to sleep in poll():
// an idle guest costs no CPU. Sampled from /proc: a busy-polling reader
// never sleeps, so it is never seen in state S.
void check_busy_poll(std::chrono::microseconds window, bool expect_polled_reads) {
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ho.busy_poll = window;
  ServerHarness h(ho);
  auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(v) << v.error().describe();
  auto pages = client::select_pages(c->page_count(), 4096, 1.0, PageOrder::kSequential, 5);
  auto r = client::touch_pages(*c, **v, pages, Access::kRead);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);

  const auto live = h.server().live_sessions();
  ASSERT_EQ(live.size(), 1u);
  const SessionSummary& s = live[0];
  EXPECT_EQ(s.counters.faults, c->page_count());
  if (expect_polled_reads) {
    EXPECT_GT(s.counters.busy_poll_reads, 0u);
  } else {
    EXPECT_EQ(s.counters.busy_poll_reads, 0u);
  }

  // No more faults: the reader must end up asleep in poll() and stay there.
  const std::string reader = "fl-r" + std::to_string(s.id);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool asleep = false;
  while (!asleep && std::chrono::steady_clock::now() < deadline) {
    auto t = thread_state(reader);
    ASSERT_TRUE(t) << "no thread named " << reader;
    asleep = t->state == 'S';
    if (!asleep) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(asleep) << "the reader never slept after the faults stopped";
  for (int i = 0; i < 50; ++i) {
    auto t = thread_state(reader);
    ASSERT_TRUE(t);
    // stat and wchan are two reads: a wchan of "0" (the kernel's "not
    // blocked right now") next to state S was seen once in CI. Read both again
    // a few times before judging; a reader that spins or sleeps elsewhere
    // still fails every time.
    for (int again = 0; again < 5 && t->wchan == "0"; ++again) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      t = thread_state(reader);
      ASSERT_TRUE(t);
    }
    EXPECT_EQ(t->state, 'S') << "sample " << i;
    EXPECT_NE(t->wchan.find("poll"), std::string::npos) << "waits in " << t->wchan << " (sample " << i << ")";
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
}

TEST(Serve, BusyPollingReaderReadsFaultsWithoutSleepingThenSleepsWhenIdle) {
  // A wide window, so that on a loaded machine too the next fault of the
  // sequential toucher comes within it.
  check_busy_poll(std::chrono::milliseconds(20), true);
}

TEST(Serve, BusyPollingOffReaderAlwaysSleeps) { check_busy_poll(std::chrono::microseconds(0), false); }

TEST(Serve, SequentialTouchOfALargeGuest) {
  ServerHarness::Options ho;
  ho.memory_bytes = kLargeGuest;
  ServerHarness h(ho);
  RestoreOptions o = restore_options(h);
  o.order = PageOrder::kSequential;
  o.threads = 1;
  o.write_fraction = 0;
  o.remove_fraction = 0;
  expect_clean(client::run_restore(o));
}

TEST(Serve, ManyThreadsFaultingTheSamePagesAreAllWoken) {
  ServerHarness h;
  auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(v);
  auto pages = client::select_pages(c->page_count(), c->page_size(), 0.01, PageOrder::kRandom, 3);
  auto r = client::touch_pages(*c, **v, pages, Access::kRead,
                               {.threads = 16, .sharing = client::ThreadSharing::kIdentical});
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_EQ(r->page_reads, pages.size() * 16);
}

TEST(Serve, EveryFirecrackerVersionHandshakeIsServed) {
  ServerHarness h;
  const client::FirecrackerVersion versions[] = {{1, 1},  {1, 5},  {1, 6},  {1, 7},  {1, 10}, {1, 11},
                                                 {1, 12}, {1, 13}, {1, 14}, {1, 15}, {1, 16}};
  for (const auto& ver : versions) {
    RestoreOptions o = restore_options(h);
    o.version = ver;
    o.touch_fraction = 0.05;
    o.threads = 1;
    expect_clean(client::run_restore(o));
  }
  // Versions before 1.12 close their socket right after sending, so their
  // sessions end only with the process or the server; newer ones end on EOF.
  ASSERT_TRUE(h.wait_ended(5));
  h.stop();
  auto ended = h.server().finished_sessions();
  ASSERT_EQ(ended.size(), std::size(versions));
  size_t on_eof = 0;
  for (const auto& s : ended) {
    EXPECT_NE(s.end, SessionEnd::kFatal) << s.error;
    on_eof += s.end == SessionEnd::kSocketClosed;
  }
  EXPECT_EQ(on_eof, 5u);  // 1.12 .. 1.16
}

TEST(Serve, HandshakeInPiecesAndFdFirstAreServed) {
  ServerHarness h;
  RestoreOptions o = restore_options(h);
  o.touch_fraction = 0.05;
  o.send_plan = client::SendPlan{{10, 40, 70}, 2, std::chrono::milliseconds(20)};
  expect_clean(client::run_restore(o));
  o.send_plan = client::SendPlan::fds_with_first_byte();
  expect_clean(client::run_restore(o));
}

TEST(Serve, MultiRegionLayoutServesEachRegionFromItsOffset) {
  ServerHarness::Options ho;
  ho.memory_bytes = 96 * kMiB;
  ServerHarness h(ho);
  RestoreOptions o = restore_options(h);
  o.region_sizes = {64 * kMiB, 20 * kMiB, 12 * kMiB};
  o.order = PageOrder::kRandom;
  expect_clean(client::run_restore(o));
}

TEST(Serve, RemoveThenTouchReadsZero) {
  ServerHarness h;
  auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(v);
  // Touch 64 pages (installed from the snapshot), remove 32 of them plus 32
  // never-touched ones, then read all: removed pages read zero, others snapshot.
  std::vector<uint64_t> first(64);
  for (size_t i = 0; i < first.size(); ++i) first[i] = i * 4096;
  ASSERT_TRUE(client::touch_pages(*c, **v, first, Access::kRead));
  auto removed = c->remove(32 * 4096, 64 * 4096);
  ASSERT_TRUE(removed) << removed.error().describe();
  for (uint64_t p = 32; p < 96; ++p) (*v)->record_removed(p * 4096);
  std::vector<uint64_t> all(128);
  for (size_t i = 0; i < all.size(); ++i) all[i] = i * 4096;
  auto r = client::touch_pages(*c, **v, all, Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
  for (uint64_t p = 32; p < 96; ++p) {
    const uint8_t* page = c->guest_ptr(p * 4096);
    for (size_t b = 0; b < 4096; ++b) ASSERT_EQ(page[b], 0) << "page " << p;
  }
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.counters.removes, 1u);
  EXPECT_EQ(s.counters.removed_pages, 64u);
  EXPECT_EQ(s.counters.pages_zero, 64u);
}

TEST(Serve, UnalignedRemoveKeepsPartialPages) {
  ServerHarness h;
  auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  std::vector<uint64_t> pages{0, 4096, 8192, 12288};
  ASSERT_TRUE(client::touch_pages(*c, **v, pages, Access::kRead));
  // [100, 3*4096+100): only pages 1 and 2 are whole inside.
  auto removed = c->remove(100, 3 * 4096);
  ASSERT_TRUE(removed);
  (*v)->record_removed(4096);
  (*v)->record_removed(8192);
  auto r = client::touch_pages(*c, **v, pages, Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
}

TEST(Serve, TwoVmsAtOnceOnOneDaemon) {
  ServerHarness::Options ho;
  ho.reader_serves_cached = false;  // every fault through the workers
  ServerHarness h(ho);
  RestoreOptions o = restore_options(h);
  o.order = PageOrder::kRandom;
  Result<client::RestoreReport> a, b;
  std::thread ta([&] { a = client::run_restore(o); });
  RestoreOptions o2 = o;
  o2.seed = 99;
  std::thread tb([&] { b = client::run_restore(o2); });
  ta.join();
  tb.join();
  expect_clean(a);
  expect_clean(b);
  ASSERT_TRUE(h.wait_ended(2));
}

TEST(Serve, KvmVcpusTouchingPagesAreServed) {
  FAULTLINE_REQUIRE_CAPABILITY("kvm", client::VcpuToucher::available(), "no usable /dev/kvm");
  ServerHarness h;
  RestoreOptions o = restore_options(h);
  o.threads = 1;
  o.kvm_vcpus = 2;
  o.touch_fraction = 0.1;
  o.order = PageOrder::kRandom;
  auto r = client::run_restore(o);
  expect_clean(r);
  EXPECT_GT(r->vcpu_pages, 0u);
}

TEST(Serve, KvmVcpusOnlyAcrossTwoRegions) {
  FAULTLINE_REQUIRE_CAPABILITY("kvm", client::VcpuToucher::available(), "no usable /dev/kvm");
  ServerHarness h;
  RestoreOptions o = restore_options(h);
  o.threads = 0;
  o.kvm_vcpus = 1;
  o.region_sizes = {48 * kMiB, 16 * kMiB};
  o.touch_fraction = 0.05;
  o.remove_fraction = 0.02;
  auto r = client::run_restore(o);
  expect_clean(r);
  EXPECT_GT(r->vcpu_pages, 0u);
}

TEST(Serve, WpAsyncClientGetsReadInstallsWriteProtected) {
  ServerHarness h;
  auto c = FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}, .wp_async = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  // Page 0 read only, page 1 written first, page 2 read then written.
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{0}, Access::kRead));
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{4096}, Access::kWrite));
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{8192}, Access::kReadThenWrite));
  auto pm = kernel::read_pagemap(::getpid(), reinterpret_cast<uint64_t>(c->guest_ptr(0)), 4);
  ASSERT_TRUE(pm);
  const auto& e = *pm;
  EXPECT_TRUE(e[0] & kPagemapPresent);
  EXPECT_TRUE(e[0] & kPagemapUffdWp) << "read install must be write-protected";
  EXPECT_TRUE(e[1] & kPagemapPresent);
  EXPECT_FALSE(e[1] & kPagemapUffdWp) << "write install must not be protected";
  EXPECT_TRUE(e[2] & kPagemapPresent);
  EXPECT_FALSE(e[2] & kPagemapUffdWp) << "WP_ASYNC clears the bit on the guest's write";
  EXPECT_FALSE(e[3] & kPagemapPresent);
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_TRUE(h.server().finished_sessions().at(0).write_protect);
}

}  // namespace
}  // namespace faultline::testing
