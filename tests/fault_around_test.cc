// Fault-around end to end (issue 10): a demand fault installs its page and a
// window of untouched neighbours in one UFFDIO_COPY. Every byte the guest
// reads is checked against the memory file (or zero after a REMOVE), the
// pagemap says which pages were installed and with which WP bit, and the
// session's counters say how many pages went ahead.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <future>
#include <iterator>
#include <thread>

#include "client/firecracker_client.h"
#include "client/restore_scenario.h"
#include "harness.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "kernel/process.h"
#include "server/test_hooks.h"

namespace faultline::testing {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kPresent = 1ull << 63;
constexpr uint64_t kUffdWp = 1ull << 57;

ServerHarness::Options with_fault_around(uint32_t pages = 64) {
  ServerHarness::Options o;
  o.configure = [pages](ServerConfig& c, const TempDir&) { c.fault_around_pages = pages; };
  return o;
}

// Pagemap entries of this process for `count` guest pages from `first`.
std::vector<uint64_t> pagemap(const client::FirecrackerClient& c, uint64_t first, size_t count) {
  auto m = kernel::read_pagemap(::getpid(), reinterpret_cast<uint64_t>(c.guest_ptr(first * kPage)), count);
  EXPECT_TRUE(m) << m.error().describe();
  return m ? *m : std::vector<uint64_t>(count, 0);
}

// Reads one byte of each page in order (a guest walking memory).
uint64_t read_pages(const client::FirecrackerClient& c, uint64_t first, uint64_t count) {
  uint64_t sum = 0;
  for (uint64_t p = first; p < first + count; ++p) sum += *reinterpret_cast<volatile uint8_t*>(c.guest_ptr(p * kPage));
  return sum;
}

void expect_page_is(const client::FirecrackerClient& c, const FileView& file, uint64_t page) {
  ASSERT_NE(file.data(), nullptr);
  EXPECT_EQ(std::memcmp(c.guest_ptr(page * kPage), file.data() + page * kPage, kPage), 0) << "page " << page;
}

void expect_page_zero(const client::FirecrackerClient& c, uint64_t page) {
  static const std::vector<uint8_t> zeros(kPage, 0);
  EXPECT_EQ(std::memcmp(c.guest_ptr(page * kPage), zeros.data(), kPage), 0) << "page " << page;
}

// The harness's one live session, once the client's handshake made it
// (null if none came within wait_until's bound).
std::shared_ptr<Session> live_session(ServerHarness& h) {
  if (!wait_until([&] { return !h.server().live_sessions().empty(); })) return nullptr;
  return h.server().session(h.server().live_sessions().at(0).id);
}

TEST(FaultAroundServe, ASequentialRestoreTakesAFractionOfTheFaultsAndEveryByteIsRight) {
  ServerHarness h(with_fault_around());
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.order = client::PageOrder::kSequential;
  o.threads = 2;  // two streams
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  ASSERT_TRUE(h.wait_ended(1));
  const auto s = h.server().finished_sessions().at(0).counters;
  const uint64_t pages = 64 * kMiB / kPage;
  // Windows grow to 64 pages: a sequential walk faults a few times per 256 KiB.
  EXPECT_LT(s.faults, pages / 8) << "faults " << s.faults;
  EXPECT_GT(s.ahead_pages, pages / 2);
  EXPECT_LE(s.ahead_pages, s.pages_snapshot);
  EXPECT_EQ(s.ahead_faulted, 0u) << "no WP registration: nothing can fault on a present page";
}

TEST(FaultAroundServe, ARandomRestoreShrinksTheWindowAndEveryByteIsRight) {
  ServerHarness h(with_fault_around());
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.order = client::PageOrder::kRandom;
  o.touch_fraction = 0.25;
  o.threads = 2;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  ASSERT_TRUE(h.wait_ended(1));
  const auto s = h.server().finished_sessions().at(0).counters;
  // Random faults continue no stream and land next to nothing installed: the
  // starting window falls to one page within a few dozen faults.
  EXPECT_LT(s.ahead_pages, s.faults / 10) << "ahead " << s.ahead_pages << " of " << s.faults << " faults";
}

// A 2 MiB guest is unchanged: one page is already 2 MiB, so no window is
// ever wider than the faulting page, with writes and REMOVEs in the restore.
TEST(FaultAroundServe, HugePageGuestsInstallOnlyTheFaultingPageAndEveryByteIsRight) {
  HugePageReservation reservation(40);
  FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation.ok(), reservation.reason());
  ServerHarness h(with_fault_around());
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.huge_pages = true;
  o.order = client::PageOrder::kSequential;
  o.threads = 2;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->page_size, 2 * kMiB);
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  EXPECT_GT(r->pages_removed, 0u);
  ASSERT_TRUE(h.wait_ended(1));
  const auto s = h.server().finished_sessions().at(0).counters;
  EXPECT_EQ(s.ahead_pages, 0u);
  EXPECT_GT(s.faults, 0u);
  // Every page installed was installed for a fault of its own (or lost an
  // EEXIST race to one): none went ahead.
  EXPECT_LE(s.pages_snapshot + s.pages_zero, s.faults);
}

