// Metrics end to end: a real server, the Firecracker-faithful client and a
// scrape of /metrics over real HTTP. The numbers scraped are checked against
// what the guest did and what the session itself counted (the session_end
// line, Server::finished_sessions()), and a session that ends during a
// scrape is counted exactly once.
#include <sys/socket.h>
#include <sys/un.h>

#include <optional>
#include <regex>

#include "client/firecracker_client.h"
#include "client/handshake.h"
#include "client/touch.h"
#include "client/uffd_setup.h"
#include "client/verifier.h"
#include "harness.h"
#include "metrics/exposition.h"
#include "metrics/http_exporter.h"
#include "metrics/http_get.h"
#if FAULTLINE_TEST_HOOKS
#include "race_harness.h"
#endif

namespace faultline::testing {
namespace {

using metrics::Family;

// Serves a Server's metrics over HTTP on a free loopback port.
class Scraper {
 public:
  explicit Scraper(const Server& server) {
    auto e = metrics::HttpExporter::start({.address = "127.0.0.1:0"}, [&server] { return server.metrics().render(); });
    EXPECT_TRUE(e) << e.error().describe();
    if (e) exporter_ = std::move(*e);
  }
  const metrics::ListenAddress& address() const { return exporter_->address(); }

  // GET /metrics, parsed; every histogram checked.
  std::vector<Family> scrape() const { return parse(metrics::http_get(address(), "/metrics")); }

  static std::vector<Family> parse(const Result<metrics::HttpReply>& reply) {
    EXPECT_TRUE(reply) << reply.error().describe();
    if (!reply) return {};
    EXPECT_EQ(reply->status, 200) << reply->head;
    EXPECT_EQ(reply->header("Content-Type"), "text/plain; version=0.0.4");
    auto families = metrics::parse_exposition(reply->body);
    EXPECT_TRUE(families) << families.error().describe() << "\n" << reply->body;
    if (!families) return {};
    for (const Family& f : *families) {
      if (f.type != "histogram") continue;
      auto ok = metrics::check_histogram(f);
      EXPECT_TRUE(ok) << ok.error().describe();
    }
    return *families;
  }

