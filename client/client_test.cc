// Tests of the Firecracker-faithful client: what it sends, how it sets up the
// uffd, and that its touches and verification catch what a server gets wrong.
// End-to-end tests use TestFaultServer (a minimal server in this directory),
// not faultline's server.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "client/byte_size.h"
#include "client/firecracker_client.h"
#include "client/handshake.h"
#include "client/huge_page_reservation.h"
#include "client/restore_scenario.h"
#include "client/test_fault_server.h"
#include "client/test_memory_file.h"
#include "client/touch.h"
#include "client/uffd_setup.h"
#include "client/vcpu_touch.h"
#include "client/verifier.h"
#include "client/version.h"
#include "tests/capability.h"
#include "tests/temp_dir.h"

namespace faultline::client {
namespace {

constexpr uint64_t kMiB = 1ull << 20;

// /proc/self/pagemap entry of `address`: bit 63 present, bit 57 uffd-wp.
uint64_t pagemap_entry(const void* address) {
  UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  uint64_t entry = 0;
  const off_t at = static_cast<off_t>(reinterpret_cast<uint64_t>(address) / 4096 * 8);
  EXPECT_EQ(::pread(fd.get(), &entry, 8, at), 8);
  return entry;
}
bool present(const void* address) { return (pagemap_entry(address) >> 63) & 1; }
bool uffd_wp(const void* address) { return (pagemap_entry(address) >> 57) & 1; }

using faultline::testing::TempDir;

FirecrackerClient make_client(ClientConfig config) {
  auto client = FirecrackerClient::create(config);
  EXPECT_TRUE(client.has_value()) << client.error().describe();
  return std::move(*client);
}

// Receives everything until the JSON array is complete; returns it and the fds.
std::string receive_handshake(int socket, std::vector<int>& fds, std::vector<size_t>* piece_sizes = nullptr) {
  auto json = testing::read_handshake(socket, fds, piece_sizes);
  EXPECT_TRUE(json) << json.error().describe();
  return json ? *json : std::string();
}

// ---------------------------------------------------------------- versions

TEST(FirecrackerVersion, ComparesNumericallyNotTextually) {
  auto v1_9 = FirecrackerVersion::parse("1.9");
  auto v1_12 = FirecrackerVersion::parse("v1.12.1");
  ASSERT_TRUE(v1_9 && v1_12);
  EXPECT_LT(*v1_9, *v1_12);
  EXPECT_FALSE(v1_9->at_least(1, 12));
  EXPECT_TRUE(v1_12->at_least(1, 12));
  EXPECT_TRUE(v1_12->at_least(1, 7));
  EXPECT_TRUE((FirecrackerVersion{2, 0}.at_least(1, 14)));
  EXPECT_FALSE((FirecrackerVersion{0, 25}.at_least(1, 1)));
  EXPECT_EQ(v1_12->to_string(), "1.12");
}

TEST(FirecrackerVersion, GatesFollowTheReleases) {
  EXPECT_FALSE((FirecrackerVersion{1, 6}.sends_page_size_kib()));
  EXPECT_TRUE((FirecrackerVersion{1, 7}.sends_page_size_kib()));
  EXPECT_FALSE((FirecrackerVersion{1, 11}.sends_page_size()));
  EXPECT_TRUE((FirecrackerVersion{1, 12}.sends_page_size()));
  EXPECT_FALSE((FirecrackerVersion{1, 11}.keeps_socket_open()));
  EXPECT_TRUE((FirecrackerVersion{1, 12}.keeps_socket_open()));
}

TEST(FirecrackerVersion, RejectsMalformedText) {
  for (const char* bad : {"", "1", "1.", "x1.2", "1.2.", "1.2.3.4", "1.-2", "1.2beta"}) {
    EXPECT_FALSE(FirecrackerVersion::parse(bad).has_value()) << bad;
  }
}

// ---------------------------------------------------------------- handshake JSON

const std::vector<GuestRegion> kFourKiBRegions = {
    {140000000000000, 67108864, 0, kPageSize4K},
    {140000100000000, 33554432, 67108864, kPageSize4K},
};
const std::vector<GuestRegion> kTwoMiBRegions = {{140000000000000, 67108864, 0, kPageSize2M}};

TEST(HandshakeJson, V1_1HasNoPageSizeField) {
  EXPECT_EQ(handshake_json(kFourKiBRegions, {1, 1}),
            R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0},)"
            R"({"base_host_virt_addr":140000100000000,"size":33554432,"offset":67108864}])");
  EXPECT_EQ(handshake_json(kTwoMiBRegions, {1, 1}),
            R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0}])");
}

