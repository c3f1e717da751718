// Record and replay of working sets, eager fill and the zero-page index,
// through the real server and the Firecracker-faithful client: every
// prefetched byte is checked, prefetch never revives a removed page or
// overwrites a written one, and damaged files are clear errors.
#include <fcntl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include "client/firecracker_client.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "harness.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "kernel/process.h"
#include "kernel/uffd_abi.h"
#include "race_harness.h"
#include "server/diff_export.h"
#include "server/session.h"
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

// Without WP every present page counts as written, and a prefetch makes
// pages present with the VM paused: an export then said "the VM is not
// paused" (found by review). It now says the prefetch is still running, and
// works once the prefetch is done.
TEST(Prefetch, AnExportWithoutWpWhilePrefetchInstallsSaysSoAndWorksOnceItIsDone) {
  InstallPark park(HookPoint::kBeforePrefaultInstall, 0, true);
  PrefetchServer s(16 * kMiB, [&](ServerConfig& c) { c.prefetch_all = true; });
  ASSERT_TRUE(s.created) << s.error;
  auto store = image::LocalStore::open(s.dir.file("store"), true);
  ASSERT_TRUE(store);
  image::CreateOptions base;
  base.memory_path = s.memory;
  base.name = "base";
  ASSERT_TRUE(image::create_image(**store, base));
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(s.socket));
  auto session = s.wait_session();
  ASSERT_NE(session, nullptr);
  ASSERT_TRUE(park.wait_parked());
  ExportOptions o;
  o.parent = "base";
  o.name = "during";
  auto refused = export_session_diff(*session, **store, o);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EBUSY);
  EXPECT_NE(refused.error().message.find("its prefetch is still installing pages"), std::string::npos)
      << refused.error().message;
  park.release();
  ASSERT_TRUE(wait_until([&] { return !session->prefetching(); })) << s.log();
  o.name = "after";
  auto exported = export_session_diff(*session, **store, o);
  ASSERT_TRUE(exported) << exported.error().describe();
  EXPECT_EQ(exported->image.stored_pages, 0u) << "every page present is the parent's";
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

// Two regions side by side in the client's memory (one VMA), their bytes
// apart in the file: [B, S) is file [0, S), [B+S, 2S) is file [2S, 3S).
// Firecracker lays its regions back to back in the file, but the handshake
// allows any offsets. A prefetch run that crossed from one region into the
// next read it with one pread from the first region's offset, and installed
// file [S, 2S) as the second region (found by review: 64 of 128 pages wrong).
TEST(Prefetch, ARunNeverCrossesIntoARegionWhoseBytesAreElsewhereInTheFile) {
  constexpr uint64_t kS = 64 * 4096;
  TempDir dir;
  const std::string path = dir.file("mem");
  std::string file(3 * kS, '\0');
  for (uint64_t p = 0; p < 3 * kS / 4096; ++p) std::memset(file.data() + p * 4096, static_cast<int>(p % 250 + 1), 4096);
  std::ofstream(path, std::ios::binary).write(file.data(), static_cast<std::streamsize>(file.size()));
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {2 * kS}});
  ASSERT_TRUE(c) << c.error().describe();
  const uint64_t base = c->regions().at(0).base_host_virt_addr;
  protocol::Handshake hs;
  hs.regions = {GuestRegion{base, kS, 0, 4096}, GuestRegion{base + kS, kS, 2 * kS, 4096}};
  hs.format = protocol::HandshakeFormat::kBothFields;
  hs.uffd.reset(::fcntl(c->uffd(), F_DUPFD_CLOEXEC, 0));
  int sv[2] = {-1, -1};
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  hs.connection.reset(sv[0]);
  ::close(sv[1]);
  hs.peer_closed = true;
  hs.peer = {::getpid(), ::getuid(), ::getgid()};
  auto memory = MemoryFile::open(path);
  ASSERT_TRUE(memory) << memory.error().describe();
  Logger logger(LogFormat::kText, LogLevel::kWarn, 2);
  SessionConfig config{.id = 1, .workers = 1, .on_fatal = OnFatal::kLeave, .logger = &logger};
  config.prefetch_all = true;
  config.prefetch_threads = 1;
  auto session = Session::start(std::move(hs), *memory, config);
  ASSERT_TRUE(session) << session.error().describe();
  // Every page present (pagemap: no fault taken) before any byte is read,
  // so what the guest reads below is what the prefetch installed.
  const bool all_present = wait_until([&] {
    auto m = kernel::read_pagemap(::getpid(), base, 2 * kS / 4096);
    return m && std::all_of(m->begin(), m->end(), [](uint64_t e) { return (e & (1ull << 63)) != 0; });
  });
  EXPECT_TRUE(all_present);
  EXPECT_EQ((*session)->summary().counters.faults, 0u);
  for (uint64_t p = 0; p < 2 * kS / 4096; ++p) {
    const uint64_t file_page = p < kS / 4096 ? p : 2 * kS / 4096 + (p - kS / 4096);
    ASSERT_EQ(*reinterpret_cast<const volatile uint8_t*>(base + p * 4096), file_page % 250 + 1) << "guest page " << p;
    ASSERT_EQ(std::memcmp(reinterpret_cast<const void*>(base + p * 4096), file.data() + file_page * 4096, 4096), 0)
        << "guest page " << p;
  }
  (*session)->stop();
  (*session)->wait();
}

}  // namespace
}  // namespace faultline::testing