 private:
  std::unique_ptr<metrics::HttpExporter> exporter_;
};

uint64_t value(const std::vector<Family>& f, std::string_view name, std::initializer_list<metrics::Label> labels = {}) {
  auto v = metrics::sample_value(f, name, labels);
  EXPECT_TRUE(v) << name << ": " << v.error().describe();
  return v ? static_cast<uint64_t>(*v) : ~uint64_t{0};
}

uint64_t faults_on_path(const std::vector<Family>& f, const char* path) {
  return value(f, "faultline_fault_service_seconds_count", {{"path", path}});
}

uint64_t faults_served(const std::vector<Family>& f) {
  uint64_t n = 0;
  for (const char* p : {"reader", "worker", "zero", "prefetch_late"}) n += faults_on_path(f, p);
  return n;
}

// The scraped counters equal the session's own (one session, 4 KiB pages).
void expect_counters_match(const std::vector<Family>& f, const SessionCounters& c) {
  EXPECT_EQ(value(f, "faultline_faults_total"), c.faults);
  EXPECT_EQ(value(f, "faultline_installed_pages_total", {{"source", "snapshot"}}), c.pages_snapshot - c.snapshot_zero_pages);
  EXPECT_EQ(value(f, "faultline_installed_pages_total", {{"source", "zero"}}), c.pages_zero + c.snapshot_zero_pages);
  EXPECT_EQ(value(f, "faultline_installed_pages_total", {{"source", "prefetch"}}), c.prefaulted_pages);
  EXPECT_EQ(value(f, "faultline_installed_bytes_total", {{"source", "snapshot"}}) +
                value(f, "faultline_installed_bytes_total", {{"source", "zero"}}),
            c.bytes_installed);
  EXPECT_EQ(value(f, "faultline_installed_bytes_total", {{"source", "zero"}}),
            (c.pages_zero + c.snapshot_zero_pages) * 4096);
  EXPECT_EQ(value(f, "faultline_installed_bytes_total", {{"source", "prefetch"}}), c.prefaulted_pages * 4096);
  EXPECT_EQ(value(f, "faultline_faults_already_present_total"), c.already_present);
  EXPECT_EQ(value(f, "faultline_eagain_retries_total"), c.retries);
  EXPECT_EQ(value(f, "faultline_remove_events_total"), c.removes);
  EXPECT_EQ(value(f, "faultline_removed_pages_total"), c.removed_pages);
  // Every fault was installed or found present (no write-protect faults here).
  EXPECT_EQ(faults_served(f), c.pages_snapshot + c.pages_zero + c.already_present);
}

// A handshake whose JSON is malformed (with a real uffd): handshake_failed.
void send_bad_handshake(const std::string& socket) {
  UniqueFd sock = connect_unix(socket);
  auto uffd = client::open_userfaultfd();
  ASSERT_TRUE(uffd) << uffd.error().describe();
  ASSERT_TRUE(client::uffd_api(uffd->get(), UFFD_FEATURE_EVENT_REMOVE));
  const int fds[] = {uffd->get()};
  ASSERT_TRUE(client::send_handshake(sock.get(), R"([{"base_host_virt_addr": 1,, }])", fds));
}

// The live session's counters once every fault it read has been counted: a
// guest thread runs again as soon as its page is installed, a moment before
// the serving thread counts the install.
std::optional<SessionCounters> settled_live_counters(Server& server) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    const auto live = server.live_sessions();
    if (live.size() == 1) {
      const SessionCounters& c = live[0].counters;
      if (c.pages_snapshot + c.pages_zero + c.already_present == c.faults) return c;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling server state, bounded
  }
  return std::nullopt;
}

std::vector<uint64_t> page_offsets(uint64_t first_page, uint64_t count) {
  std::vector<uint64_t> v;
  for (uint64_t p = first_page; p < first_page + count; ++p) v.push_back(p * 4096);
  return v;
}

class ScrapeMatchesSession : public ::testing::TestWithParam<bool> {};

// A guest touches 1024 pages, gives 8 x 64 KiB back (and 64 KiB it never
// touched), touches what it gave back again; a bad handshake and a layout
// the file cannot serve come before it. Scraped mid-session and at the end,
// every number equals what the guest did and what the session counted.
TEST_P(ScrapeMatchesSession, NumbersEqualTheGuestsActionsAndTheSessionsOwnCounters) {
  const bool reader_serves = GetParam();
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  o.reader_serves_cached = reader_serves;
  o.configure = [](ServerConfig& c, const TempDir&) { c.record_fault_latency = true; };
  ServerHarness h(o);
  Scraper sc(h.server());

  auto f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_sessions_live"), 0u);
  EXPECT_EQ(faults_served(f), 0u);

  send_bad_handshake(h.socket());
  ASSERT_TRUE(h.wait_ended(1));
  {
    // Regions beyond the end of the memory file: session_rejected.
    auto big = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {32 * kMiB}});
    ASSERT_TRUE(big) << big.error().describe();
    ASSERT_TRUE(big->connect_and_send(h.socket()));
    ASSERT_TRUE(h.wait_ended(2));
  }
  f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "handshake_failed"}}), 1u);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "session_rejected"}}), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_started_total"), 0u);

  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(v);
  const auto touched = page_offsets(0, 1024);
  auto t = client::touch_pages(*c, **v, touched, client::Access::kRead);
  ASSERT_TRUE(t) << t.error().describe();
  EXPECT_EQ(t->mismatches, 0u);

  // Mid-session: the live session's counts, read at scrape time.
  const std::optional<SessionCounters> live = settled_live_counters(h.server());
  ASSERT_TRUE(live);
  f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_sessions_live"), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_started_total"), 1u);
  EXPECT_EQ(live->faults, touched.size()) << "one fault per page touched by one thread";
  expect_counters_match(f, *live);

  uint64_t removed_pages = 0;
  std::vector<uint64_t> retouch;
  for (uint64_t k = 0; k < 8; ++k) {
    auto r = c->remove((k * 100 + 10) * 4096, 64 * 1024);
    ASSERT_TRUE(r) << r.error().describe();
    for (const client::GuestRange& g : *r) {
      removed_pages += g.length / 4096;
      for (uint64_t off = g.offset; off < g.offset + g.length; off += 4096) {
        (*v)->record_removed(off);
        retouch.push_back(off);
      }
    }
  }
  auto never_touched = c->remove(3000 * 4096, 64 * 1024);
  ASSERT_TRUE(never_touched);
  for (const client::GuestRange& g : *never_touched) removed_pages += g.length / 4096;
  t = client::touch_pages(*c, **v, retouch, client::Access::kRead);
  ASSERT_TRUE(t) << t.error().describe();
  EXPECT_EQ(t->mismatches, 0u) << "removed pages read zero";

  c->close_socket();  // Firecracker exits: the session ends
  ASSERT_TRUE(h.wait_ended(3));
  const auto ended = h.server().finished_sessions();
  ASSERT_EQ(ended.size(), 1u);
  const SessionCounters& sc_counters = ended[0].counters;
  EXPECT_EQ(sc_counters.faults, touched.size() + retouch.size());
  EXPECT_EQ(sc_counters.removed_pages, removed_pages);
  EXPECT_EQ(sc_counters.removes, 9u);

  f = sc.scrape();
  expect_counters_match(f, sc_counters);
  EXPECT_EQ(value(f, "faultline_faults_total"), touched.size() + retouch.size());
  EXPECT_EQ(value(f, "faultline_removed_pages_total"), removed_pages);
  EXPECT_EQ(value(f, "faultline_sessions_live"), 0u);
  EXPECT_EQ(value(f, "faultline_sessions_started_total"), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "fatal"}}), 0u);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "handshake_failed"}}), 1u);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "session_rejected"}}), 1u);

  // Per path. Zero installs (removed pages, and pages the zero index knows)
  // never read the file; they are the zero path whoever served them.
  const uint64_t served = sc_counters.pages_snapshot + sc_counters.pages_zero + sc_counters.already_present;
  EXPECT_EQ(faults_on_path(f, "zero"), sc_counters.pages_zero + sc_counters.snapshot_zero_pages);
  EXPECT_GE(faults_on_path(f, "zero"), retouch.size());
  EXPECT_EQ(faults_on_path(f, "prefetch_late"), 0u);
  if (reader_serves) {
    // The reader serves every 4 KiB zero install and every page-cache hit.
    EXPECT_EQ(faults_on_path(f, "reader") + faults_on_path(f, "zero"), sc_counters.reader_served);
    EXPECT_EQ(faults_on_path(f, "worker"), served - sc_counters.reader_served);
    EXPECT_GT(faults_on_path(f, "reader"), 0u) << "the memory file was just written: its pages are cached";
  } else {
    EXPECT_EQ(faults_on_path(f, "reader"), 0u);
    EXPECT_EQ(faults_on_path(f, "worker"), served - faults_on_path(f, "zero"));
    EXPECT_GT(faults_on_path(f, "worker"), 0u);
  }
  // The session_end line says the same.
  const std::string log = h.log();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex("event=session_end .* faults=([0-9]+) ")));
  EXPECT_EQ(std::stoull(m[1]), value(f, "faultline_faults_total"));
}

