// Deterministic race tests: each forces one ordering of guest accesses,
// REMOVEs (madvise) and server steps with gates (tests/race_harness.h), then
// checks the bytes the guest sees and the pagemap bits (63 present, 57
// uffd-wp). Every test runs on 4 KiB and 2 MiB pages, with and without a WP
// registration, touching memory from host threads and from KVM vCPUs.
#include <pthread.h>
#include <sys/mman.h>

#include <cstring>
#include <memory>

#include "client/firecracker_client.h"
#include "client/kvm/kvm_guest.h"
#include "client/test_memory_file.h"
#include "harness.h"
#include "kernel/process.h"
#include "kernel/uffd_abi.h"
#include "race_harness.h"

namespace faultline::testing {
namespace {

#if defined(__SANITIZE_THREAD__)
// Creating threads is what ThreadSanitizer makes slow (perf: most of the
// test's time in its per-thread context setup; 2000 threads took 12.7 s alone
// and 34-37 s in CI, for each of four modes). 500 still queue ~8 read batches
// of 64 fault messages (session.cc kReadBatch) for the reader to answer.
constexpr int kSamePageThreads = 500;
#elif defined(__SANITIZE_ADDRESS__)
// AddressSanitizer makes each thread's start cost ~0.6 ms here (16 s per mode
// in CI with 10000); 2000 queue ~31 read batches.
constexpr int kSamePageThreads = 2000;
#else
constexpr int kSamePageThreads = 10000;
#endif

struct RaceParam {
  bool huge;
  bool wp;
  bool vcpu;
};

std::string param_name(const ::testing::TestParamInfo<RaceParam>& info) {
  return std::string(info.param.huge ? "Huge2M" : "Small4K") + (info.param.wp ? "Wp" : "NoWp") +
         (info.param.vcpu ? "Vcpu" : "Host");
}

void PrintTo(const RaceParam& p, std::ostream* os) {
  *os << (p.huge ? "2 MiB" : "4 KiB") << (p.wp ? ", WP" : ", no WP") << (p.vcpu ? ", vCPU" : ", host thread");
}

struct Bits {
  bool present;
  bool wp;
};

class Race : public ::testing::TestWithParam<RaceParam> {
 public:
  void SetUp() override {
    const RaceParam p = GetParam();
    if (p.huge) {
      reservation_ = std::make_unique<HugePageReservation>(40);
      FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation_->ok(), reservation_->reason());
    }
    if (p.vcpu) FAULTLINE_REQUIRE_CAPABILITY("kvm", client::KvmGuest::available(), "no usable /dev/kvm");
    page_ = p.huge ? 2 * kMiB : 4096;
    const uint64_t region = p.huge ? 16 * kMiB : 8 * kMiB;
    ServerHarness::Options ho;
    ho.memory_bytes = 2 * region;
    ho.zero_fraction = 0;  // every snapshot page non-zero: a zero read is never a snapshot read
    server_ = std::make_unique<ServerHarness>(ho);
    // Two regions: x86 guests above 3 GiB have two, and REMOVEs may span them.
    auto c = client::FirecrackerClient::create(
        {.version = {1, 14}, .region_sizes = {region, region}, .huge_pages = p.huge, .wp_async = p.wp});
    ASSERT_TRUE(c) << c.error().describe();
    client_ = std::make_unique<client::FirecrackerClient>(std::move(*c));
    ASSERT_TRUE(client_->connect_and_send(server_->socket()));
    for (int i = 0; i < 10000 && server_->server().live_sessions().empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for the session to start
    }
    ASSERT_FALSE(server_->server().live_sessions().empty());
    session_ = server_->server().session(server_->server().live_sessions()[0].id);
    ASSERT_TRUE(session_);
    if (p.vcpu) {
      std::vector<client::GuestMemorySpan> spans;
      for (const auto& r : client_->regions()) {
        spans.push_back({reinterpret_cast<uint8_t*>(r.base_host_virt_addr), r.size});
      }
      auto g = client::KvmGuest::create(spans, kVcpus, page_);
      ASSERT_TRUE(g) << g.error().describe();
      kvm_ = std::make_unique<client::KvmGuest>(std::move(*g));
    }
  }