TEST(HandshakeJson, V1_7HasPageSizeKibHoldingBytes) {
  EXPECT_EQ(handshake_json(kFourKiBRegions, {1, 7}),
            R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0,"page_size_kib":4096},)"
            R"({"base_host_virt_addr":140000100000000,"size":33554432,"offset":67108864,"page_size_kib":4096}])");
  EXPECT_EQ(handshake_json(kTwoMiBRegions, {1, 7}),
            R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0,"page_size_kib":2097152}])");
}

TEST(HandshakeJson, V1_12AndLaterHaveBothFieldsInBytes) {
  for (FirecrackerVersion v : {FirecrackerVersion{1, 12}, FirecrackerVersion{1, 16}}) {
    EXPECT_EQ(handshake_json(kFourKiBRegions, v),
              R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0,"page_size":4096,"page_size_kib":4096},)"
              R"({"base_host_virt_addr":140000100000000,"size":33554432,"offset":67108864,"page_size":4096,"page_size_kib":4096}])");
    EXPECT_EQ(handshake_json(kTwoMiBRegions, v),
              R"([{"base_host_virt_addr":140000000000000,"size":67108864,"offset":0,"page_size":2097152,"page_size_kib":2097152}])");
  }
}

// ---------------------------------------------------------------- guest layout

TEST(FirecrackerClientLayout, RegionsGetCumulativeFileOffsets) {
  FirecrackerClient client = make_client({.region_sizes = {8 * kMiB, 4 * kMiB, 2 * kMiB}});
  ASSERT_EQ(client.regions().size(), 3u);
  EXPECT_EQ(client.regions()[0].offset, 0u);
  EXPECT_EQ(client.regions()[1].offset, 8 * kMiB);
  EXPECT_EQ(client.regions()[2].offset, 12 * kMiB);
  EXPECT_EQ(client.guest_size(), 14 * kMiB);
  EXPECT_EQ(client.page_size(), 4096u);
  for (const GuestRegion& r : client.regions()) EXPECT_EQ(r.page_size, 4096u);
  EXPECT_EQ(client.guest_ptr(0), reinterpret_cast<uint8_t*>(client.regions()[0].base_host_virt_addr));
  EXPECT_EQ(client.guest_ptr(8 * kMiB - 1),
            reinterpret_cast<uint8_t*>(client.regions()[0].base_host_virt_addr + 8 * kMiB - 1));
  EXPECT_EQ(client.guest_ptr(8 * kMiB), reinterpret_cast<uint8_t*>(client.regions()[1].base_host_virt_addr));
  EXPECT_EQ(client.guest_ptr(12 * kMiB + 5), reinterpret_cast<uint8_t*>(client.regions()[2].base_host_virt_addr + 5));
  EXPECT_EQ(client.guest_ptr(14 * kMiB), nullptr);
}

TEST(FirecrackerClientLayout, HandshakeDescribesTheMappings) {
  FirecrackerClient client = make_client({.version = {1, 14}, .region_sizes = {8 * kMiB, 4 * kMiB}});
  auto json = nlohmann::json::parse(client.handshake_json());
  ASSERT_EQ(json.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(json[i]["base_host_virt_addr"].get<uint64_t>(), client.regions()[i].base_host_virt_addr);
    EXPECT_EQ(json[i]["size"].get<uint64_t>(), client.regions()[i].size);
    EXPECT_EQ(json[i]["offset"].get<uint64_t>(), client.regions()[i].offset);
    EXPECT_EQ(json[i]["page_size"].get<uint64_t>(), 4096u);
  }
}