INSTANTIATE_TEST_SUITE_P(ReaderServesCached, ScrapeMatchesSession, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "ReaderServes" : "WorkersServe"; });

// Counters never go back when sessions end: what ended sessions counted is
// kept, and live ones add to it.
TEST(Scrape, CountersAreMonotonicAcrossSessionEnds) {
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) { c.record_fault_latency = true; };
  ServerHarness h(o);
  Scraper sc(h.server());
  uint64_t expected = 0, last = 0;
  for (int i = 0; i < 3; ++i) {
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
    auto t = client::touch_pages(*c, **v, page_offsets(100 * i, 50 + i), client::Access::kRead);
    ASSERT_TRUE(t);
    expected += 50 + i;
    auto f = sc.scrape();
    EXPECT_EQ(value(f, "faultline_faults_total"), expected);
    EXPECT_GE(value(f, "faultline_faults_total"), last);
    last = value(f, "faultline_faults_total");
    c->close_socket();
    ASSERT_TRUE(h.wait_ended(static_cast<size_t>(i) + 1));
    f = sc.scrape();
    EXPECT_EQ(value(f, "faultline_faults_total"), expected);
    EXPECT_EQ(faults_served(f), expected);
    EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), static_cast<uint64_t>(i) + 1);
  }
}

// Without --metrics the fault path reads no clock: the histograms stay
// empty while the counters still count.
TEST(Scrape, WithoutLatencyRecordingHistogramsStayEmptyAndCountersCount) {
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  ServerHarness h(o);
  Scraper sc(h.server());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, page_offsets(0, 64), client::Access::kRead));
  auto f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_faults_total"), 64u);
  EXPECT_EQ(faults_served(f), 0u);
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
}