// Frame boundaries of the harness's image: for each frame after the first,
// its first guest page (the first stored page that lies in it), with the
// last stored page before it (in the frame before).
struct FrameEdge {
  uint64_t last_before = 0;
  uint64_t first = 0;
};
std::vector<FrameEdge> frame_edges(ServerHarness& h) {
  auto store = image::LocalStore::open(h.dir().file("store"), false);
  EXPECT_TRUE(store);
  if (!store) return {};
  auto chain = image::ImageChain::open(**store, "base");
  EXPECT_TRUE(chain);
  if (!chain) return {};
  std::vector<FrameEdge> edges;
  uint64_t last_stored = 0;
  bool any = false;
  for (uint64_t p = 0; p < chain->guest_pages(); ++p) {
    const image::PageLocation loc = chain->locate(p);
    if (loc.zero) continue;
    if (any && loc.frame != chain->locate(last_stored).frame) edges.push_back({last_stored, p});
    last_stored = p;
    any = true;
  }
  return edges;
}

// With an image, a fault's window never waits for the load of a frame other
// than its own page's: it ends where a frame not in memory begins, and
// runs on over one that is (PageSource::read_window).
TEST(FaultAroundServe, AnImagesWindowEndsAtAFrameNotInMemoryAndRunsOnOverOneThatIs) {
  ServerHarness::Options o = with_fault_around();
  o.serve_image = true;
  ServerHarness h(o);
  const FileView file(h.memory());
  // Two frame edges inside a 64 KiB block (a fresh session's first window is
  // the rest of its fault's 16-page block), the fault's page in the frame
  // before, far enough apart to share no frame.
  std::vector<FrameEdge> inside;
  for (const FrameEdge& e : frame_edges(h)) {
    if (e.first % 16 != 0 && e.last_before / 16 == e.first / 16 &&
        (inside.empty() || e.first > inside.back().first + 1024)) {
      inside.push_back(e);
    }
  }
  ASSERT_GE(inside.size(), 3u) << "the test image has too few frame edges inside a 64 KiB block";
  const auto misses = [&] { return h.server().metrics().snapshot().frame_cache->misses; };

  // 1. The next frame is not in memory: the window stops before it.
  const FrameEdge cold = inside[0];
  {
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
    ASSERT_TRUE(c) << c.error().describe();
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    (void)read_pages(*c, cold.last_before, 1);
    EXPECT_EQ(misses(), 1u) << "a frame was loaded for the neighbours";
    const uint64_t block_end = (cold.first / 16 + 1) * 16;
    const auto m = pagemap(*c, cold.last_before, block_end - cold.last_before);
    for (uint64_t p = cold.last_before; p < block_end; ++p) {
      EXPECT_EQ((m[p - cold.last_before] & kPresent) != 0, p < cold.first) << "page " << p;
    }
    expect_page_is(*c, file, cold.last_before);
    // The next frame's first page faults on its own and loads it.
    (void)read_pages(*c, cold.first, 1);
    EXPECT_EQ(misses(), 2u);
    for (uint64_t p = cold.last_before; p < block_end; ++p) expect_page_is(*c, file, p);
  }
  // 2. Another VM finds the frame after its fault's frame in memory (a first
  // VM loaded it): its window runs over the edge to the end of the block.
  const FrameEdge warm = inside[2];
  {
    auto first_vm = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
    ASSERT_TRUE(first_vm) << first_vm.error().describe();
    ASSERT_TRUE(first_vm->connect_and_send(h.socket()));
    (void)read_pages(*first_vm, warm.first, 1);
    const uint64_t loaded = misses();
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
    ASSERT_TRUE(c) << c.error().describe();
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    (void)read_pages(*c, warm.last_before, 1);
    EXPECT_EQ(misses(), loaded + 1) << "only the fault's own frame was loaded";
    const uint64_t block_end = (warm.first / 16 + 1) * 16;
    const auto m = pagemap(*c, warm.last_before, block_end - warm.last_before);
    for (uint64_t p = warm.last_before; p < block_end; ++p) {
      EXPECT_TRUE(m[p - warm.last_before] & kPresent) << "page " << p;
      expect_page_is(*c, file, p);
    }
  }
}

