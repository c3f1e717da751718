#include "protocol/handshake_socket.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/kcmp.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/temp_dir.h"

namespace faultline::protocol {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

// What Firecracker v1.12+ sends for a 4 GiB x86 guest: two regions around the
// MMIO hole, laid out back to back in the memory file.
const std::string kJson =
    R"([{"base_host_virt_addr":140274283315200,"size":3221225472,"offset":0,"page_size":4096,"page_size_kib":4096},)"
    R"({"base_host_virt_addr":140277504540672,"size":1073741824,"offset":3221225472,"page_size":4096,"page_size_kib":4096}])";

// A userfaultfd set up the way Firecracker hands it over: API handshake done
// with UFFD_FEATURE_EVENT_REMOVE, O_NONBLOCK, close-on-exec.
UniqueFd make_userfaultfd() {
  UniqueFd fd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (!fd) return fd;
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_EVENT_REMOVE;
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) return UniqueFd();
  return fd;
}

struct SocketPair {
  UniqueFd client;  // plays Firecracker
  UniqueFd server;  // what faultline accepted
};

SocketPair make_socket_pair() {
  int sv[2] = {-1, -1};
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0) << std::strerror(errno);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

// One sendmsg carrying `data` and `fds` as SCM_RIGHTS, like Firecracker's
// send_with_fds.
ssize_t send_with_fds(int sock, std::string_view data, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<unsigned char> control(CMSG_SPACE(sizeof(int) * std::max<size_t>(fds.size(), 1)));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL);
}

// Gate for multi-piece tests: returns once the receiver has taken every
// queued byte off the socket, so the next piece arrives in a later recvmsg
// rather than already sitting in the queue. `receiver` is a dup of the
// receiving socket, valid even after receive_handshake() closes its copy.
void wait_until_drained(int receiver) {
  int queued = 0;
  while (::ioctl(receiver, FIONREAD, &queued) == 0 && queued > 0) sched_yield();
}

// Whether two fds refer to the same open file description. All userfaultfds
// share one anonymous inode, so fstat cannot tell them apart; kcmp can.
bool same_file(int a, int b) {
  return ::syscall(SYS_kcmp, getpid(), getpid(), KCMP_FILE, a, b) == 0;
}

size_t open_fd_count() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++count;
  return count;
}

// Every test must leave exactly the fds it found: received fds are owned by
// the Handshake or closed on the error path, never leaked.
class ReceiveHandshake : public ::testing::Test {
 protected:
  void SetUp() override { fds_before_ = open_fd_count(); }
  void TearDown() override { EXPECT_EQ(open_fd_count(), fds_before_) << "fd leak"; }

  size_t fds_before_ = 0;
};

TEST_F(ReceiveHandshake, ReceivesJsonAndUffdInOneSendmsg) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid()) << std::strerror(errno);
  ASSERT_EQ(send_with_fds(pair.client.get(), kJson, {uffd.get()}), static_cast<ssize_t>(kJson.size()));

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->format, HandshakeFormat::kBothFields);
  ASSERT_EQ(handshake->regions.size(), 2u);
  EXPECT_EQ(handshake->regions[0], (GuestRegion{140274283315200ull, 3ull << 30, 0, kPageSize4K}));
  EXPECT_EQ(handshake->regions[1], (GuestRegion{140277504540672ull, 1ull << 30, 3ull << 30, kPageSize4K}));
  ASSERT_TRUE(handshake->uffd.valid());
  EXPECT_NE(handshake->uffd.get(), uffd.get());
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
  EXPECT_TRUE(handshake->extra_fds.empty());
  EXPECT_TRUE(handshake->connection.valid());
  EXPECT_FALSE(handshake->peer_closed);
  EXPECT_EQ(handshake->raw_json, kJson);
  // MSG_CMSG_CLOEXEC: the received uffd must not leak into exec'd children.
  EXPECT_TRUE(::fcntl(handshake->uffd.get(), F_GETFD) & FD_CLOEXEC);
}