#if FAULTLINE_TEST_HOOKS

// Demand faults on pages the prefetch plan had not reached: the prefetch
// threads are parked before their first install, the guest touches 100
// planned pages, and each is counted on the prefetch_late path.
TEST(Scrape, DemandFaultsPrefetchHadNotReachedArePrefetchLate) {
  ServerHarness::Options o;
  o.memory_bytes = 64 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) {
    c.record_fault_latency = true;
    c.prefetch_all = true;
  };
  InstallPark park(HookPoint::kBeforePrefaultInstall, 0, /*all=*/true);
  ServerHarness h(o);
  Scraper sc(h.server());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {64 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  ASSERT_TRUE(park.wait_parked(1));  // the plan is marked; nothing of it installed
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  auto t = client::touch_pages(*c, **v, page_offsets(8000, 100), client::Access::kRead);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->mismatches, 0u);
  park.release();
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
  const auto ended = h.server().finished_sessions();
  ASSERT_EQ(ended.size(), 1u);
  const SessionCounters& counters = ended[0].counters;
  EXPECT_EQ(counters.prefetch_late, 100u);
  auto f = sc.scrape();
  EXPECT_EQ(faults_on_path(f, "prefetch_late"), 100u);
  EXPECT_EQ(faults_served(f), 100u);
  expect_counters_match(f, counters);
}

// The scrape holds the registry while it reads the live session; the
// session ends meanwhile and its fold waits. The scrape counts it once, as
// live; the next one once, as ended.
TEST(Scrape, ASessionEndingWhileAScrapeReadsItIsCountedOnce) {
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) { c.record_fault_latency = true; };
  ServerHarness h(o);
  Scraper sc(h.server());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, page_offsets(0, 300), client::Access::kRead));

  Gate collecting, release_collect, fold_reached;
  test_hooks::set(HookPoint::kBeforeMetricsFold, [&](HookContext&) { fold_reached.open(); });
  test_hooks::set(HookPoint::kMetricsCollect, [&](HookContext&) {
    collecting.open();
    release_collect.wait();
  });
  Result<metrics::HttpReply> during = fail("not scraped");
  std::thread scraper([&] { during = metrics::http_get(sc.address(), "/metrics"); });
  ASSERT_TRUE(collecting.wait_for(std::chrono::seconds(10)));  // the scrape is reading the live session
  c->close_socket();                                           // the VM exits
  ASSERT_TRUE(fold_reached.wait_for(std::chrono::seconds(10)));  // its end waits to fold
  release_collect.open();
  scraper.join();
  test_hooks::clear(HookPoint::kMetricsCollect);
  test_hooks::clear(HookPoint::kBeforeMetricsFold);
  ASSERT_TRUE(h.wait_ended(1));

  auto f = Scraper::parse(during);
  EXPECT_EQ(value(f, "faultline_sessions_live"), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 0u);
  EXPECT_EQ(value(f, "faultline_faults_total"), 300u);
  EXPECT_EQ(faults_served(f), 300u);
  f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_sessions_live"), 0u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 1u);
  EXPECT_EQ(value(f, "faultline_faults_total"), 300u);
  EXPECT_EQ(faults_served(f), 300u);
}

// The other order: the session has taken its final counts and is about to
// fold them when a scrape runs. The scrape still finds it live (once), and
// after the fold it is counted once, as ended.
TEST(Scrape, AScrapeBetweenASessionsFinalCountAndItsFoldCountsItOnce) {
  ServerHarness::Options o;
  o.memory_bytes = 16 * kMiB;
  o.configure = [](ServerConfig& c, const TempDir&) { c.record_fault_latency = true; };
  ServerHarness h(o);
  Scraper sc(h.server());
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {16 * kMiB}});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, page_offsets(0, 200), client::Access::kRead));

  Gate fold_parked, release_fold;
  test_hooks::set(HookPoint::kBeforeMetricsFold, [&](HookContext&) {
    fold_parked.open();
    release_fold.wait();
  });
  c->close_socket();
  ASSERT_TRUE(fold_parked.wait_for(std::chrono::seconds(10)));
  auto f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_sessions_live"), 1u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 0u);
  EXPECT_EQ(value(f, "faultline_faults_total"), 200u);
  EXPECT_EQ(faults_served(f), 200u);
  release_fold.open();
  ASSERT_TRUE(h.wait_ended(1));
  test_hooks::clear(HookPoint::kBeforeMetricsFold);
  f = sc.scrape();
  EXPECT_EQ(value(f, "faultline_sessions_live"), 0u);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 1u);
  EXPECT_EQ(value(f, "faultline_faults_total"), 200u);
  EXPECT_EQ(faults_served(f), 200u);
}