TEST(FirecrackerClientLayout, RejectsRegionsThatAreNotWholePages) {
  EXPECT_FALSE(FirecrackerClient::create({.region_sizes = {4096 + 1}}).has_value());
  EXPECT_FALSE(FirecrackerClient::create({.region_sizes = {}}).has_value());
  EXPECT_FALSE(FirecrackerClient::create({.region_sizes = {4096}, .extra_events = 1}).has_value());
}

// ---------------------------------------------------------------- memory file

TEST(TestMemoryFile, IsDeterministicAndEveryPageIsDistinctOrZero) {
  TempDir dir;
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(write_test_memory_file(dir.file("a"), size, 7, 0.25));
  ASSERT_TRUE(write_test_memory_file(dir.file("b"), size, 7, 0.25));
  ASSERT_TRUE(write_test_memory_file(dir.file("c"), size, 8, 0.25));
  EXPECT_EQ(std::filesystem::file_size(dir.file("a")), size);
  auto read_all = [](const std::string& path) {
    std::string bytes(std::filesystem::file_size(path), '\0');
    UniqueFd fd(::open(path.c_str(), O_RDONLY));
    EXPECT_EQ(::pread(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    return bytes;
  };
  const std::string a = read_all(dir.file("a"));
  EXPECT_EQ(a, read_all(dir.file("b")));
  EXPECT_NE(a, read_all(dir.file("c")));
  std::set<std::string> distinct;
  uint64_t zero_pages = 0;
  std::vector<uint8_t> expected(4096);
  for (uint64_t page = 0; page < size / 4096; ++page) {
    std::string bytes = a.substr(page * 4096, 4096);
    fill_test_page(page, 7, 0.25, expected);
    ASSERT_EQ(std::memcmp(bytes.data(), expected.data(), 4096), 0) << "page " << page;
    if (bytes == std::string(4096, '\0')) {
      ++zero_pages;
      EXPECT_TRUE(test_page_is_zero(page, 7, 0.25));
    } else {
      EXPECT_TRUE(distinct.insert(bytes).second) << "page " << page << " repeats another";
    }
  }
  // 1024 pages at 25 %: far outside 150..360 would mean the fraction is ignored.
  EXPECT_GT(zero_pages, 150u);
  EXPECT_LT(zero_pages, 360u);
}

TEST(TestMemoryFile, RejectsPartialPages) {
  TempDir dir;
  EXPECT_FALSE(write_test_memory_file(dir.file("x"), 4097, 1, 0));
  EXPECT_FALSE(write_test_memory_file(dir.file("x"), 4096, 1, 1.5));
}

// ---------------------------------------------------------------- byte sizes

TEST(ByteSize, ParsesUnitsAndLists) {
  EXPECT_EQ(parse_byte_size("4096").value(), 4096u);
  EXPECT_EQ(parse_byte_size("64K").value(), 65536u);
  EXPECT_EQ(parse_byte_size("256M").value(), 256 * kMiB);
  EXPECT_EQ(parse_byte_size("2GiB").value(), 2048 * kMiB);
  EXPECT_EQ(parse_byte_size("1.5G").value(), 1536 * kMiB);
  EXPECT_FALSE(parse_byte_size("12Q").has_value());
  EXPECT_FALSE(parse_byte_size("M").has_value());
  EXPECT_EQ(parse_byte_size_list("64M,32M").value(), (std::vector<uint64_t>{64 * kMiB, 32 * kMiB}));
  EXPECT_EQ(format_byte_size(256 * kMiB), "256 MiB");
}

// ---------------------------------------------------------------- uffd set-up

TEST(UffdSetup, ApiIsDoneSoASecondUffdioApiFailsEinval) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  // A server cannot renegotiate features: the kernel accepts UFFDIO_API once.
  uffdio_api api{.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
  EXPECT_NE(::ioctl(client.uffd(), UFFDIO_API, &api), 0);
  EXPECT_EQ(errno, EINVAL);
  EXPECT_TRUE(::fcntl(client.uffd(), F_GETFL) & O_NONBLOCK);
  EXPECT_TRUE(::fcntl(client.uffd(), F_GETFD) & FD_CLOEXEC);
}

TEST(UffdSetup, PagesAreNotPresentUntilServed) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB, 1 * kMiB}});
  for (uint64_t offset : {uint64_t{0}, 1 * kMiB, 2 * kMiB - 4096}) EXPECT_FALSE(present(client.guest_ptr(offset)));
  // Registered MISSING: a copy through the uffd installs exactly that page.
  alignas(4096) static uint8_t source[4096];
  std::memset(source, 0x5A, sizeof source);
  uffdio_copy copy{};
  copy.dst = reinterpret_cast<uint64_t>(client.guest_ptr(1 * kMiB));
  copy.src = reinterpret_cast<uint64_t>(source);
  copy.len = 4096;
  ASSERT_EQ(::ioctl(client.uffd(), UFFDIO_COPY, &copy), 0) << std::strerror(errno);
  EXPECT_TRUE(present(client.guest_ptr(1 * kMiB)));
  EXPECT_FALSE(present(client.guest_ptr(1 * kMiB + 4096)));
  EXPECT_EQ(client.guest_ptr(1 * kMiB)[4095], 0x5A);
}