  void TearDown() override {
    test_hooks::clear_all();
    if (client_) client_->close_socket();
    if (server_ && client_) server_->wait_ended(1);
    kvm_.reset();
    session_.reset();
    client_.reset();
    server_.reset();
  }

  uint64_t pages() const { return client_->guest_size() / page_; }
  uint64_t offset(uint64_t page) const { return page * page_; }
  uint8_t* ptr(uint64_t page) const { return client_->guest_ptr(offset(page)); }
  uint64_t address(uint64_t page) const { return reinterpret_cast<uint64_t>(ptr(page)); }

  // What a page must hold.
  std::vector<uint8_t> snapshot(uint64_t page) const {
    std::vector<uint8_t> b(page_);
    std::ifstream f(server_->memory(), std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset(page)));
    f.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(page_));
    return b;
  }
  std::vector<uint8_t> zero() const { return std::vector<uint8_t>(page_, 0); }
  // After a write by this test's toucher over `base`.
  std::vector<uint8_t> written(std::vector<uint8_t> base, uint64_t page, uint64_t tag) const {
    if (GetParam().vcpu) {
      // A vCPU writes (tag, page offset) in the first 16 bytes.
      const uint64_t header[2] = {tag, offset(page)};
      std::memcpy(base.data(), header, sizeof header);
    } else {
      client::fill_write_pattern(tag, offset(page), base);
    }
    return base;
  }

  // The guest reads a page: host threads copy it whole; a vCPU reports its
  // first and last qword. Returns whether it matches `expected`.
  bool read_matches(uint64_t page, const std::vector<uint8_t>& expected, int vcpu = 0) {
    if (GetParam().vcpu) {
      const uint64_t off = offset(page);
      auto r = kvm_->run_touch(vcpu, std::span<const uint64_t>(&off, 1), client::VcpuAccess::kRead, 0);
      EXPECT_TRUE(r) << r.error().describe();
      if (!r) return false;
      uint64_t first, last;
      std::memcpy(&first, expected.data(), 8);
      std::memcpy(&last, expected.data() + page_ - 8, 8);
      return r->first_qword.at(0) == first && r->last_qword.at(0) == last;
    }
    std::vector<uint8_t> seen(page_);
    std::memcpy(seen.data(), ptr(page), page_);
    return seen == expected;
  }
  void write(uint64_t page, uint64_t tag, int vcpu = 0) {
    if (GetParam().vcpu) {
      const uint64_t off = offset(page);
      auto r = kvm_->run_touch(vcpu, std::span<const uint64_t>(&off, 1), client::VcpuAccess::kWrite, tag);
      EXPECT_TRUE(r) << r.error().describe();
      return;
    }
    std::vector<uint8_t> pattern(page_);
    client::fill_write_pattern(tag, offset(page), pattern);
    std::memcpy(ptr(page), pattern.data(), page_);
  }
  // madvise returns once the server has READ the REMOVE; the server records
  // it right after. Tests that look at server state wait for the record.
  void remove(uint64_t page, uint64_t count = 1) {
    const uint64_t before = session_->summary().counters.removes;
    auto r = client_->remove(offset(page), count * page_);
    ASSERT_TRUE(r) << r.error().describe();
    ASSERT_TRUE(wait_counter([&](const SessionCounters& c) { return c.removes > before; }));
  }
  Bits bits(uint64_t page) const {
    auto pm = kernel::read_pagemap(::getpid(), address(page), 1);
    EXPECT_TRUE(pm);
    const uint64_t e = pm ? (*pm)[0] : 0;
    return {(e & kPagemapPresent) != 0, (e & kPagemapUffdWp) != 0};
  }
  // Compares the page's current bytes without faulting it in. REQUIRES present.
  bool holds(uint64_t page, const std::vector<uint8_t>& expected) const {
    return std::memcmp(ptr(page), expected.data(), page_) == 0;
  }
  // Plants a sentinel in the snapshot file: if it is ever seen after a
  // REMOVE, stale snapshot data came back.
  void plant_sentinel(uint64_t page) {
    std::vector<uint8_t> sentinel(page_, 0xA5);
    std::ofstream f(server_->memory(), std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(static_cast<std::streamoff>(offset(page)));
    f.write(reinterpret_cast<const char*>(sentinel.data()), static_cast<std::streamsize>(page_));
  }
  SessionCounters counters() const { return session_->summary().counters; }
  bool wait_counter(const std::function<bool(const SessionCounters&)>& pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (pred(counters())) return true;
      std::this_thread::yield();
    }
    return false;
  }

  static constexpr int kVcpus = 8;
  uint64_t page_ = 4096;
  std::unique_ptr<HugePageReservation> reservation_;
  std::unique_ptr<ServerHarness> server_;
  std::unique_ptr<client::FirecrackerClient> client_;
  std::shared_ptr<Session> session_;
  std::unique_ptr<client::KvmGuest> kvm_;
};

