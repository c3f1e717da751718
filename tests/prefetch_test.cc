// Record and replay of working sets, eager fill and the zero-page index,
// through the real server and the Firecracker-faithful client: every
// prefetched byte is checked, prefetch never revives a removed page or
// overwrites a written one, and damaged files are clear errors.
#include <fstream>

#include "client/firecracker_client.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "harness.h"
#include "kernel/process.h"
#include "kernel/uffd_abi.h"
#include "race_harness.h"
#include "snapshot/working_set.h"

namespace faultline::testing {
namespace {

// A server with custom config on a generated snapshot (the harness's is fixed).
struct PrefetchServer {
  explicit PrefetchServer(uint64_t bytes, std::function<void(ServerConfig&)> tweak, double zero_fraction = 0.1) {
    memory = dir.file("mem");
    socket = dir.file("vm.sock");
    EXPECT_TRUE(client::write_test_memory_file(memory, bytes, 11, zero_fraction));
    log_fd = ::open(dir.file("log").c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
    logger = std::make_unique<Logger>(LogFormat::kText, LogLevel::kDebug, log_fd);
    ServerConfig c;
    c.socket_path = socket;
    c.memory_path = memory;
    c.on_fatal = OnFatal::kLeave;
    tweak(c);
    auto s = Server::create(c, *logger);
    created = s.has_value();
    if (!s) {
      error = s.error().describe();
      return;
    }
    server = std::move(*s);
    thread = std::thread([this] { (void)server->run(); });
  }
  ~PrefetchServer() {
    if (server) server->stop();
    if (thread.joinable()) thread.join();
    ::close(log_fd);
  }
  std::string log() const { return read_file(dir.file("log")); }
  std::shared_ptr<Session> wait_session() {
    for (int i = 0; i < 10000 && server->live_sessions().empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for the session to start
    }
    return server->session(server->live_sessions().at(0).id);
  }

  TempDir dir;
  std::string memory, socket, error;
  int log_fd = -1;
  bool created = false;
  std::unique_ptr<Logger> logger;
  std::unique_ptr<Server> server;
  std::thread thread;
};

// Restores, touches `pages` (in that order) and ends the session.
void restore_and_touch(PrefetchServer& s, const std::vector<uint64_t>& offsets, bool huge = false) {
  auto c = client::FirecrackerClient::create(
      {.version = {1, 14}, .region_sizes = {huge ? 32 * kMiB : 64 * kMiB}, .huge_pages = huge});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  auto r = client::touch_pages(*c, **v, offsets, client::Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
}

TEST(Prefetch, RecordWritesFirstTouchOrderWhenTheSessionEnds) {
  std::string record;
  PrefetchServer s(64 * kMiB, [&](ServerConfig& c) { record = c.record_path = c.memory_path + ".ws"; });
  ASSERT_TRUE(s.created) << s.error;
  const std::vector<uint64_t> order{5 * 4096, 4096, 900 * 4096, 4096 /* again */, 7 * 4096};
  restore_and_touch(s, order);
  ASSERT_TRUE(s.server->wait_for_ended(1, std::chrono::seconds(10)));
  auto set = read_working_set(record, 64 * kMiB);
  ASSERT_TRUE(set) << set.error().describe();
  EXPECT_EQ(set->offsets, (std::vector<uint64_t>{5 * 4096, 4096, 900 * 4096, 7 * 4096}));
  EXPECT_NE(s.log().find("event=record_written"), std::string::npos);
}

TEST(Prefetch, ReplayInstallsTheWorkingSetAndEveryByteIsRight) {
  // Record a working set of 2000 scattered pages...
  std::vector<uint64_t> ws;
  for (uint64_t i = 0; i < 2000; ++i) ws.push_back(((i * 7919) % 16384) * 4096);
  TempDir files;  // unique per test: ctest -j2 runs tests side by side
  const std::string record = files.file("ws");
  {
    PrefetchServer rec(64 * kMiB, [&](ServerConfig& c) { c.record_path = record; });
    restore_and_touch(rec, ws);
    ASSERT_TRUE(rec.server->wait_for_ended(1, std::chrono::seconds(10)));
  }
  // ...then replay it on a fresh server over the same snapshot contents.
  PrefetchServer s(64 * kMiB, [&](ServerConfig& c) { c.prefetch_path = record; });
  ASSERT_TRUE(s.created) << s.error;
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  ASSERT_TRUE(wait_until([&] { return s.log().find("event=prefetch_done") != std::string::npos; }));
  // Prefetched pages are present before the guest touches them.
  const uint64_t base = reinterpret_cast<uint64_t>(c->guest_ptr(0));
  auto pm = kernel::read_pagemap(::getpid(), base, 16384);
  ASSERT_TRUE(pm);
  uint64_t missing = 0;
  for (uint64_t off : ws) missing += ((*pm)[off / 4096] & kPagemapPresent) == 0;
  EXPECT_EQ(missing, 0u) << s.log();
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  auto r = client::touch_pages(*c, **v, ws, client::Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
  const SessionCounters counters = session->summary().counters;
  // At least the set; small gaps between its pages are filled too.
  EXPECT_GE(counters.prefaulted_pages, 2000u) << s.log();
  EXPECT_EQ(counters.faults, 0u) << "the guest found its working set installed\n" << s.log();
}

TEST(Prefetch, NeverRevivesARemovedPageNorOverwritesAWrittenOne) {
  std::vector<uint64_t> ws;
  for (uint64_t p = 0; p < 64; ++p) ws.push_back(p * 4096);
  TempDir files;
  const std::string record = files.file("ws");
  ASSERT_TRUE(write_working_set(record, WorkingSet{4096, 64 * kMiB, ws}));
  // Park the prefetch before its first install: the guest writes page 1 and
  // gives page 2 back first, and page 3 is removed while the run is staged.
  InstallPark park(HookPoint::kBeforePrefaultInstall, 0, true);
  PrefetchServer s(64 * kMiB, [&](ServerConfig& c) { c.prefetch_path = record; }, 0);
  ASSERT_TRUE(s.created) << s.error;
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  ASSERT_TRUE(park.wait_parked());
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{4096}, client::Access::kWrite));
  ASSERT_TRUE(c->remove(2 * 4096, 2 * 4096));
  (*v)->record_removed(2 * 4096);
  (*v)->record_removed(3 * 4096);
  park.release();
  ASSERT_TRUE(wait_until([&] { return s.log().find("event=prefetch_done") != std::string::npos; }));
  auto pm = kernel::read_pagemap(::getpid(), reinterpret_cast<uint64_t>(c->guest_ptr(0)), 8);
  EXPECT_FALSE((*pm)[2] & kPagemapPresent) << "prefetch brought a removed page back";
  EXPECT_FALSE((*pm)[3] & kPagemapPresent);
  EXPECT_TRUE((*pm)[4] & kPagemapPresent);
  auto r = client::touch_pages(*c, **v, ws, client::Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u) << "the written page, the removed ones (zero) and the rest (snapshot)";
}

TEST(Prefetch, EagerFillInstallsTheWholeSnapshotAndDemandFaultsStillWork) {
  PrefetchServer s(64 * kMiB, [&](ServerConfig& c) { c.prefetch_all = true; });
  ASSERT_TRUE(s.created) << s.error;
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  // Demand faults while the fill runs.
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  auto early = client::touch_pages(*c, **v,
                                   client::select_pages(c->page_count(), 4096, 0.05, client::PageOrder::kRandom, 4),
                                   client::Access::kRead);
  ASSERT_TRUE(early);
  EXPECT_EQ(early->mismatches, 0u);
  ASSERT_TRUE(wait_until([&] { return s.log().find("event=prefetch_done") != std::string::npos; }));
  auto pm = kernel::read_pagemap(::getpid(), reinterpret_cast<uint64_t>(c->guest_ptr(0)), c->page_count());
  uint64_t present = 0;
  for (uint64_t e : *pm) present += (e & kPagemapPresent) != 0;
  // Zero pages installed with UFFDIO_ZEROPAGE map the shared zero page, which
  // pagemap reports present as well.
  EXPECT_EQ(present, c->page_count());
  const SessionCounters counters = session->summary().counters;
  EXPECT_EQ(counters.faults + counters.prefaulted_pages, c->page_count() + counters.already_present);
  auto all = client::touch_pages(*c, **v, client::select_pages(c->page_count(), 4096, 1.0,
                                                               client::PageOrder::kSequential, 1),
                                 client::Access::kRead);
  EXPECT_EQ(all->mismatches, 0u);
}

TEST(Prefetch, ZeroPagesAreInstalledWithoutReadingTheSnapshot) {
  PrefetchServer s(16 * kMiB, [&](ServerConfig&) {}, 0.5);
  ASSERT_TRUE(s.created) << s.error;
  EXPECT_NE(s.log().find("event=zero_index_built"), std::string::npos);
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  std::vector<uint64_t> zero_pages, data_pages;
  for (uint64_t p = 0; p < c->page_count(); ++p) {
    (client::test_page_is_zero(p, 11, 0.5) ? zero_pages : data_pages).push_back(p * 4096);
  }
  ASSERT_GT(zero_pages.size(), 100u);
  auto r = client::touch_pages(*c, **v, zero_pages, client::Access::kRead);
  EXPECT_EQ(r->mismatches, 0u);
  // The server counts an install just after the ioctl that woke the guest.
  EXPECT_TRUE(wait_until([&] { return session->summary().counters.snapshot_zero_pages == zero_pages.size(); }))
      << session->summary().counters.snapshot_zero_pages;
  r = client::touch_pages(*c, **v, data_pages, client::Access::kRead);
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_TRUE(wait_until([&] {
    const SessionCounters k = session->summary().counters;
    return k.pages_snapshot == c->page_count();
  }));
  EXPECT_EQ(session->summary().counters.snapshot_zero_pages, zero_pages.size());
  // The next daemon loads the index instead of building it.
  c->close_socket();
  PrefetchServer again(16 * kMiB, [&](ServerConfig& cfg) { cfg.zero_index_path = s.memory + ".zeroidx"; }, 0.5);
  EXPECT_NE(again.log().find("event=zero_index_built"), std::string::npos) << "a new file is a new snapshot";
}

TEST(Prefetch, DamagedWorkingSetFileIsAClearStartupError) {
  TempDir files;
  const std::string record = files.file("ws");
  ASSERT_TRUE(write_working_set(record, WorkingSet{4096, 16 * kMiB, {0, 4096}}));
  {
    std::fstream f(record, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(33);
    f.put('\x7f');
  }
  PrefetchServer s(16 * kMiB, [&](ServerConfig& c) { c.prefetch_path = record; });
  EXPECT_FALSE(s.created);
  EXPECT_NE(s.error.find("checksum"), std::string::npos) << s.error;
  PrefetchServer other(32 * kMiB, [&](ServerConfig& c) { c.prefetch_path = files.file("missing.ws"); });
  EXPECT_FALSE(other.created);
}

TEST(Prefetch, HugePageWorkingSetRoundTrip) {
  HugePageReservation reservation(40);
  FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation.ok(), reservation.reason());
  TempDir files;
  const std::string record = files.file("ws");
  const std::vector<uint64_t> ws{6 * kMiB, 0, 20 * kMiB};
  {
    PrefetchServer rec(32 * kMiB, [&](ServerConfig& c) { c.record_path = record; });
    restore_and_touch(rec, ws, true);
    ASSERT_TRUE(rec.server->wait_for_ended(1, std::chrono::seconds(10)));
  }
  auto set = read_working_set(record, 32 * kMiB);
  ASSERT_TRUE(set) << set.error().describe();
  EXPECT_EQ(set->page_size, 2 * kMiB);
  EXPECT_EQ(set->offsets, ws);
  PrefetchServer s(32 * kMiB, [&](ServerConfig& c) { c.prefetch_path = record; });
  ASSERT_TRUE(s.created) << s.error;
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {32 * kMiB}, .huge_pages = true});
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  ASSERT_TRUE(wait_until([&] { return s.log().find("event=prefetch_done") != std::string::npos; }));
  auto v = client::Verifier::open(s.memory, c->guest_size(), c->page_size());
  auto r = client::touch_pages(*c, **v, ws, client::Access::kRead);
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_EQ(session->summary().counters.prefaulted_pages, 3u);
  EXPECT_EQ(session->summary().counters.faults, 0u);
}

}  // namespace
}  // namespace faultline::testing
