#include "metrics/registry.h"

#include <condition_variable>
#include <mutex>
#include <regex>
#include <thread>

#include <gtest/gtest.h>

#include "metrics/exposition.h"

namespace faultline::metrics {
namespace {

const std::vector<std::string> kReasons = {"peer_exited", "socket_closed", "peer_gone", "stopped", "fatal"};

// A live session's counts as a test sets them; collect() may be gated.
class FakeSession final : public SessionSource {
 public:
  explicit FakeSession(uint64_t faults) { set_faults(faults); }

  void set_faults(uint64_t faults) {
    std::lock_guard lock(mu_);
    counts_.faults = faults;
    counts_.installed_pages[static_cast<size_t>(InstallSource::kSnapshot)] = faults;
    counts_.installed_bytes[static_cast<size_t>(InstallSource::kSnapshot)] = faults * 4096;
    counts_.latency[static_cast<size_t>(FaultPath::kReader)] = {};
    counts_.latency[static_cast<size_t>(FaultPath::kReader)].buckets[3] = faults;
    counts_.latency[static_cast<size_t>(FaultPath::kReader)].sum_ns = faults * 7'000;
  }
  SessionCounts counts() const {
    std::lock_guard lock(mu_);
    return counts_;
  }

  // The next collect() announces itself and waits until released.
  void park_next_collect() {
    std::lock_guard lock(mu_);
    park_ = true;
  }
  void wait_parked() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return parked_; });
  }
  void release() {
    std::lock_guard lock(mu_);
    park_ = false;
    cv_.notify_all();
  }

  void collect(SessionCounts& into) const override {
    std::unique_lock lock(mu_);
    if (park_) {
      parked_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return !park_; });
    }
    into += counts_;
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  SessionCounts counts_;
  bool park_ = false;
  mutable bool parked_ = false;
};

std::vector<Family> scrape(const Registry& r) {
  auto f = parse_exposition(r.render());
  EXPECT_TRUE(f) << f.error().describe();
  return f ? *f : std::vector<Family>{};
}

double value(const std::vector<Family>& f, std::string_view name, std::initializer_list<Label> labels = {}) {
  auto v = sample_value(f, name, labels);
  EXPECT_TRUE(v) << name << ": " << v.error().describe();
  return v ? *v : -1;
}

TEST(Registry, EveryFamilyIsDocumentedNamedInPrometheusStyleAndRenderedFromTheStart) {
  Registry r(kReasons);
  const std::string text = r.render();
  auto families = parse_exposition(text);
  ASSERT_TRUE(families) << families.error().describe() << "\n" << text;
  const std::regex name_style("faultline_[a-z_]+");
  for (const Family& f : *families) {
    EXPECT_TRUE(std::regex_match(f.name, name_style)) << f.name;
    EXPECT_FALSE(f.help.empty()) << f.name << " has no HELP";
    EXPECT_FALSE(f.samples.empty()) << f.name << " has no sample before any session";
    if (f.type == "counter") {
      EXPECT_TRUE(f.name.ends_with("_total")) << f.name;
    }
    if (f.type != "counter") {
      EXPECT_FALSE(f.name.ends_with("_total")) << f.name;
    }
    if (f.type == "histogram") {
      EXPECT_TRUE(f.name.ends_with("_seconds")) << f.name;
      auto ok = check_histogram(f);
      EXPECT_TRUE(ok) << ok.error().describe();
    }
  }
  // Every cause and every end reason has its series, at 0.
  for (size_t i = 0; i < kRefusalCauses; ++i) {
    EXPECT_EQ(value(*families, "faultline_handshakes_refused_total", {{"cause", to_string(static_cast<RefusalCause>(i))}}), 0);
  }
  for (const std::string& reason : kReasons) {
    EXPECT_EQ(value(*families, "faultline_sessions_ended_total", {{"reason", reason}}), 0);
  }
  for (const char* path : {"reader", "worker", "zero", "prefetch_late"}) {
    EXPECT_EQ(value(*families, "faultline_fault_service_seconds_count", {{"path", path}}), 0);
  }
}