TEST_P(Race, ReadRemoveReadGivesZero) {
  const uint64_t p = 3;
  EXPECT_TRUE(read_matches(p, snapshot(p)));
  EXPECT_TRUE(bits(p).present);
  EXPECT_EQ(bits(p).wp, GetParam().wp) << "a read install is write-protected exactly when WP is registered";
  remove(p);
  EXPECT_FALSE(bits(p).present);
  EXPECT_TRUE(read_matches(p, zero()));
  EXPECT_TRUE(bits(p).present);
  EXPECT_EQ(bits(p).wp, GetParam().wp) << "a zero install for a read is write-protected too";
}

TEST_P(Race, WriteRemoveWrite) {
  const uint64_t p = 4;
  write(p, 0x1111);
  EXPECT_TRUE(bits(p).present);
  EXPECT_FALSE(bits(p).wp);
  EXPECT_TRUE(holds(p, written(snapshot(p), p, 0x1111)));
  remove(p);
  EXPECT_FALSE(bits(p).present);
  write(p, 0x2222);
  EXPECT_TRUE(bits(p).present);
  EXPECT_FALSE(bits(p).wp);
  EXPECT_TRUE(holds(p, written(zero(), p, 0x2222))) << "the second write lands on zeros, not the snapshot";
}

// The outcomes a write and a REMOVE of a never-touched page, read by the
// server in one batch, may legally leave once both calls returned. The server
// records every REMOVE of a batch before it serves any fault of it, so the
// write's fault is served zero (never the snapshot), and the write lands on
// zeros. The madvising thread zaps the range only after its REMOVE was read
// (DESIGN.md §4), so that zap may come after the write landed: a madvise still
// in progress may take the write with it. Exactly two outcomes are legal:
//   - present, holding the write on zeros, not write-protected (installed for
//     a write, or its WP bit cleared by the write);
//   - not present (zapped after the write), and reading zero from then on.
// A present page of zeros is a lost write: the write returned, and nothing
// zapped the page after it. Snapshot bytes are stale data after a REMOVE.
void expect_write_on_zero_or_zapped(Race& t, uint64_t p, const std::vector<uint8_t>& write_on_zero) {
  const Bits b = t.bits(p);
  if (b.present) {
    EXPECT_TRUE(t.holds(p, write_on_zero)) << (t.holds(p, t.zero()) ? "a present page of zeros: the write was lost"
                                                                      : "the page holds neither the write nor zeros");
    EXPECT_FALSE(b.wp) << "a page the guest wrote is write-protected";
  } else {
    EXPECT_TRUE(t.read_matches(p, t.zero())) << "a page zapped by its REMOVE did not read zero";
  }
}

// REMOVE queued first, then a write fault on the same page: the write
// follows the REMOVE, so it must survive on zeros unless the zap (which
// follows the REMOVE's read) comes after it.
TEST_P(Race, RemoveThenWriteInOneBatch) {
  const uint64_t p = 5;
  ReaderPause pause;
  Actor remover([&] { remove(p); });
  ASSERT_TRUE(pause.wait_arrived());
  ASSERT_TRUE(remover.wait_blocked(UffdWait::kRemoveEvent));
  Actor writer([&] { write(p, 0x3333); });
  ASSERT_TRUE(writer.wait_blocked(UffdWait::kFault));
  pause.release();  // the REMOVE and the fault are read as one batch
  remover.join();
  writer.join();
  expect_write_on_zero_or_zapped(*this, p, written(zero(), p, 0x3333));
}