TEST(FaultAroundServe, OffInstallsOnlyTheFaultingPage) {
  ServerHarness h(with_fault_around(1));
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  (void)read_pages(*c, 100, 1);
  const auto m = pagemap(*c, 100, 2);
  EXPECT_TRUE(m[0] & kPresent);
  EXPECT_FALSE(m[1] & kPresent);
}

// A region whose memory is two VMAs (here: MADV_DONTFORK on part of it; also
// a region registered in part, an mprotect of part of it): a window across
// the boundary fails whole with ENOENT. The faulting page is then installed
// alone; it used to be only woken, and its thread faulted into the same
// window forever (found by review: 2-7 of 16 pages read in 5 s, 290 000
// faults).
TEST(FaultAroundServe, AWindowAcrossTwoVmasOfARegionStillServesEveryPage) {
  ServerHarness h(with_fault_around());
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_EQ(::madvise(c->guest_ptr(6 * kPage), 64 * kMiB - 6 * kPage, MADV_DONTFORK), 0);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  std::atomic<uint64_t> read{0};
  auto reader = std::async(std::launch::async, [&] {
    for (uint64_t p = 0; p < 16; ++p) {
      (void)read_pages(*c, p, 1);
      read.store(p + 1);
    }
  });
  const bool all_read = wait_until([&] { return read.load() == 16; });
  EXPECT_TRUE(all_read) << read.load() << " of 16 pages read";
  if (!all_read) h.stop();  // the session's end releases the thread
  reader.get();
  if (!all_read) return;
  for (uint64_t p = 0; p < 16; ++p) expect_page_is(*c, file, p);
  auto session = live_session(h);
  ASSERT_NE(session, nullptr);
  EXPECT_LE(session->summary().counters.faults, 16u) << "one fault per page at most";
}

TEST(FaultAroundServe, AWindowEndsAtTheBlockAndStopsAtRemovedAndPresentPages) {
  ServerHarness h(with_fault_around());
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  // A first fault at page 35 installs 35..47: the rest of its 64 KiB block.
  (void)read_pages(*c, 35, 1);
  auto m = pagemap(*c, 32, 20);
  for (uint64_t p = 32; p < 52; ++p) {
    EXPECT_EQ((m[p - 32] & kPresent) != 0, p >= 35 && p < 48) << "page " << p;
  }
  for (uint64_t p = 35; p < 48; ++p) expect_page_is(*c, file, p);
  // Pages 4100-4101 were removed before anything touched them (they serve
  // zero from now on), page 4104 the guest has already: a window from 4096
  // stops at the first of them.
  ASSERT_TRUE(c->remove(4100 * kPage, 2 * kPage));
  (void)read_pages(*c, 4104, 1);
  (void)read_pages(*c, 4096, 1);
  m = pagemap(*c, 4096, 12);
  for (uint64_t p = 4096; p < 4108; ++p) {
    EXPECT_EQ((m[p - 4096] & kPresent) != 0, p < 4100 || p >= 4104) << "page " << p;
  }
  expect_page_zero(*c, 4100);
  expect_page_zero(*c, 4101);
  for (uint64_t p : {4096u, 4099u, 4102u, 4103u, 4104u, 4110u}) expect_page_is(*c, file, p);
}