TEST(UffdSetup, UpstreamModeHasNoWriteProtectRegistration) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  alignas(4096) static uint8_t source[4096];
  uffdio_copy copy{};
  copy.dst = reinterpret_cast<uint64_t>(client.guest_ptr(0));
  copy.src = reinterpret_cast<uint64_t>(source);
  copy.len = 4096;
  copy.mode = UFFDIO_COPY_MODE_WP;
  EXPECT_NE(::ioctl(client.uffd(), UFFDIO_COPY, &copy), 0);
  EXPECT_EQ(errno, EINVAL);
}

TEST(UffdSetup, WpAsyncModeClearsUffdWpOnWriteWithoutAMessage) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}, .wp_async = true});
  alignas(4096) static uint8_t source[4096];
  uffdio_copy copy{};
  copy.dst = reinterpret_cast<uint64_t>(client.guest_ptr(0));
  copy.src = reinterpret_cast<uint64_t>(source);
  copy.len = 4096;
  copy.mode = UFFDIO_COPY_MODE_WP;  // needs a MISSING|WP registration
  ASSERT_EQ(::ioctl(client.uffd(), UFFDIO_COPY, &copy), 0) << std::strerror(errno);
  EXPECT_TRUE(uffd_wp(client.guest_ptr(0)));
  client.guest_ptr(0)[0] = 1;  // WP_ASYNC: the kernel resolves this itself
  EXPECT_FALSE(uffd_wp(client.guest_ptr(0)));
  uffd_msg msg;
  EXPECT_EQ(::read(client.uffd(), &msg, sizeof msg), -1);
  EXPECT_EQ(errno, EAGAIN);
}

TEST(UffdSetup, ExtraEventsAreRequestedOnTop) {
  EXPECT_EQ(firecracker_uffd_features(false, 0), static_cast<uint64_t>(UFFD_FEATURE_EVENT_REMOVE));
  EXPECT_EQ(firecracker_uffd_features(true, 0),
            static_cast<uint64_t>(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_WP_ASYNC));
  EXPECT_EQ(firecracker_uffd_features(false, kExtraEventUnmap | kExtraEventFork),
            static_cast<uint64_t>(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_FORK));
  EXPECT_EQ(firecracker_uffd_features(true, 0) & UFFD_FEATURE_WP_UNPOPULATED, 0u);
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}, .extra_events = kExtraEventUnmap});
  EXPECT_GE(client.uffd(), 0);
}

// ---------------------------------------------------------------- sending

struct SocketPair {
  UniqueFd client, server;
  SocketPair() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    client.reset(fds[0]);
    server.reset(fds[1]);
  }
};

bool peer_closed(int socket) {
  char byte;
  return ::recv(socket, &byte, 1, MSG_DONTWAIT) == 0;
}

TEST(Send, Before1_12TheSocketIsClosedRightAfterSending) {
  FirecrackerClient client = make_client({.version = {1, 11}, .region_sizes = {1 * kMiB}});
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client)));
  std::vector<int> fds;
  EXPECT_EQ(receive_handshake(pair.server.get(), fds), client.handshake_json());
  ASSERT_EQ(fds.size(), 1u);
  ::close(fds[0]);
  EXPECT_FALSE(client.socket_open());
  EXPECT_TRUE(peer_closed(pair.server.get()));
}

