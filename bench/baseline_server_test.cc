// faultline-baseline-server, in both designs, met as Firecracker meets a uffd
// handler: a separate process, the real handshake (client::FirecrackerClient),
// and the bench's own way of starting and reading it (BaselineProcess). Every
// byte of a two-region guest is checked against the memory file, a REMOVE'd
// page must read zero, and the server must exit when its client goes away.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "bench/baseline_process.h"
#include "client/firecracker_client.h"
#include "client/test_memory_file.h"
#include "common/unique_fd.h"

namespace faultline::bench {
namespace {

constexpr uint64_t kSeed = 21;
constexpr double kZeroFraction = 0.25;
// Two regions, as an x86 guest above the MMIO hole has: the second one's
// pages come from file offset kRegion, not 0.
constexpr uint64_t kRegion = 64 * kPageSize4K;

class BaselineServerTest : public ::testing::TestWithParam<BaselineMode> {
 protected:
  void SetUp() override {
    static std::atomic<int> seq{0};
    dir_ = std::filesystem::temp_directory_path() /
           ("faultline-baseline-test-" + std::to_string(::getpid()) + "-" + std::to_string(seq++));
    std::filesystem::create_directories(dir_);
    memory_ = (dir_ / "memory").string();
    ASSERT_TRUE(client::write_test_memory_file(memory_, 2 * kRegion, kSeed, kZeroFraction));
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string socket() const { return (dir_ / "baseline.sock").string(); }

  // The bytes the memory file holds at `offset` (one 4 KiB page).
  std::vector<uint8_t> file_page(uint64_t offset) const {
    std::vector<uint8_t> page(kPageSize4K);
    client::fill_test_page(offset / kPageSize4K, kSeed, kZeroFraction, page);
    return page;
  }

  static client::FirecrackerClient make_client() {
    client::ClientConfig cc;
    cc.version = {1, 14};
    cc.region_sizes = {kRegion, kRegion};
    auto c = client::FirecrackerClient::create(cc);
    EXPECT_TRUE(c) << c.error().describe();
    return std::move(*c);
  }

  std::filesystem::path dir_;
  std::string memory_;
};

TEST_P(BaselineServerTest, ServesEveryByteOfTheMemoryFileAndZerosARemovedPage) {
  auto server = BaselineProcess::start(GetParam(), memory_, socket());
  ASSERT_TRUE(server) << server.error().describe();
  client::FirecrackerClient guest = make_client();
  ASSERT_TRUE(guest.connect_and_send((*server)->socket_path()));
  ASSERT_TRUE((*server)->wait_serving(std::chrono::seconds(10)));
  // The removed-page map (one byte a page) and two page buffers.
  EXPECT_EQ((*server)->state_bytes(), 2 * kRegion / kPageSize4K + 2 * kPageSize4K);

  // This thread's first read of each page faults; the other process serves it.
  size_t zero_pages = 0;
  for (uint64_t off = 0; off < guest.guest_size(); off += kPageSize4K) {
    const std::vector<uint8_t> want = file_page(off);
    ASSERT_EQ(std::memcmp(guest.guest_ptr(off), want.data(), kPageSize4K), 0) << "page at guest offset " << off;
    zero_pages += client::test_page_is_zero(off / kPageSize4K, kSeed, kZeroFraction) ? 1 : 0;
  }
  ASSERT_LT(zero_pages, guest.page_count());  // the check saw real content, not just zeros

  // A page of content in the second region, removed as the balloon does:
  // madvise returns once the server has read the REMOVE; the next read faults
  // again and must be served zeros, not the file.
  uint64_t removed = kRegion;
  while (client::test_page_is_zero(removed / kPageSize4K, kSeed, kZeroFraction)) removed += kPageSize4K;
  auto r = guest.remove(removed, kPageSize4K);
  ASSERT_TRUE(r) << r.error().describe();
  ASSERT_EQ(r->size(), 1u);
  const std::vector<uint8_t> zeros(kPageSize4K, 0);
  EXPECT_EQ(std::memcmp(guest.guest_ptr(removed), zeros.data(), kPageSize4K), 0);
  // Its neighbours keep the file's bytes.
  for (uint64_t off : {removed - kPageSize4K, removed + kPageSize4K}) {
    EXPECT_EQ(std::memcmp(guest.guest_ptr(off), file_page(off).data(), kPageSize4K), 0) << off;
  }

  guest.close_socket();  // Firecracker exits
  auto stats = (*server)->wait_exit(std::chrono::seconds(10));
  ASSERT_TRUE(stats) << stats.error().describe();
  EXPECT_EQ(stats->faults, guest.page_count() + 1);  // every page once, the removed one again
  EXPECT_EQ(stats->removes, 1u);
  EXPECT_EQ(stats->reason, "the client closed its socket");
}

TEST_P(BaselineServerTest, ExitsWhenTheClientClosesItsSocket) {
  auto server = BaselineProcess::start(GetParam(), memory_, socket());
  ASSERT_TRUE(server) << server.error().describe();
  client::FirecrackerClient guest = make_client();
  ASSERT_TRUE(guest.connect_and_send((*server)->socket_path()));
  ASSERT_TRUE((*server)->wait_serving(std::chrono::seconds(10)));
  const pid_t pid = (*server)->pid();
  ASSERT_GT(pid, 0);

  guest.close_socket();  // nothing touched: the server is idle (asleep or spinning)
  auto stats = (*server)->wait_exit(std::chrono::seconds(10));
  ASSERT_TRUE(stats) << stats.error().describe();  // an exit line and exit status 0
  EXPECT_EQ(stats->faults, 0u);
  EXPECT_EQ(stats->reason, "the client closed its socket");
  // wait_exit() reaped it: the pid is no child of this process any more.
  EXPECT_EQ((*server)->pid(), -1);
  EXPECT_FALSE(std::filesystem::exists(socket())) << "the listener removes its socket file at exit";
}

TEST_P(BaselineServerTest, ReportsAClientThatSentNoHandshakeAsAnError) {
  auto server = BaselineProcess::start(GetParam(), memory_, socket());
  ASSERT_TRUE(server) << server.error().describe();
  {
    // Connects and closes without sending anything: no handshake.
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket().c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(::connect(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  auto serving = (*server)->wait_serving(std::chrono::seconds(10));
  ASSERT_FALSE(serving);
  EXPECT_NE(serving.error().message.find("faultline-baseline-server failed: handshake"), std::string::npos)
      << serving.error().message;
}

INSTANTIATE_TEST_SUITE_P(Modes, BaselineServerTest, ::testing::Values(BaselineMode::kNaive, BaselineMode::kBusyPoll),
                         [](const auto& info) { return info.param == BaselineMode::kNaive ? "Naive" : "BusyPoll"; });

}  // namespace
}  // namespace faultline::bench