TEST(FaultAroundServe, ARemoveReadWhileTheWindowWasStagedCutsTheWindowBeforeTheRemovedPage) {
  // The window's bytes are read before the install fence; a REMOVE of one of
  // its pages read in between must cut the run there: those bytes are stale.
  ServerHarness::Options ho = with_fault_around();
  ho.reader_serves_cached = false;  // the fault goes through a worker, where the hook is
  ServerHarness h(ho);
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  std::atomic<bool> fired{false};
  test_hooks::set(HookPoint::kBeforeInstallIoctl, [&](HookContext& ctx) {
    if (ctx.page_index != 8192 || fired.exchange(true)) return;
    // Staged, fence not entered: the REMOVE is read and recorded now (the
    // madvise returns only after the reader read its event).
    auto removed = std::async(std::launch::async, [&] { return c->remove(8197 * kPage, kPage); }).get();
    EXPECT_TRUE(removed) << removed.error().describe();
  });
  (void)read_pages(*c, 8192, 1);
  test_hooks::clear(HookPoint::kBeforeInstallIoctl);
  ASSERT_TRUE(fired);
  const auto m = pagemap(*c, 8192, 16);
  for (uint64_t p = 8192; p < 8208; ++p) {
    EXPECT_EQ((m[p - 8192] & kPresent) != 0, p < 8197) << "page " << p;
  }
  expect_page_zero(*c, 8197);
  for (uint64_t p : {8192u, 8196u, 8198u, 8207u}) expect_page_is(*c, file, p);
}

TEST(FaultAroundServe, UnderWpNeighboursAreInstalledWriteProtectedAndOnlyWrittenPagesAreDirty) {
  ServerHarness h(with_fault_around());
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}, .wp_async = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  // A read fault at 0 (window 0..15, all protected), then a write fault at
  // 32 (its own page unprotected and dirty, 33..47 protected), then a write
  // to 5, a page installed ahead (WP_ASYNC: the kernel unprotects it).
  auto session = live_session(h);
  ASSERT_TRUE(session);
  (void)read_pages(*c, 0, 1);
  *reinterpret_cast<volatile uint8_t*>(c->guest_ptr(32 * kPage)) = 0xa5;
  // The writer was woken as soon as its own page was in; the neighbours are
  // copied after that: wait until they are counted (they are present then).
  ASSERT_TRUE(wait_until([&] { return session->summary().counters.ahead_pages == 15u + 15u; }))
      << "ahead " << session->summary().counters.ahead_pages;
  *reinterpret_cast<volatile uint8_t*>(c->guest_ptr(5 * kPage)) = 0x5a;
  const auto m = pagemap(*c, 0, 48);
  for (uint64_t p = 0; p < 48; ++p) {
    const bool present = p < 16 || p >= 32;
    EXPECT_EQ((m[p] & kPresent) != 0, present) << "page " << p;
    if (present) {
      EXPECT_EQ((m[p] & kUffdWp) != 0, p != 5 && p != 32) << "page " << p;
    }
  }
  for (uint64_t p : {0u, 15u, 33u, 47u}) expect_page_is(*c, file, p);
  auto map = session->page_map();
  ASSERT_TRUE(map) << map.error().describe();
  EXPECT_EQ(map->dirty, (std::vector<FileRange>{{5 * kPage, kPage}, {32 * kPage, kPage}}));
  const auto s = session->summary().counters;
  EXPECT_EQ(s.ahead_pages, 15u + 15u);
}

// Readahead: a fault that continues a stream at full speed (64-page windows)
// has the stream's next window installed by a worker after the fault is
// served, while the guest runs on.
ServerHarness::Options with_readahead() {
  ServerHarness::Options o;
  o.configure = [](ServerConfig& c, const TempDir&) {
    c.fault_around_pages = 64;
    c.fault_around_readahead = true;
  };
  return o;
}

// Faults a stream from `first` up to full speed: windows of 16, 16, 32 pages
// (first must be a multiple of 64), then a full window at first + 64.
void fault_stream_to_full_speed(const client::FirecrackerClient& c, uint64_t first) {
  for (uint64_t p : {first, first + 16, first + 32, first + 64}) (void)read_pages(c, p, 1);
}