TEST(Send, From1_12TheSocketStaysOpenUntilClosed) {
  FirecrackerClient client = make_client({.version = {1, 12}, .region_sizes = {1 * kMiB}});
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client)));
  std::vector<int> fds;
  EXPECT_EQ(receive_handshake(pair.server.get(), fds), client.handshake_json());
  ASSERT_EQ(fds.size(), 1u);
  ::close(fds[0]);
  char byte;
  EXPECT_EQ(::recv(pair.server.get(), &byte, 1, MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, EAGAIN);
  client.close_socket();  // Firecracker exits
  EXPECT_TRUE(peer_closed(pair.server.get()));
}

TEST(Send, ReceivedFdIsTheClientsUffd) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client)));
  std::vector<int> fds;
  receive_handshake(pair.server.get(), fds);
  ASSERT_EQ(fds.size(), 1u);
  UniqueFd received(fds[0]);
  // Installing a page through the received fd fills the client's memory.
  alignas(4096) static uint8_t source[4096];
  std::memset(source, 0xC3, sizeof source);
  uffdio_copy copy{};
  copy.dst = reinterpret_cast<uint64_t>(client.guest_ptr(8192));
  copy.src = reinterpret_cast<uint64_t>(source);
  copy.len = 4096;
  ASSERT_EQ(::ioctl(received.get(), UFFDIO_COPY, &copy), 0) << std::strerror(errno);
  EXPECT_EQ(client.guest_ptr(8192)[17], 0xC3);
}

TEST(Send, ExtraMemfdTravelsAsASecondFd) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}, .extra_memfd = true});
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client)));
  std::vector<int> fds;
  receive_handshake(pair.server.get(), fds);
  ASSERT_EQ(fds.size(), 2u);
  struct stat st {};
  ASSERT_EQ(::fstat(fds[1], &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 1 * kMiB);
  for (int fd : fds) ::close(fd);
}

TEST(Send, PiecesReassembleToTheSameJsonWithTheFdInTheChosenPiece) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB, 1 * kMiB}});
  const std::string json = client.handshake_json();
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client),
                             SendPlan::even_pieces(json.size(), 4, 2, std::chrono::milliseconds(0))));
  std::string received;
  std::vector<size_t> fd_with_data_ending_at;
  while (received.size() < json.size()) {
    char buffer[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    iovec iov{buffer, sizeof buffer};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(pair.server.get(), &msg, MSG_CMSG_CLOEXEC);
    ASSERT_GT(n, 0);
    if (CMSG_FIRSTHDR(&msg) != nullptr) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof fd);
      ::close(fd);
      fd_with_data_ending_at.push_back(received.size() + static_cast<size_t>(n));
    }
    received.append(buffer, static_cast<size_t>(n));
  }
  EXPECT_EQ(received, json);
  ASSERT_EQ(fd_with_data_ending_at.size(), 1u);
  // The kernel may merge the pieces before the fds into the same read, but a
  // read stops right after the piece that carries them: piece 2 ends at 3/4.
  EXPECT_EQ(fd_with_data_ending_at[0], json.size() * 3 / 4);
}

TEST(Send, FdsWithFirstByteArriveBeforeTheRest) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  SocketPair pair;
  ASSERT_TRUE(client.send_on(std::move(pair.client), SendPlan::fds_with_first_byte(std::chrono::milliseconds(0))));
  char byte = 0;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ASSERT_EQ(::recvmsg(pair.server.get(), &msg, MSG_CMSG_CLOEXEC), 1);
  EXPECT_EQ(byte, '[');
  ASSERT_NE(CMSG_FIRSTHDR(&msg), nullptr);
  int fd;
  std::memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof fd);
  ::close(fd);
}

TEST(Send, RejectsAPlanThatDoesNotFitTheMessage) {
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  SocketPair pair;
  EXPECT_FALSE(client.send_on(std::move(pair.client), SendPlan{{5, 3}, 0, {}}));
}