TEST(Registry, ObjectStoreTrafficIsRenderedAndTheDiskCacheOnlyWhenTheDaemonHasOne) {
  Registry r(kReasons);
  EXPECT_EQ(r.render().find("faultline_object_store_"), std::string::npos) << "no source set: nothing rendered";
  StoreCounts counts{.requests = 9, .gets = 7, .get_body_bytes = 3 << 20, .retries = 2};
  std::mutex mu;
  r.set_store_source([&] {
    std::lock_guard lock(mu);
    return counts;
  });
  auto f = scrape(r);
  EXPECT_EQ(value(f, "faultline_object_store_requests_total"), 9);
  EXPECT_EQ(value(f, "faultline_object_store_gets_total"), 7);
  EXPECT_EQ(value(f, "faultline_object_store_get_bytes_total"), 3 << 20);
  EXPECT_EQ(value(f, "faultline_object_store_retries_total"), 2);
  for (const Family& family : f) {
    EXPECT_FALSE(family.name.starts_with("faultline_disk_cache_")) << family.name << " without --cache-dir";
  }
  {
    std::lock_guard lock(mu);
    counts.disk_cache = StoreCounts::DiskCache{.hits = 40,
                                               .misses = 12,
                                               .damaged = 1,
                                               .evictions = 5,
                                               .put_failures = 3,
                                               .bytes = 6 << 20,
                                               .blobs = 11,
                                               .capacity_bytes = 64 << 20};
  }
  f = scrape(r);
  EXPECT_EQ(value(f, "faultline_disk_cache_hits_total"), 40);
  EXPECT_EQ(value(f, "faultline_disk_cache_misses_total"), 12);
  EXPECT_EQ(value(f, "faultline_disk_cache_damaged_total"), 1);
  EXPECT_EQ(value(f, "faultline_disk_cache_evictions_total"), 5);
  EXPECT_EQ(value(f, "faultline_disk_cache_write_failures_total"), 3);
  EXPECT_EQ(value(f, "faultline_disk_cache_bytes"), 6 << 20);
  EXPECT_EQ(value(f, "faultline_disk_cache_frames"), 11);
  EXPECT_EQ(value(f, "faultline_disk_cache_capacity_bytes"), 64 << 20);
  // The same naming rules as every other family.
  for (const Family& family : f) {
    if (!family.name.starts_with("faultline_disk_cache_") && !family.name.starts_with("faultline_object_store_")) {
      continue;
    }
    EXPECT_FALSE(family.help.empty()) << family.name;
    EXPECT_EQ(family.type == "counter", family.name.ends_with("_total")) << family.name << " is a " << family.type;
  }
}

TEST(Registry, LiveSessionsAreSummedAtScrapeTime) {
  Registry r(kReasons);
  FakeSession a(10), b(5);
  r.session_started(a);
  r.session_started(b);
  auto f = scrape(r);
  EXPECT_EQ(value(f, "faultline_sessions_live"), 2);
  EXPECT_EQ(value(f, "faultline_faults_total"), 15);
  EXPECT_EQ(value(f, "faultline_installed_bytes_total", {{"source", "snapshot"}}), 15 * 4096);
  EXPECT_EQ(value(f, "faultline_fault_service_seconds_count", {{"path", "reader"}}), 15);
  a.set_faults(12);  // a session keeps counting between scrapes
  f = scrape(r);
  EXPECT_EQ(value(f, "faultline_faults_total"), 17);
  r.session_ended(a, "fatal", a.counts());
  r.session_ended(b, "stopped", b.counts());
}

TEST(Registry, AnEndedSessionIsFoldedIntoTheTotalsAndCountersNeverGoBack) {
  Registry r(kReasons);
  FakeSession a(10), b(5);
  r.session_started(a);
  r.session_started(b);
  const double before = value(scrape(r), "faultline_faults_total");
  a.set_faults(11);
  r.session_ended(a, "socket_closed", a.counts());
  auto f = scrape(r);
  EXPECT_EQ(value(f, "faultline_sessions_live"), 1);
  EXPECT_EQ(value(f, "faultline_sessions_started_total"), 2);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 1);
  EXPECT_EQ(value(f, "faultline_faults_total"), 16);
  EXPECT_GE(value(f, "faultline_faults_total"), before);
  // Ending it again (a bug elsewhere) must not count it twice.
  r.session_ended(a, "socket_closed", a.counts());
  f = scrape(r);
  EXPECT_EQ(value(f, "faultline_faults_total"), 16);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "socket_closed"}}), 1);
  r.session_ended(b, "peer_exited", b.counts());
  f = scrape(r);
  EXPECT_EQ(value(f, "faultline_sessions_live"), 0);
  EXPECT_EQ(value(f, "faultline_faults_total"), 16);
  EXPECT_EQ(value(f, "faultline_fault_service_seconds_count", {{"path", "reader"}}), 16);
}