// A write fault queued first, then a REMOVE of its page: the server, having
// read the REMOVE in the same batch, serves the fault zero (the snapshot
// bytes are stale); the write lands on zeros, or the zap that follows the
// REMOVE takes it.
TEST_P(Race, WriteThenRemoveInOneBatch) {
  const uint64_t p = 6;
  ReaderPause pause;
  Actor writer([&] { write(p, 0x4444); });
  ASSERT_TRUE(pause.wait_arrived());
  ASSERT_TRUE(writer.wait_blocked(UffdWait::kFault));
  Actor remover([&] { remove(p); });
  ASSERT_TRUE(remover.wait_blocked(UffdWait::kRemoveEvent));
  pause.release();
  writer.join();
  remover.join();
  expect_write_on_zero_or_zapped(*this, p, written(zero(), p, 0x4444));
}

TEST_P(Race, FaultReadBeforeItsCausallyPrecedingRemoveServesZero) {
  // The REMOVE is queued first; the fault after it is read first (the kernel
  // hands out faults before events) in the same batch.
  const uint64_t p = 7;
  plant_sentinel(p);
  ReaderPause pause;
  Actor remover([&] { remove(p); });
  ASSERT_TRUE(pause.wait_arrived());
  ASSERT_TRUE(remover.wait_blocked(UffdWait::kRemoveEvent));
  bool zero_read = false;
  Actor reader([&] { zero_read = read_matches(p, zero()); });
  ASSERT_TRUE(reader.wait_blocked(UffdWait::kFault));
  pause.release();
  reader.join();
  remover.join();
  EXPECT_TRUE(zero_read) << "the read after a queued REMOVE returned snapshot bytes";
  EXPECT_FALSE(holds(p, snapshot(p)));
}

TEST_P(Race, StaleSnapshotNeverReturnsAfterRemoveAndMadviseIsNotHeldByAParkedInstall) {
  const uint64_t p = 8;
  plant_sentinel(p);
  InstallPark park(HookPoint::kBeforeInstallIoctl, address(p));
  bool zero_read = false;
  Actor reader([&] { zero_read = read_matches(p, zero()); });
  ASSERT_TRUE(park.wait_parked());  // the worker staged the sentinel and waits before the ioctl
  Actor remover([&] { remove(p); });
  EXPECT_TRUE(remover.finishes_within(std::chrono::seconds(2))) << "madvise was held by a parked install";
  park.release();
  reader.join();
  remover.join();
  EXPECT_TRUE(zero_read) << "stale snapshot bytes came back after the REMOVE";
  EXPECT_TRUE(bits(p).present);
  EXPECT_EQ(bits(p).wp, GetParam().wp);
  EXPECT_TRUE(holds(p, zero()));
}

TEST_P(Race, FaultDeferredByAPendingRemoveIsRetriedAndServesZero) {
  // The install meets a REMOVE that is queued but unread: EAGAIN. The fault
  // must be retried after the reader reads the REMOVE, and then serve zero.
  const uint64_t p = 9;
  plant_sentinel(p);
  auto park = std::make_unique<InstallPark>(HookPoint::kBeforeInstallIoctl, address(p));
  bool zero_read = false;
  Actor reader([&] { zero_read = read_matches(p, zero()); });
  ASSERT_TRUE(park->wait_parked());
  ReaderPause pause;
  Actor remover([&] { remove(p); });
  ASSERT_TRUE(pause.wait_arrived());
  ASSERT_TRUE(remover.wait_blocked(UffdWait::kRemoveEvent));
  const uint64_t retries_before = counters().retries;
  park->release();
  ASSERT_TRUE(wait_counter([&](const SessionCounters& c) { return c.retries > retries_before; }))
      << "the install did not meet EAGAIN";
  pause.release();
  reader.join();
  remover.join();
  EXPECT_TRUE(zero_read);
  EXPECT_TRUE(holds(p, zero()));
}