TEST(Send, ConnectFailsWithoutAServer) {
  TempDir dir;
  FirecrackerClient client = make_client({.region_sizes = {1 * kMiB}});
  auto s = client.connect_and_send(dir.file("nobody.sock"));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, ENOENT);
}

// ---------------------------------------------------------------- end to end (TestFaultServer)

class EndToEnd : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(write_test_memory_file(memory(), kSize, 3, 0.1));
  }
  std::string memory() const { return dir_.file("memory"); }
  std::string socket() const { return dir_.file("uffd.sock"); }

  // A client connected to a fresh TestFaultServer, and a Verifier for it.
  void connect(ClientConfig config, testing::TestFaultServerOptions options = {}) {
    auto server = testing::TestFaultServer::listen(socket(), memory(), options);
    ASSERT_TRUE(server) << server.error().describe();
    server_ = std::move(*server);
    auto client = FirecrackerClient::create(config);
    ASSERT_TRUE(client) << client.error().describe();
    client_.emplace(std::move(*client));
    ASSERT_TRUE(client_->connect_and_send(socket()));
    auto verifier = Verifier::open(memory(), client_->guest_size(), client_->page_size());
    ASSERT_TRUE(verifier) << verifier.error().describe();
    verifier_ = std::move(*verifier);
  }

  static constexpr uint64_t kSize = 8 * kMiB;
  TempDir dir_;
  std::unique_ptr<testing::TestFaultServer> server_;
  std::optional<FirecrackerClient> client_;
  std::unique_ptr<Verifier> verifier_;
};

TEST_F(EndToEnd, DisjointRandomTouchesReadTheSnapshot) {
  connect({.region_sizes = {6 * kMiB, 2 * kMiB}});
  auto pages = select_pages(client_->page_count(), 4096, 1.0, PageOrder::kRandom, 11);
  auto result = touch_pages(*client_, *verifier_, plan_touches(pages, 0.3, 12), {.threads = 3});
  ASSERT_TRUE(result) << result.error().describe();
  EXPECT_EQ(result->pages_touched, 2048u);
  EXPECT_EQ(result->page_reads, 2048u);
  EXPECT_GT(result->page_writes, 400u);
  EXPECT_EQ(result->mismatches, 0u) << verifier_->described_mismatches().at(0).description;
  EXPECT_EQ(server_->faults_served(), 2048u);
  // Written pages now hold the pattern, the rest the snapshot.
  auto again = touch_pages(*client_, *verifier_, pages, Access::kRead, {.threads = 2});
  ASSERT_TRUE(again);
  EXPECT_EQ(again->mismatches, 0u);
  EXPECT_EQ(server_->error(), "");
}

TEST_F(EndToEnd, IdenticalPageSetsFaultTheSamePagesConcurrently) {
  connect({.region_sizes = {8 * kMiB}});
  auto pages = select_pages(client_->page_count(), 4096, 0.5, PageOrder::kSequential, 5);
  auto result = touch_pages(*client_, *verifier_, plan_touches(pages, 0.25, 6),
                            {.threads = 4, .sharing = ThreadSharing::kIdentical});
  ASSERT_TRUE(result);
  EXPECT_EQ(result->page_reads, 4 * pages.size());
  EXPECT_EQ(result->mismatches, 0u);
  auto again = touch_pages(*client_, *verifier_, pages, Access::kRead);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->mismatches, 0u);
}

TEST_F(EndToEnd, ACorruptedPageIsReportedWithOffsetAndBytes) {
  testing::TestFaultServerOptions options;
  options.corrupt_page_offset = 5 * 4096;
  connect({.region_sizes = {8 * kMiB}}, options);
  auto pages = select_pages(client_->page_count(), 4096, 1.0, PageOrder::kSequential, 1);
  auto result = touch_pages(*client_, *verifier_, pages, Access::kRead, {.threads = 2});
  ASSERT_TRUE(result);
  EXPECT_EQ(result->mismatches, 1u);
  auto described = verifier_->described_mismatches();
  ASSERT_EQ(described.size(), 1u);
  EXPECT_EQ(described[0].page_offset, 5 * 4096u);
  EXPECT_EQ(described[0].byte_offset, 5 * 4096u + 100);
  EXPECT_NE(described[0].description.find("snapshot"), std::string::npos) << described[0].description;
}