TEST_F(ReceiveHandshake, ReportsPeerCredentialsOfTheSender) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->peer.pid, getpid());
  EXPECT_EQ(handshake->peer.uid, getuid());
  EXPECT_EQ(handshake->peer.gid, getgid());
}

TEST_F(ReceiveHandshake, ReassemblesJsonSplitAcrossFiveWritesWithUffdInTheThird) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  const size_t piece = kJson.size() / 5;
  std::jthread sender([&] {
    for (size_t i = 0; i < 5; ++i) {
      std::string_view part = std::string_view(kJson).substr(i * piece, i == 4 ? std::string_view::npos : piece);
      std::vector<int> fds;
      if (i == 2) fds.push_back(uffd.get());
      EXPECT_EQ(send_with_fds(pair.client.get(), part, fds), static_cast<ssize_t>(part.size()));
      wait_until_drained(receiver_view.get());
    }
  });

  auto handshake = receive_handshake(std::move(pair.server), {});
  sender.join();
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->raw_json, kJson);
  EXPECT_EQ(handshake->regions.size(), 2u);
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
}

TEST_F(ReceiveHandshake, AcceptsUffdArrivingBeforeTheRestOfTheJson) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  std::jthread sender([&] {
    // The fd travels with one byte: on a Unix stream socket a zero-length
    // sendmsg transfers no fds at all (see ZeroLengthSendmsgCarriesNoFd).
    EXPECT_EQ(send_with_fds(pair.client.get(), kJson.substr(0, 1), {uffd.get()}), 1);
    wait_until_drained(receiver_view.get());
    EXPECT_GT(send_with_fds(pair.client.get(), kJson.substr(1), {}), 0);
  });

  auto handshake = receive_handshake(std::move(pair.server), {});
  sender.join();
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->regions.size(), 2u);
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
}

TEST_F(ReceiveHandshake, WaitsForUffdAfterTheJsonIsComplete) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  std::jthread sender([&] {
    EXPECT_GT(send_with_fds(pair.client.get(), kJson, {}), 0);
    wait_until_drained(receiver_view.get());
    // Trailing JSON whitespace is the only data that may follow the array.
    EXPECT_EQ(send_with_fds(pair.client.get(), "\n", {uffd.get()}), 1);
  });

  auto handshake = receive_handshake(std::move(pair.server), {});
  sender.join();
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
  EXPECT_EQ(handshake->raw_json, kJson + "\n");
}

TEST_F(ReceiveHandshake, AcceptsUffdWithTheLastByteAfterDataFirst) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  std::jthread sender([&] {
    EXPECT_GT(send_with_fds(pair.client.get(), kJson.substr(0, kJson.size() - 1), {}), 0);
    wait_until_drained(receiver_view.get());
    EXPECT_EQ(send_with_fds(pair.client.get(), kJson.substr(kJson.size() - 1), {uffd.get()}), 1);
  });

  auto handshake = receive_handshake(std::move(pair.server), {});
  sender.join();
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->raw_json, kJson);
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
}