TEST_P(Race, PrefaultRacingARemoveNeverBringsTheRemovedPagesBack) {
  const uint64_t p = 10;
  plant_sentinel(p);
  plant_sentinel(p + 1);
  InstallPark park(HookPoint::kBeforePrefaultInstall, address(p));
  Result<PrefaultReport> report;
  Actor prefaulter([&] {
    const uint64_t first = session_->layout()->locate(address(p))->page_index;
    std::vector<uint64_t> run{first, first + 1, first + 2, first + 3};
    report = session_->prefault(run);
  });
  ASSERT_TRUE(park.wait_parked());  // the run is staged, sentinels included
  Actor remover([&] { remove(p, 2); });
  EXPECT_TRUE(remover.finishes_within(std::chrono::seconds(2))) << "madvise was held by a parked prefault";
  park.release();
  prefaulter.join();
  remover.join();
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->installed_pages, 2u);
  EXPECT_FALSE(bits(p).present);
  EXPECT_FALSE(bits(p + 1).present);
  for (uint64_t q : {p + 2, p + 3}) {
    EXPECT_TRUE(bits(q).present);
    EXPECT_EQ(bits(q).wp, GetParam().wp) << "prefetched pages are protected like read installs";
    EXPECT_TRUE(holds(q, snapshot(q)));
  }
  EXPECT_TRUE(read_matches(p, zero()));
  EXPECT_TRUE(read_matches(p + 1, zero()));
}

TEST_P(Race, PrefaultNeverOverwritesAWrittenPageNorRevivesARemovedOne) {
  const uint64_t p = 11;
  write(p, 0x5555);
  read_matches(p + 1, snapshot(p + 1));
  remove(p + 1);
  const uint64_t first = session_->layout()->locate(address(p))->page_index;
  std::vector<uint64_t> run{first, first + 1, first + 2};
  auto report = session_->prefault(run);
  ASSERT_TRUE(report);
  EXPECT_EQ(report->installed_pages, 1u);
  EXPECT_EQ(report->skipped_present, 1u);
  EXPECT_EQ(report->skipped_removed, 1u);
  EXPECT_TRUE(holds(p, written(snapshot(p), p, 0x5555)));
  EXPECT_FALSE(bits(p + 1).present);
  EXPECT_TRUE(read_matches(p + 1, zero()));
  EXPECT_TRUE(holds(p + 2, snapshot(p + 2)));
}

// A fault is read and handed to a worker. Before the worker installs, another
// install (here a prefault; fault-around windows and readahead do the same)
// puts the page in and wakes the faulting thread, which reads on; the guest
// then removes the page. The worker's fault is stale: serving it (zeros, the
// page being removed) would make the removed page present again and, under
// WP, dirty. It is answered with a wake only.
TEST_P(Race, AFaultWhoseThreadAnotherInstallWokeIsOnlyWokenOnceItsPageWasRemoved) {
  const uint64_t p = 12;
  InstallPark park(HookPoint::kBeforeInstallIoctl, address(p));
  bool snapshot_read = false;
  Actor reader([&] { snapshot_read = read_matches(p, snapshot(p)); });
  ASSERT_TRUE(park.wait_parked());  // the fault was read; its worker waits before its install
  const uint64_t index = session_->layout()->locate(address(p))->page_index;
  std::vector<uint64_t> run{index};
  PrefaultOptions options;
  options.yield_to_demand = false;  // the parked fault is a demand fault being served
  auto report = session_->prefault(run, options);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->installed_pages, 1u);
  reader.join();  // woken by the prefault's install
  EXPECT_TRUE(snapshot_read);
  remove(p);
  EXPECT_FALSE(bits(p).present);
  EXPECT_EQ(counters().stale_faults, 0u);
  const uint64_t zeros_before = counters().pages_zero;
  park.release();
  // The worker is done with the fault either way: woken, or (wrongly) served zeros.
  ASSERT_TRUE(
      wait_counter([&](const SessionCounters& c) { return c.stale_faults + c.pages_zero > zeros_before; }));
  EXPECT_FALSE(bits(p).present) << "a stale fault brought the removed page back";
  EXPECT_EQ(counters().stale_faults, 1u);
  EXPECT_EQ(counters().pages_zero, zeros_before);
  // A thread that faults on the page now gets zeros, as after any REMOVE.
  EXPECT_TRUE(read_matches(p, zero()));
  EXPECT_TRUE(bits(p).present);
  EXPECT_EQ(counters().stale_faults, 1u);
}