TEST_F(EndToEnd, RemoveRecordsOnlyTheWholePagesInsideAndTheyReadZero) {
  connect({.region_sizes = {4 * kMiB, 4 * kMiB}});
  auto all = select_pages(client_->page_count(), 4096, 1.0, PageOrder::kSequential, 1);
  ASSERT_EQ(touch_pages(*client_, *verifier_, all, Access::kRead)->mismatches, 0u);
  // Unaligned on both ends and across the region boundary: pages
  // [4 MiB - 2 pages, 4 MiB + 3 pages) are whole inside.
  const uint64_t start = 4 * kMiB - 2 * 4096 - 100;
  auto removed = client_->remove(start, 5 * 4096 + 100 + 200);
  ASSERT_TRUE(removed) << removed.error().describe();
  const std::vector<GuestRange> expected = {{4 * kMiB - 2 * 4096, 2 * 4096}, {4 * kMiB, 3 * 4096}};
  EXPECT_EQ(*removed, expected);
  EXPECT_EQ(client_->removed_ranges(), expected);
  EXPECT_TRUE(present(client_->guest_ptr(start)));  // the partial page before stays
  EXPECT_FALSE(present(client_->guest_ptr(4 * kMiB)));
  for (const GuestRange& r : *removed) {
    for (uint64_t at = r.offset; at < r.offset + r.length; at += 4096) verifier_->record_removed(at);
  }
  auto result = touch_pages(*client_, *verifier_, all, Access::kRead);
  ASSERT_TRUE(result);
  EXPECT_EQ(result->mismatches, 0u);
  EXPECT_EQ(server_->faults_served(), 2048u + 5u);
  // One madvise per region. (madvise returns as soon as the server has read
  // the event, maybe before it counted it; the faults just served were read
  // after both events, so by now both are counted.)
  EXPECT_EQ(server_->remove_events(), 2u);
  // A range with no whole page inside removes nothing.
  auto none = client_->remove(4096 + 1, 4096);
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->empty());
}

TEST_F(EndToEnd, TheVerifierCatchesAStalePageAfterARemove) {
  connect({.region_sizes = {8 * kMiB}});
  std::vector<uint64_t> page = {3 * 4096};
  ASSERT_EQ(touch_pages(*client_, *verifier_, page, Access::kRead)->mismatches, 0u);
  // The client believes the page was removed but never madvised it: the
  // snapshot bytes still there must count as a mismatch.
  verifier_->record_removed(3 * 4096);
  EXPECT_EQ(touch_pages(*client_, *verifier_, page, Access::kRead)->mismatches, 1u);
}