TEST_F(ReceiveHandshake, KeepsMemfdAsExtraFdWhenUffdComesFirst) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  UniqueFd memfd(::memfd_create("guest_mem", MFD_CLOEXEC));
  ASSERT_TRUE(uffd.valid() && memfd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {uffd.get(), memfd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
  ASSERT_EQ(handshake->extra_fds.size(), 1u);
  EXPECT_TRUE(same_file(handshake->extra_fds[0].get(), memfd.get()));
}

TEST_F(ReceiveHandshake, FindsUffdWhenMemfdComesFirst) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  UniqueFd memfd(::memfd_create("guest_mem", MFD_CLOEXEC));
  ASSERT_TRUE(uffd.valid() && memfd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {memfd.get(), uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
  ASSERT_EQ(handshake->extra_fds.size(), 1u);
  EXPECT_TRUE(same_file(handshake->extra_fds[0].get(), memfd.get()));
}

TEST_F(ReceiveHandshake, CollectsFdsFromSeparateMessages) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  UniqueFd memfd(::memfd_create("guest_mem", MFD_CLOEXEC));
  ASSERT_TRUE(uffd.valid() && memfd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  std::jthread sender([&] {
    EXPECT_EQ(send_with_fds(pair.client.get(), kJson.substr(0, 10), {memfd.get()}), 10);
    wait_until_drained(receiver_view.get());
    EXPECT_GT(send_with_fds(pair.client.get(), kJson.substr(10), {uffd.get()}), 0);
  });

  auto handshake = receive_handshake(std::move(pair.server), {});
  sender.join();
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
  ASSERT_EQ(handshake->extra_fds.size(), 1u);
  EXPECT_TRUE(same_file(handshake->extra_fds[0].get(), memfd.get()));
}

TEST_F(ReceiveHandshake, SucceedsWhenSenderClosesRightAfterSending) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {uffd.get()}), 0);
  pair.client.reset();  // Firecracker before v1.12 closes right after sending

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_TRUE(handshake->peer_closed);
  EXPECT_EQ(handshake->regions.size(), 2u);
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
}

TEST_F(ReceiveHandshake, ZeroLengthSendmsgCarriesNoFd) {
  // Kernel fact pinned here: unix_stream_sendmsg() only attaches fds to data,
  // so an fd "sent alone" on a stream socket never arrives.
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_EQ(send_with_fds(pair.client.get(), "", {uffd.get()}), 0);
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {}), 0);
  pair.client.reset();

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("but no userfaultfd"));
}

TEST_F(ReceiveHandshake, FailsWhenJsonIsCompleteButEofComesWithoutFd) {
  SocketPair pair = make_socket_pair();
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {}), 0);
  pair.client.reset();

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_EQ(handshake.error().message, "client closed the connection after sending the " +
                                           std::to_string(kJson.size()) +
                                           "-byte handshake JSON but no userfaultfd");
}

TEST_F(ReceiveHandshake, FailsWhenNoFdIsAUserfaultfd) {
  SocketPair pair = make_socket_pair();
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {pipe_read.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("none of the 1 fds received in the handshake is a userfaultfd"));
  EXPECT_THAT(handshake.error().message, HasSubstr("pipe:["));
}

TEST_F(ReceiveHandshake, FailsOnEofMidJson) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_EQ(send_with_fds(pair.client.get(), kJson.substr(0, 50), {uffd.get()}), 50);
  pair.client.reset();

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_EQ(handshake.error().message, "client closed the connection mid-handshake after 50 bytes and 1 fd");
}

TEST_F(ReceiveHandshake, TimesOutSayingWhatHadArrived) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  const size_t half = kJson.size() / 2;
  ASSERT_EQ(send_with_fds(pair.client.get(), kJson.substr(0, half), {uffd.get()}), static_cast<ssize_t>(half));
  // The client stays connected and silent; the configured budget ends it.

  auto handshake = receive_handshake(std::move(pair.server), {.timeout = 200ms});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_EQ(handshake.error().code, ETIMEDOUT);
  EXPECT_THAT(handshake.error().message, HasSubstr("timed out after 200 ms"));
  EXPECT_THAT(handshake.error().message,
              HasSubstr("received " + std::to_string(half) + " bytes (JSON incomplete) and 1 fd"));
}

TEST_F(ReceiveHandshake, TimesOutWhenJsonIsCompleteButNoFdArrives) {
  SocketPair pair = make_socket_pair();
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {.timeout = 200ms});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("(JSON complete) and 0 fds"));
}

TEST_F(ReceiveHandshake, FailsWhenJsonExceedsTheLimit) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {.max_json_bytes = 64});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("exceeds the 64-byte limit"));
}