TEST_P(Race, PrefaultFillsSmallGapsButNeverARemovedPage) {
  const bool small = !GetParam().huge;  // gap filling is for 4 KiB pages only
  const uint64_t first = session_->layout()->locate(address(0))->page_index;
  PrefaultOptions options;
  options.max_gap_pages = 4;
  // A removed page in a gap ends the run: nothing crosses it.
  remove(1);
  std::vector<uint64_t> plan{first, first + 3};
  auto report = session_->prefault(plan, options);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->installed_pages, 2u);
  EXPECT_FALSE(bits(1).present) << "gap filling revived a removed page";
  EXPECT_FALSE(bits(2).present) << "a run starts on a planned page";
  // Gaps up to the limit are filled with snapshot pages; larger ones are not.
  plan = {first + 5, first + 8, first + 14};
  report = session_->prefault(plan, options);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->installed_pages, small ? 5u : 3u);
  for (uint64_t q : {6ull, 7ull}) {
    EXPECT_EQ(bits(q).present, small) << q;
    if (small) {
      EXPECT_TRUE(holds(q, snapshot(q)));
    }
  }
  EXPECT_FALSE(bits(9).present) << "a gap of 5 is above the limit of 4";
  for (uint64_t q : {0ull, 3ull, 5ull, 8ull, 14ull}) {
    EXPECT_TRUE(bits(q).present) << q;
    EXPECT_TRUE(holds(q, snapshot(q))) << q;
  }
  EXPECT_TRUE(read_matches(1, zero()));
}

TEST_P(Race, ZeroFillForAReadIsProtectedEvenAfterAnInjectedFailure) {
  const uint64_t p = 12;
  remove(p);  // never touched: its next fault serves zero
  const uint64_t retries_before = counters().retries;
  // The first zero install fails as if a REMOVE were pending; the retry must
  // still install zeros and protect them in one step.
  InstallPark inject(HookPoint::kBeforeInstallIoctl, address(p), false, EAGAIN);
  EXPECT_TRUE(read_matches(p, zero()));
  EXPECT_TRUE(inject.injected());
  EXPECT_GT(counters().retries, retries_before);
  EXPECT_TRUE(bits(p).present);
  EXPECT_EQ(bits(p).wp, GetParam().wp) << "the zero page was left unprotected";
}

TEST_P(Race, EagainStormEveryDeferredFaultIsServed) {
  constexpr int kFaults = 24;
  auto park = std::make_unique<InstallPark>(HookPoint::kBeforeInstallIoctl, 0, true);
  std::vector<std::unique_ptr<Actor>> readers;
  std::atomic<int> good{0};
  const uint64_t faults_before = counters().faults;
  for (int i = 0; i < kFaults; ++i) {
    const uint64_t p = 1 + static_cast<uint64_t>(i) % (pages() - 2);  // never the page removed below
    const bool by_vcpu = GetParam().vcpu && i < kVcpus;
    readers.push_back(std::make_unique<Actor>([&, p, by_vcpu, i] {
      // Reads by host threads always; the first few by vCPUs in vCPU runs.
      bool ok;
      if (by_vcpu) {
        ok = read_matches(p, snapshot(p), i);
      } else {
        std::vector<uint8_t> seen(page_);
        std::memcpy(seen.data(), ptr(p), page_);
        ok = seen == snapshot(p);
      }
      good += ok;
    }));
  }
  ASSERT_TRUE(park->wait_parked(1));
  ASSERT_TRUE(wait_counter([&](const SessionCounters& c) { return c.faults >= faults_before + kFaults; }));
  ReaderPause pause;
  Actor remover([&] { remove(pages() - 1); });  // a REMOVE that stays unread
  ASSERT_TRUE(pause.wait_arrived());
  ASSERT_TRUE(remover.wait_blocked(UffdWait::kRemoveEvent));
  const uint64_t retries_before = counters().retries;
  park->release();  // every install now meets EAGAIN and is deferred
  ASSERT_TRUE(wait_counter([&](const SessionCounters& c) { return c.retries >= retries_before + kFaults; }));
  pause.release();
  for (auto& r : readers) r->join();
  remover.join();
  EXPECT_EQ(good.load(), kFaults);
  std::printf("EAGAIN storm: %d faults, %llu retries\n", kFaults,
              static_cast<unsigned long long>(counters().retries - retries_before));
}

