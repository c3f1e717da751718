// Events a client may enable beyond REMOVE: UNMAP stops serving the range,
// REMAP moves it (same snapshot bytes at the new address), FORK is refused
// with a clear error while the parent goes on being served.
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <cstring>
#include <future>

#include "client/firecracker_client.h"
#include "client/touch.h"
#include "client/uffd_setup.h"
#include "client/verifier.h"
#include "harness.h"

// LeakSanitizer's exit-time scan (run by a ptrace'd tracer) dies with SIGSEGV
// after UnmapStopsServingTheRange has munmapped part of a uffd-registered
// region, although every test passed and nothing leaked: leak checking is off
// for this program only. The AddressSanitizer checks themselves stay on.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }

namespace faultline::testing {
namespace {

class Events : public ::testing::Test {
 protected:
  void start(uint64_t extra_events) {
    auto c = client::FirecrackerClient::create(
        {.version = {1, 14}, .region_sizes = {16 * kMiB}, .extra_events = extra_events});
    ASSERT_TRUE(c) << c.error().describe();
    client_ = std::make_unique<client::FirecrackerClient>(std::move(*c));
    ASSERT_TRUE(client_->connect_and_send(h_.socket()));
    auto v = client::Verifier::open(h_.memory(), client_->guest_size(), client_->page_size());
    ASSERT_TRUE(v);
    verifier_ = std::move(*v);
    for (int i = 0; i < 10000 && h_.server().live_sessions().empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for the session to start
    }
    session_ = h_.server().session(h_.server().live_sessions().at(0).id);
  }
  void TearDown() override {
    if (client_) client_->close_socket();
    h_.wait_ended(1);
  }
  void read(std::vector<uint64_t> offsets) {
    auto r = client::touch_pages(*client_, *verifier_, offsets, client::Access::kRead);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u);
  }
  std::vector<uint8_t> snapshot(uint64_t offset) {
    std::vector<uint8_t> b(4096);
    std::ifstream f(h_.memory(), std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(reinterpret_cast<char*>(b.data()), 4096);
    return b;
  }

  ServerHarness h_{ServerHarness::Options{.memory_bytes = 16 * kMiB}};
  std::unique_ptr<client::FirecrackerClient> client_;
  std::unique_ptr<client::Verifier> verifier_;
  std::shared_ptr<Session> session_;
};

TEST_F(Events, UnmapStopsServingTheRange) {
  start(client::kExtraEventUnmap);
  read({0, 4096});
  // munmap blocks until the server has read the UNMAP event, not until the
  // reader has published the layout without the range (CI under TSan saw
  // the range still located right after munmap returned).
  ASSERT_EQ(::munmap(client_->guest_ptr(8 * kMiB), 4 * kMiB), 0);
  ASSERT_TRUE(eventually_true([&] { return session_->layout_changes() >= 1; }));
  const uint64_t first = 8 * kMiB / 4096;
  std::vector<uint64_t> gone{first, first + 1, first + 1023};
  auto report = session_->prefault(gone);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->installed_pages, 0u);
  EXPECT_EQ(report->skipped_unmapped + report->skipped_removed, 3u);
  EXPECT_FALSE(session_->layout()->locate(reinterpret_cast<uint64_t>(client_->guest_ptr(8 * kMiB))));
  read({4 * kMiB, 12 * kMiB + 4096});  // both sides of the hole are still served
  // Logged by the reader after it published the new layout.
  EXPECT_TRUE(eventually_true([&] { return h_.log().find("event=guest_unmap") != std::string::npos; })) << h_.log();
}

TEST_F(Events, RemapMovesTheRangeAndItsPages) {
  start(client::kExtraEventRemap);
  read({8 * kMiB});  // one page of the part that moves is already present
  void* target = ::mmap(nullptr, 4 * kMiB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(target, MAP_FAILED);
  void* moved = ::mremap(client_->guest_ptr(8 * kMiB), 4 * kMiB, 4 * kMiB, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  ASSERT_EQ(moved, target) << std::strerror(errno);
  auto* bytes = static_cast<uint8_t*>(moved);
  // Untouched pages of the moved part are served from their original offsets.
  for (uint64_t k : {1ull, 100ull, 1023ull}) {
    EXPECT_EQ(std::memcmp(bytes + k * 4096, snapshot(8 * kMiB + k * 4096).data(), 4096), 0) << "page " << k;
  }
  // The page that was present moved with its contents.
  EXPECT_EQ(std::memcmp(bytes, snapshot(8 * kMiB).data(), 4096), 0);
  read({0, 4 * kMiB});
  // Logged by the reader after it published the new layout.
  EXPECT_TRUE(eventually_true([&] { return h_.log().find("event=guest_remap") != std::string::npos; })) << h_.log();
  ::munmap(moved, 4 * kMiB);
}

// mremap growing part of a region moves it (REMAP: the layout follows), and
// the grown VMA keeps its registration over its new tail, which no region
// describes. A fault there was woken again and again, forever (found by
// review: 335 000 faults in 3 s, the touch never done); now the session
// ends fatal once the same page keeps faulting with no layout change.
TEST_F(Events, AFaultOnAGrownTailNoRegionDescribesEndsTheSessionFatal) {
  start(client::kExtraEventRemap);
  read({0});
  void* moved = ::mremap(client_->guest_ptr(8 * kMiB), 4 * kMiB, 8 * kMiB, MREMAP_MAYMOVE);
  ASSERT_NE(moved, MAP_FAILED) << std::strerror(errno);
  auto* tail = static_cast<volatile uint8_t*>(moved) + 4 * kMiB;
  auto touch = std::async(std::launch::async, [tail] { return *tail; });
  ASSERT_TRUE(eventually_true([&] { return session_->finished(); })) << "the fault was woken forever";
  const SessionSummary s = session_->summary();
  EXPECT_EQ(s.end, SessionEnd::kFatal);
  EXPECT_NE(s.error.find("lies outside every region"), std::string::npos) << s.error;
  // Nobody serves the VM now (--on-fatal leave): release its thread with a
  // zero page, as an orchestrator's next server would serve it.
  uffdio_zeropage z{};
  z.range.start = reinterpret_cast<uint64_t>(tail);
  z.range.len = 4096;
  ASSERT_EQ(::ioctl(client_->uffd(), UFFDIO_ZEROPAGE, &z), 0) << std::strerror(errno);
  EXPECT_EQ(touch.get(), 0);
  ::munmap(moved, 8 * kMiB);
}

TEST_F(Events, ForkIsRefusedWithAClearErrorAndTheParentIsStillServed) {
  start(client::kExtraEventFork);
  read({0});
  // fork() waits until the server has read the FORK event.
  pid_t child = ::fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  read({4096, 8 * kMiB});
  const std::string log = h_.log();
  EXPECT_NE(log.find("event=fork_refused"), std::string::npos) << log;
  EXPECT_NE(log.find("serves only the original process"), std::string::npos);
  EXPECT_EQ(h_.server().active_sessions(), 1u);
}

}  // namespace
}  // namespace faultline::testing