TEST(FaultAroundServe, AStreamAtFullSpeedHasItsNextWindowReadAheadWriteProtectedAndFaultsPastIt) {
  ServerHarness h(with_readahead());
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}, .wp_async = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto session = live_session(h);
  ASSERT_TRUE(session);
  // 1024..1039, 1040..1055, 1056..1087, then 1088..1151 with 1152..1215
  // read ahead.
  fault_stream_to_full_speed(*c, 1024);
  ASSERT_TRUE(wait_until([&] { return session->summary().counters.ahead_pages == 15u + 15u + 31u + 63u + 64u; }))
      << "ahead " << session->summary().counters.ahead_pages;
  auto m = pagemap(*c, 1024, 200);
  for (uint64_t p = 1024; p < 1224; ++p) {
    EXPECT_EQ((m[p - 1024] & kPresent) != 0, p < 1216) << "page " << p;
    if (p < 1216) {
      EXPECT_TRUE(m[p - 1024] & kUffdWp) << "page " << p << ": installed for a read, write-protected";
    }
  }
  // The guest walks the read-ahead pages without a fault, every byte the file's.
  (void)read_pages(*c, 1089, 127);
  for (uint64_t p : {1152u, 1180u, 1215u}) expect_page_is(*c, file, p);
  EXPECT_EQ(session->summary().counters.faults, 4u);
  // 1216, the end of the readahead, continues the stream: 64 pages now and
  // 64 more read ahead.
  (void)read_pages(*c, 1216, 1);
  ASSERT_TRUE(wait_until([&] { return session->summary().counters.ahead_pages == 188u + 63u + 64u; }))
      << "ahead " << session->summary().counters.ahead_pages;
  m = pagemap(*c, 1216, 136);
  for (uint64_t p = 1216; p < 1352; ++p) EXPECT_EQ((m[p - 1216] & kPresent) != 0, p < 1344) << "page " << p;
  (void)read_pages(*c, 1217, 127);
  for (uint64_t p : {1279u, 1280u, 1343u}) expect_page_is(*c, file, p);
  EXPECT_EQ(session->summary().counters.faults, 5u);
  // Only the guest's write makes a page dirty, read ahead or not.
  *reinterpret_cast<volatile uint8_t*>(c->guest_ptr(1300 * kPage)) = 0x77;
  auto map = session->page_map();
  ASSERT_TRUE(map) << map.error().describe();
  EXPECT_EQ(map->dirty, (std::vector<FileRange>{{1300 * kPage, kPage}}));
}

TEST(FaultAroundServe, ReadaheadOffInstallsOnlyTheWindows) {
  ServerHarness h(with_fault_around());  // ServerConfig's default: no readahead
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  fault_stream_to_full_speed(*c, 1024);
  const auto m = pagemap(*c, 1024, 192);
  for (uint64_t p = 1024; p < 1216; ++p) EXPECT_EQ((m[p - 1024] & kPresent) != 0, p < 1152) << "page " << p;
}

TEST(FaultAroundServe, ARemoveReadWhileAReadaheadWasStagedCutsItBeforeTheRemovedPage) {
  // A readahead's bytes are read before the install fence, as a window's; a
  // REMOVE of one of its pages read in between must cut the run there.
  ServerHarness h(with_readahead());
  const FileView file(h.memory());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto session = live_session(h);
  ASSERT_TRUE(session);
  std::atomic<bool> fired{false};
  test_hooks::set(HookPoint::kBeforeReadaheadInstall, [&](HookContext& ctx) {
    if (ctx.page_index != 2176 || fired.exchange(true)) return;
    // Staged (2176..2239), fence not entered: the REMOVE of 2186 is read and
    // recorded now (the madvise returns only after the reader read it).
    auto removed = std::async(std::launch::async, [&] { return c->remove(2186 * kPage, kPage); }).get();
    EXPECT_TRUE(removed) << removed.error().describe();
  });
  fault_stream_to_full_speed(*c, 2048);  // ..., 2112..2175, and 2176..2239 read ahead
  ASSERT_TRUE(wait_until([&] { return fired.load() && session->summary().counters.ahead_pages == 124u + 10u; }))
      << "ahead " << session->summary().counters.ahead_pages;
  test_hooks::clear(HookPoint::kBeforeReadaheadInstall);
  const auto m = pagemap(*c, 2176, 64);
  for (uint64_t p = 2176; p < 2240; ++p) EXPECT_EQ((m[p - 2176] & kPresent) != 0, p < 2186) << "page " << p;
  expect_page_zero(*c, 2186);
  for (uint64_t p : {2176u, 2185u, 2187u, 2239u}) expect_page_is(*c, file, p);
}

}  // namespace
}  // namespace faultline::testing