TEST_P(Race, ThousandsOfConcurrentFaultsOnOnePage) {
  const uint64_t p = 13;
  const std::vector<uint8_t> expected = snapshot(p);
  uint64_t first_q, last_q;
  std::memcpy(&first_q, expected.data(), 8);
  std::memcpy(&last_q, expected.data() + page_ - 8, 8);
  ReaderPause pause;
  const int threads = kSamePageThreads;
  std::vector<pid_t> tids(threads, 0);
  std::atomic<int> started{0}, good{0};
  struct Arg {
    Race* t;
    uint64_t p;
    uint64_t first, last;
    std::atomic<int>* started;
    std::atomic<int>* good;
    pid_t* tid;
  };
  std::vector<Arg> args(threads);
  std::vector<pthread_t> handles(threads);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  for (int i = 0; i < threads; ++i) {
    args[i] = {this, p, first_q, last_q, &started, &good, &tids[i]};
    ASSERT_EQ(pthread_create(
                  &handles[i], &attr,
                  [](void* a) -> void* {
                    auto* arg = static_cast<Arg*>(a);
                    *arg->tid = current_tid();
                    arg->started->fetch_add(1);
                    const volatile uint64_t* q = reinterpret_cast<const volatile uint64_t*>(arg->t->ptr(arg->p));
                    const uint64_t f = q[0];
                    const uint64_t l = q[arg->t->page_ / 8 - 1];
                    if (f == arg->first && l == arg->last) arg->good->fetch_add(1);
                    return nullptr;
                  },
                  &args[i]),
              0);
  }
  pthread_attr_destroy(&attr);
  // vCPUs join the crowd in vCPU runs.
  std::vector<std::unique_ptr<Actor>> vcpus;
  std::atomic<int> vcpu_good{0};
  if (GetParam().vcpu) {
    for (int v = 0; v < kVcpus; ++v) {
      vcpus.push_back(std::make_unique<Actor>([&, v] { vcpu_good += read_matches(p, expected, v); }));
    }
  }
  ASSERT_TRUE(pause.wait_arrived());
  while (started.load() < threads) std::this_thread::yield();
  // With the reader paused nothing wakes a thread that waits in the uffd, so
  // each thread is checked until it is seen waiting, not on every pass.
  int blocked = 0;
  std::vector<bool> seen_waiting(threads, false);
  for (int spins = 0; spins < 1000 && blocked < threads; ++spins) {
    for (int i = 0; i < threads; ++i) {
      if (!seen_waiting[i] && thread_waits_in(tids[i], UffdWait::kFault)) {
        seen_waiting[i] = true;
        ++blocked;
      }
    }
  }
  for (auto& v : vcpus) ASSERT_TRUE(v->wait_blocked(UffdWait::kFault));
  EXPECT_EQ(blocked, threads) << "not every thread was waiting on the page when the reader resumed";
  pause.release();
  for (auto& h : handles) pthread_join(h, nullptr);
  for (auto& v : vcpus) v->join();
  EXPECT_EQ(good.load(), threads);
  EXPECT_EQ(vcpu_good.load(), static_cast<int>(vcpus.size()));
  // The server counts an install just after the ioctl that woke everyone.
  ASSERT_TRUE(wait_counter([](const SessionCounters& k) { return k.pages_snapshot >= 1; }));
  const SessionCounters c = counters();
  EXPECT_EQ(c.pages_snapshot, 1u) << "one install for the page, every other fault only woken";
  std::printf("%d concurrent faults on one page: %llu fault messages, %llu already present\n", threads,
              static_cast<unsigned long long>(c.faults), static_cast<unsigned long long>(c.already_present));
}

TEST_P(Race, UnalignedRemoveAcrossTheTwoRegionsDropsOnlyWholePages) {
  const uint64_t boundary = pages() / 2;  // first page of region 1
  for (uint64_t q = boundary - 2; q < boundary + 2; ++q) EXPECT_TRUE(read_matches(q, snapshot(q)));
  // From the middle of page boundary-2 to the middle of page boundary+1:
  // whole pages inside are boundary-1 (region 0) and boundary (region 1).
  const uint64_t start = offset(boundary - 2) + page_ / 2;
  const uint64_t end = offset(boundary + 1) + page_ / 2;
  auto removed = client_->remove(start, end - start);
  ASSERT_TRUE(removed) << removed.error().describe();
  EXPECT_TRUE(bits(boundary - 2).present);
  EXPECT_TRUE(holds(boundary - 2, snapshot(boundary - 2)));
  EXPECT_FALSE(bits(boundary - 1).present);
  EXPECT_FALSE(bits(boundary).present);
  EXPECT_TRUE(bits(boundary + 1).present);
  EXPECT_TRUE(holds(boundary + 1, snapshot(boundary + 1)));
  EXPECT_TRUE(read_matches(boundary - 1, zero()));
  EXPECT_TRUE(read_matches(boundary, zero()));
}