TEST_F(ReceiveHandshake, FailsOnBytesThatCannotBeAJsonArray) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), R"({"base_host_virt_addr":1)", {uffd.get()}), 0);

  // Fails as soon as the first byte is seen, not at the timeout.
  auto handshake = receive_handshake(std::move(pair.server), {.timeout = 60s});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("not a JSON array: byte 0 is '{'"));
  EXPECT_THAT(handshake.error().message, HasSubstr("not valid JSON"));  // nlohmann's own diagnosis
}

TEST_F(ReceiveHandshake, FailsOnInvalidRegionNamingIt) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  const std::string json = R"([{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4}])";
  ASSERT_GT(send_with_fds(pair.client.get(), json, {uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message,
              HasSubstr("invalid Firecracker handshake: region 0: field \"page_size_kib\" is 4"));
}

TEST_F(ReceiveHandshake, FailsOnSyntaxErrorInsideCompleteArray) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), R"([{"size":,}])", {uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("not valid JSON"));
  EXPECT_THAT(handshake.error().message, HasSubstr("syntax error"));
}

TEST_F(ReceiveHandshake, FailsOnTrailingBytesAfterTheArray) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(pair.client.get(), kJson + "{}", {uffd.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("after the end of the region array"));
}

TEST_F(ReceiveHandshake, ReportsTruncatedControlData) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  UniqueFd memfd(::memfd_create("guest_mem", MFD_CLOEXEC));
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  ASSERT_TRUE(uffd.valid() && memfd.valid());
  // Three fds: CMSG_SPACE rounds a 1-fd buffer up to room for 2 on x86-64,
  // so only a third one is sure to be cut off by the kernel.
  ASSERT_GT(send_with_fds(pair.client.get(), kJson, {uffd.get(), memfd.get(), pipe_read.get()}), 0);

  auto handshake = receive_handshake(std::move(pair.server), {.max_fds = 1});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_THAT(handshake.error().message, HasSubstr("MSG_CTRUNC"));
}

TEST_F(ReceiveHandshake, RejectsMoreFdsThanAllowedAcrossMessages) {
  SocketPair pair = make_socket_pair();
  UniqueFd uffd = make_userfaultfd();
  UniqueFd memfd(::memfd_create("guest_mem", MFD_CLOEXEC));
  ASSERT_TRUE(uffd.valid() && memfd.valid());
  UniqueFd receiver_view(::dup(pair.server.get()));
  std::jthread sender([&] {
    EXPECT_EQ(send_with_fds(pair.client.get(), kJson.substr(0, 10), {uffd.get()}), 10);
    wait_until_drained(receiver_view.get());
    EXPECT_GT(send_with_fds(pair.client.get(), kJson.substr(10), {memfd.get()}), 0);
  });

  auto handshake = receive_handshake(std::move(pair.server), {.max_fds = 1});
  sender.join();
  ASSERT_FALSE(handshake.has_value());
  // Either the second message overflowed the 1-fd control buffer or the total
  // went over: both name the limit. Which one depends on whether the kernel
  // handed the two messages to one recvmsg.
  EXPECT_THAT(handshake.error().message, ::testing::AnyOf(HasSubstr("at most 1 are accepted"),
                                                          HasSubstr("more than 1 fds in one message")));
}

TEST_F(ReceiveHandshake, RejectsAnInvalidConnection) {
  auto handshake = receive_handshake(UniqueFd(), {});
  ASSERT_FALSE(handshake.has_value());
  EXPECT_EQ(handshake.error().code, EBADF);
}

// ----- UnixListener ------------------------------------------------------------

class UnixListenerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_.path();
    path_ = dir_ + "/uffd.sock";
  }

  UniqueFd connect_client() {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
    return fd;
  }

  faultline::testing::TempDir scratch_;
  std::string dir_;
  std::string path_;
};