TEST_F(EndToEnd, ServerSeesEofWhenA1_14ClientClosesItsSocket) {
  connect({.version = {1, 14}, .region_sizes = {8 * kMiB}});
  std::vector<uint64_t> page = {0};
  ASSERT_TRUE(touch_pages(*client_, *verifier_, page, Access::kRead));  // handshake fully served
  EXPECT_FALSE(server_->peer_closed());
  EXPECT_EQ(server_->handshake_json(), client_->handshake_json());
  client_->close_socket();
  for (int i = 0; i < 500 && !server_->peer_closed(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_TRUE(server_->peer_closed());
}

class Restore : public ::testing::TestWithParam<FirecrackerVersion> {};

TEST_P(Restore, WholeScenarioHasNoMismatches) {
  TempDir dir;
  ASSERT_TRUE(write_test_memory_file(dir.file("memory"), 12 * kMiB, 9, 0.1));
  auto server = testing::TestFaultServer::listen(dir.file("sock"), dir.file("memory"));
  ASSERT_TRUE(server);
  RestoreOptions o;
  o.socket_path = dir.file("sock");
  o.memory_path = dir.file("memory");
  o.version = GetParam();
  o.region_sizes = {8 * kMiB, 4 * kMiB};
  o.order = PageOrder::kRandom;
  o.touch_fraction = 0.7;
  o.remove_fraction = 0.1;
  o.send_plan = SendPlan::even_pieces(client::handshake_json(kFourKiBRegions, o.version).size(), 3, 1,
                                      std::chrono::milliseconds(5));
  auto report = run_restore(o);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->mismatches, 0u) << report->to_text();
  EXPECT_GE(report->pages_removed, 300u);
  EXPECT_EQ(report->pages_touched, report->missing_faults);
  EXPECT_EQ((*server)->faults_served(), report->missing_faults);
  EXPECT_EQ((*server)->error(), "");
  auto json = nlohmann::json::parse(report->to_json());
  EXPECT_EQ(json["mismatches"].get<uint64_t>(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Versions, Restore,
                         ::testing::Values(FirecrackerVersion{1, 1}, FirecrackerVersion{1, 7},
                                           FirecrackerVersion{1, 11}, FirecrackerVersion{1, 14}),
                         [](const auto& info) { return "v1_" + std::to_string(info.param.minor); });

TEST(RestoreOptionsCheck, RegionSizesMustAddUpToTheMemoryFile) {
  TempDir dir;
  ASSERT_TRUE(write_test_memory_file(dir.file("memory"), 4 * kMiB, 1, 0));
  RestoreOptions o;
  o.socket_path = dir.file("sock");
  o.memory_path = dir.file("memory");
  o.region_sizes = {2 * kMiB, 1 * kMiB};
  auto report = run_restore(o);
  ASSERT_FALSE(report);
  EXPECT_NE(report.error().message.find("add up"), std::string::npos);
}

TEST(RestoreWpAsync, WholeScenarioHasNoMismatches) {
  TempDir dir;
  ASSERT_TRUE(write_test_memory_file(dir.file("memory"), 8 * kMiB, 4, 0.2));
  auto server = testing::TestFaultServer::listen(dir.file("sock"), dir.file("memory"));
  ASSERT_TRUE(server);
  RestoreOptions o;
  o.socket_path = dir.file("sock");
  o.memory_path = dir.file("memory");
  o.wp_async = true;
  o.threads = 3;
  o.sharing = ThreadSharing::kIdentical;
  auto report = run_restore(o);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->mismatches, 0u) << report->to_text();
}

TEST(RestoreHugePages, WholeScenarioHasNoMismatches) {
  HugePageReservation reservation(8);
  FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation.ok(), reservation.reason());
  TempDir dir;
  ASSERT_TRUE(write_test_memory_file(dir.file("memory"), 8 * kMiB, 4, 0.2));
  auto server = testing::TestFaultServer::listen(dir.file("sock"), dir.file("memory"));
  ASSERT_TRUE(server);
  RestoreOptions o;
  o.socket_path = dir.file("sock");
  o.memory_path = dir.file("memory");
  o.huge_pages = true;
  o.region_sizes = {4 * kMiB, 4 * kMiB};
  o.remove_fraction = 0.25;
  auto report = run_restore(o);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->page_size, kPageSize2M);
  EXPECT_GT(report->pages_removed, 0u);
  EXPECT_EQ(report->mismatches, 0u) << report->to_text();
}

TEST(RestoreKvm, VcpusAndHostThreadsTogetherHaveNoMismatches) {
  FAULTLINE_REQUIRE_CAPABILITY("kvm", VcpuToucher::available(), "no usable /dev/kvm, or client/kvm not in this build");
  TempDir dir;
  ASSERT_TRUE(write_test_memory_file(dir.file("memory"), 4 * kMiB, 6, 0.1));
  auto server = testing::TestFaultServer::listen(dir.file("sock"), dir.file("memory"));
  ASSERT_TRUE(server);
  RestoreOptions o;
  o.socket_path = dir.file("sock");
  o.memory_path = dir.file("memory");
  o.region_sizes = {2 * kMiB, 2 * kMiB};
  o.threads = 1;
  o.kvm_vcpus = 2;
  o.touch_fraction = 0.25;
  o.order = PageOrder::kRandom;
  auto report = run_restore(o);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_GT(report->vcpu_pages, 100u);
  EXPECT_EQ(report->mismatches, 0u) << report->to_text();
  EXPECT_EQ((*server)->error(), "");
}

}  // namespace
}  // namespace faultline::client