TEST_P(Race, WriteProtectTableAndDirtyQuery) {
  const bool wp = GetParam().wp;
  // page: sequence of accesses -> (present, wp) and dirty / zero / removed
  const uint64_t read_only = 0, write_only = 1, read_write = 2, write_read = 3, interleaved = 4, removed_read = 5,
                 written_removed_read = 6, written_removed_written = 7, removed_only = 8;
  EXPECT_TRUE(read_matches(read_only, snapshot(read_only)));
  write(write_only, 1);
  EXPECT_TRUE(read_matches(read_write, snapshot(read_write)));
  write(read_write, 2);
  write(write_read, 3);
  EXPECT_TRUE(read_matches(write_read, written(snapshot(write_read), write_read, 3)));
  EXPECT_TRUE(read_matches(interleaved, snapshot(interleaved)));
  write(interleaved, 4);
  EXPECT_TRUE(read_matches(interleaved, written(snapshot(interleaved), interleaved, 4)));
  write(interleaved, 5);
  EXPECT_TRUE(read_matches(removed_read, snapshot(removed_read)));
  remove(removed_read);
  EXPECT_TRUE(read_matches(removed_read, zero()));
  write(written_removed_read, 6);
  remove(written_removed_read);
  EXPECT_TRUE(read_matches(written_removed_read, zero()));
  write(written_removed_written, 7);
  remove(written_removed_written);
  write(written_removed_written, 8);
  EXPECT_TRUE(read_matches(removed_only, snapshot(removed_only)));
  remove(removed_only);

  struct Row {
    uint64_t page;
    bool present, wp_bit, dirty;
  } table[] = {
      {read_only, true, wp, !wp},  // without WP a present page cannot be told clean
      {write_only, true, false, true},
      {read_write, true, false, true},
      {write_read, true, false, true},
      {interleaved, true, false, true},
      {removed_read, true, wp, !wp},
      {written_removed_read, true, wp, !wp},
      {written_removed_written, true, false, true},
      // On hugetlbfs the kernel keeps a uffd-wp marker in place of a zapped
      // protected entry, and pagemap reports it: not present, wp set.
      {removed_only, false, wp && GetParam().huge, false},
  };
  for (const Row& r : table) {
    const Bits b = bits(r.page);
    EXPECT_EQ(b.present, r.present) << "page " << r.page;
    EXPECT_EQ(b.wp, r.wp_bit) << "page " << r.page;
  }
  for (bool fallback : {false, true}) {
    auto map = session_->page_map(fallback);
    ASSERT_TRUE(map) << map.error().describe();
    EXPECT_EQ(map->write_protect, wp);
    auto in = [&](const std::vector<FileRange>& ranges, uint64_t page) {
      for (const FileRange& f : ranges) {
        if (offset(page) >= f.offset && offset(page) < f.offset + f.length) return true;
      }
      return false;
    };
    for (const Row& r : table) {
      EXPECT_EQ(in(map->dirty, r.page), r.dirty) << "page " << r.page << (fallback ? " (pagemap)" : " (scan)");
    }
    // Zero installs the guest did not write are zero (with WP, where clean is knowable).
    EXPECT_EQ(in(map->zero, removed_read), wp);
    EXPECT_EQ(in(map->zero, written_removed_read), wp);
    EXPECT_TRUE(in(map->removed, removed_only));
    EXPECT_EQ(map->method, fallback ? kernel::ScanMethod::kPagemap : kernel::ScanMethod::kPagemapScan);
  }
}

INSTANTIATE_TEST_SUITE_P(AllModes, Race,
                         ::testing::Values(RaceParam{false, false, false}, RaceParam{false, true, false},
                                           RaceParam{false, false, true}, RaceParam{false, true, true},
                                           RaceParam{true, false, false}, RaceParam{true, true, false},
                                           RaceParam{true, false, true}, RaceParam{true, true, true}),
                         param_name);

}  // namespace
}  // namespace faultline::testing