TEST_F(UnixListenerTest, BindAcceptReceiveRoundTrip) {
  auto listener = UnixListener::bind(path_);
  ASSERT_TRUE(listener.has_value()) << listener.error().describe();
  EXPECT_EQ(listener->path(), path_);
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_TRUE(::fcntl(listener->fd(), F_GETFD) & FD_CLOEXEC);

  // connect() completes against the backlog before accept() runs.
  UniqueFd client = connect_client();
  UniqueFd uffd = make_userfaultfd();
  ASSERT_TRUE(uffd.valid());
  ASSERT_GT(send_with_fds(client.get(), kJson, {uffd.get()}), 0);

  auto connection = listener->accept();
  ASSERT_TRUE(connection.has_value()) << connection.error().describe();
  EXPECT_TRUE(::fcntl(connection->get(), F_GETFD) & FD_CLOEXEC);
  auto handshake = receive_handshake(std::move(*connection), {});
  ASSERT_TRUE(handshake.has_value()) << handshake.error().describe();
  EXPECT_EQ(handshake->peer.pid, getpid());
  EXPECT_EQ(handshake->regions.size(), 2u);
  EXPECT_TRUE(same_file(handshake->uffd.get(), uffd.get()));
}

TEST_F(UnixListenerTest, ReplacesStaleSocketFile) {
  {
    // A socket file left behind by a server that died without cleaning up.
    UniqueFd stale(::socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(::bind(stale.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  ASSERT_TRUE(std::filesystem::is_socket(path_));

  auto listener = UnixListener::bind(path_);
  ASSERT_TRUE(listener.has_value()) << listener.error().describe();
  UniqueFd client = connect_client();
  auto connection = listener->accept_with_timeout(5s);
  ASSERT_TRUE(connection.has_value()) << connection.error().describe();
}

TEST_F(UnixListenerTest, RefusesToReplaceARegularFile) {
  { std::ofstream(path_) << "precious"; }
  auto listener = UnixListener::bind(path_);
  ASSERT_FALSE(listener.has_value());
  EXPECT_THAT(listener.error().message, HasSubstr("is not a socket"));
  std::ifstream in(path_);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");
}

TEST_F(UnixListenerTest, RemovesItsSocketFileOnDestruction) {
  {
    auto listener = UnixListener::bind(path_);
    ASSERT_TRUE(listener.has_value()) << listener.error().describe();
    ASSERT_TRUE(std::filesystem::exists(path_));
  }
  EXPECT_FALSE(std::filesystem::exists(path_));
}

TEST_F(UnixListenerTest, MovedFromListenerLeavesTheSocketFileToTheNewOwner) {
  auto listener = UnixListener::bind(path_);
  ASSERT_TRUE(listener.has_value());
  {
    UnixListener moved = std::move(*listener);
    EXPECT_EQ(moved.path(), path_);
  }
  EXPECT_FALSE(std::filesystem::exists(path_));
  // The moved-from listener must not touch a path that now belongs to nobody.
  { std::ofstream(path_) << "x"; }
  listener = std::unexpected(Error{});
  EXPECT_TRUE(std::filesystem::exists(path_));
}

TEST_F(UnixListenerTest, LeavesAFileThatReplacedItsSocketAlone) {
  {
    auto listener = UnixListener::bind(path_);
    ASSERT_TRUE(listener.has_value());
    ASSERT_EQ(::unlink(path_.c_str()), 0);
    { std::ofstream(path_) << "someone else's"; }
  }
  EXPECT_TRUE(std::filesystem::is_regular_file(path_));
}

TEST_F(UnixListenerTest, AcceptWithTimeoutFailsWithEtimedoutWhenNobodyConnects) {
  auto listener = UnixListener::bind(path_);
  ASSERT_TRUE(listener.has_value());
  auto connection = listener->accept_with_timeout(50ms);
  ASSERT_FALSE(connection.has_value());
  EXPECT_EQ(connection.error().code, ETIMEDOUT);
}

TEST_F(UnixListenerTest, RejectsAPathTooLongForSunPath) {
  auto listener = UnixListener::bind(dir_ + "/" + std::string(200, 's'));
  ASSERT_FALSE(listener.has_value());
  EXPECT_EQ(listener.error().code, ENAMETOOLONG);
}

}  // namespace
}  // namespace faultline::protocol