#endif  // FAULTLINE_TEST_HOOKS

// --- the command line ---------------------------------------------------------

// Waits (bounded) until `log` holds a line matching `re`; returns the match.
std::smatch wait_for_log(const std::string& log, const std::regex& re, std::string& text) {
  std::smatch m;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    text = read_file(log);
    if (std::regex_search(text, m, re)) return m;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a daemon's log file, bounded
  }
  return m;
}

TEST(ServeMetrics, DaemonServesMetricsThatMatchItsSessionEndLine) {
  TempDir dir;
  const std::string mem = dir.file("mem"), sock = dir.file("vm.sock"), log = dir.file("server.log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 32 * kMiB, 5, 0.2));
  pid_t server = spawn({built_binary("faultline"), "serve", "--socket", sock, "--memory", mem, "--metrics",
                        "127.0.0.1:0"},
                       log);
  ASSERT_GT(server, 0);
  std::string text;
  std::smatch at = wait_for_log(log, std::regex("event=metrics_listening address=127\\.0\\.0\\.1:([0-9]+)"), text);
  ASSERT_FALSE(at.empty()) << text;
  const metrics::ListenAddress address{"127.0.0.1", static_cast<uint16_t>(std::stoi(at[1]))};

  const std::string out = dir.file("client.out");
  pid_t c = spawn({built_binary("faultline-client"), "restore", "--socket", sock, "--memory", mem, "--fc-version",
                   "1.14", "--json"},
                  out);
  int status = wait_child(c, std::chrono::seconds(60));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
  std::smatch end = wait_for_log(
      log, std::regex("event=session_end .* state=([a-z_]+) .* faults=([0-9]+) .* removes=([0-9]+) "), text);
  ASSERT_FALSE(end.empty()) << text;
  // The client process exits right after it closes its socket: the session
  // sees either first (CI saw peer_exited), and the metric names the same.
  const std::string state = end[1];
  EXPECT_TRUE(state == "socket_closed" || state == "peer_exited") << state;

  auto f = Scraper::parse(metrics::http_get(address, "/metrics"));
  EXPECT_EQ(value(f, "faultline_faults_total"), std::stoull(end[2]));
  EXPECT_EQ(value(f, "faultline_remove_events_total"), std::stoull(end[3]));
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", state}}), 1u);
  EXPECT_GT(faults_served(f), 0u);
  auto nf = metrics::http_get(address, "/");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);

  // A second daemon on the same metrics address: a clear start-up error.
  const std::string log2 = dir.file("server2.log");
  pid_t second = spawn({built_binary("faultline"), "serve", "--socket", dir.file("vm2.sock"), "--memory", mem,
                        "--metrics", address.to_string()},
                       log2);
  status = wait_child(second, std::chrono::seconds(20));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << read_file(log2);
  EXPECT_NE(read_file(log2).find("event=startup_failed"), std::string::npos) << read_file(log2);
  EXPECT_NE(read_file(log2).find("cannot listen on the metrics address " + address.to_string()), std::string::npos)
      << read_file(log2);
  EXPECT_NE(read_file(log2).find("Address already in use"), std::string::npos) << read_file(log2);

  ::kill(server, SIGTERM);
  status = wait_child(server, std::chrono::seconds(20));
  ASSERT_TRUE(WIFEXITED(status)) << read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(ServeMetrics, AMalformedAddressStopsStartUp) {
  TempDir dir;
  const std::string mem = dir.file("mem"), log = dir.file("server.log");
  ASSERT_TRUE(client::write_test_memory_file(mem, 4 * kMiB, 5, 0.2));
  for (const char* bad : {"9464", "localhost", "[::1", "127.0.0.1:99999"}) {
    pid_t server =
        spawn({built_binary("faultline"), "serve", "--socket", dir.file("vm.sock"), "--memory", mem, "--metrics", bad},
              log);
    const int status = wait_child(server, std::chrono::seconds(20));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << bad << ": " << read_file(log);
    EXPECT_NE(read_file(log).find("bad metrics address"), std::string::npos) << read_file(log);
  }
}

}  // namespace
}  // namespace faultline::testing