// The scrape holds the registry while it reads a live session; that
// session ends meanwhile. The scrape must count it once (as live), the next
// scrape once (as ended): never both, never neither.
TEST(Registry, ASessionEndingDuringAScrapeIsCountedExactlyOnce) {
  Registry r(kReasons);
  FakeSession ending(100), other(1);
  r.session_started(ending);
  r.session_started(other);
  ending.park_next_collect();
  std::string during;
  std::thread scraper([&] { during = r.render(); });
  ending.wait_parked();  // the scrape is inside the registry, reading `ending`
  std::atomic<bool> end_returned{false};
  std::thread ender([&] {
    r.session_ended(ending, "peer_exited", ending.counts());
    end_returned.store(true);
  });
  // The end cannot complete while the scrape reads: it waits for the lock.
  // (Not a timing assertion: if it did complete, the checks below fail.)
  ending.release();
  scraper.join();
  ender.join();
  EXPECT_TRUE(end_returned.load());

  auto f = parse_exposition(during);
  ASSERT_TRUE(f) << f.error().describe();
  EXPECT_EQ(value(*f, "faultline_faults_total"), 101);
  EXPECT_EQ(value(*f, "faultline_sessions_live"), 2);
  EXPECT_EQ(value(*f, "faultline_sessions_ended_total", {{"reason", "peer_exited"}}), 0);
  auto after = scrape(r);
  EXPECT_EQ(value(after, "faultline_faults_total"), 101);
  EXPECT_EQ(value(after, "faultline_sessions_live"), 1);
  EXPECT_EQ(value(after, "faultline_sessions_ended_total", {{"reason", "peer_exited"}}), 1);
  r.session_ended(other, "stopped", other.counts());
}

// Many sessions start and end while scrapers run: every scrape sees totals
// that never decrease, and the last one sees every session exactly once.
TEST(Registry, ScrapesRacingSessionEndsNeverSeeCountersGoBack) {
  Registry r(kReasons);
  constexpr int kSessions = 400;
  std::vector<std::unique_ptr<FakeSession>> sessions;
  for (int i = 0; i < kSessions; ++i) sessions.push_back(std::make_unique<FakeSession>(i + 1));
  std::atomic<bool> done{false};
  std::vector<std::thread> scrapers;
  std::atomic<int> scrapes{0};
  for (int t = 0; t < 2; ++t) {
    scrapers.emplace_back([&] {
      uint64_t last_faults = 0, last_ended = 0;
      while (!done.load()) {
        const Registry::Snapshot s = r.snapshot();
        uint64_t ended = 0;
        for (const auto& [reason, n] : s.sessions_ended) ended += n;
        EXPECT_GE(s.totals.faults, last_faults);
        EXPECT_GE(ended, last_ended);
        EXPECT_EQ(s.sessions_started, ended + s.sessions_live);
        last_faults = s.totals.faults;
        last_ended = ended;
        scrapes.fetch_add(1);
      }
    });
  }
  for (auto& s : sessions) r.session_started(*s);
  for (auto& s : sessions) r.session_ended(*s, "socket_closed", s->counts());
  while (scrapes.load() < 4) std::this_thread::yield();  // at least a few scrapes ran (ordering, not timing)
  done.store(true);
  for (auto& t : scrapers) t.join();
  const Registry::Snapshot s = r.snapshot();
  EXPECT_EQ(s.totals.faults, uint64_t{kSessions} * (kSessions + 1) / 2);
  EXPECT_EQ(s.sessions_live, 0u);
  EXPECT_EQ(s.sessions_started, uint64_t{kSessions});
}

TEST(Registry, RefusedHandshakesAreCountedByCause) {
  Registry r(kReasons);
  r.handshake_refused(RefusalCause::kHandshakeFailed);
  r.handshake_refused(RefusalCause::kHandshakeFailed);
  r.handshake_refused(RefusalCause::kTooManySessions);
  r.handshake_refused(RefusalCause::kHandshakeTimeout);
  auto f = scrape(r);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "handshake_failed"}}), 2);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "too_many_sessions"}}), 1);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "handshake_timeout"}}), 1);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "session_rejected"}}), 0);
  EXPECT_EQ(value(f, "faultline_handshakes_refused_total", {{"cause", "peer_not_allowed"}}), 0);
}

TEST(Registry, AnEndReasonNotDeclaredIsAddedWhenFirstSeen) {
  Registry r({"stopped"});
  FakeSession a(1);
  r.session_started(a);
  r.session_ended(a, "something_new", a.counts());
  auto f = scrape(r);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "stopped"}}), 0);
  EXPECT_EQ(value(f, "faultline_sessions_ended_total", {{"reason", "something_new"}}), 1);
}

}  // namespace
}  // namespace faultline::metrics
