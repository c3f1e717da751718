// The regions-per-handshake limit (HandshakeOptions::max_regions): refused
// with an error naming the limit and its flag, counted while the bytes
// arrive, before any region is parsed.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "protocol/handshake.h"
#include "protocol/handshake_socket.h"

namespace faultline::protocol {
namespace {

using ::testing::HasSubstr;

// `n` regions of 4 KiB, one after the other, as Firecracker v1.12+ writes them.
std::string regions_json(size_t n) {
  std::string json = "[";
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) json += ",";
    const uint64_t base = 0x7f0000000000 + i * 0x200000;
    json += R"({"base_host_virt_addr":)" + std::to_string(base) + R"(,"size":4096,"offset":)" +
            std::to_string(i * 4096) + R"(,"page_size":4096,"page_size_kib":4096})";
  }
  return json + "]";
}

UniqueFd make_userfaultfd() {
  UniqueFd fd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (!fd) return fd;
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_EVENT_REMOVE;
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) return UniqueFd();
  return fd;
}

// Sends `data` with the fd (if any) in one sendmsg, as Firecracker does.
void send_with_fd(int sock, const std::string& data, int fd) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) unsigned char control[CMSG_SPACE(sizeof(int))] = {};
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
  }
  ASSERT_EQ(::sendmsg(sock, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(data.size())) << std::strerror(errno);
}

struct Pair {
  UniqueFd client, server;
};
Pair socket_pair() {
  int sv[2] = {-1, -1};
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

Result<Handshake> handshake_with(size_t regions, size_t max_regions) {
  Pair p = socket_pair();
  UniqueFd uffd = make_userfaultfd();
  EXPECT_TRUE(uffd.valid());
  // A large array does not fit in the socket buffer: send while receiving
  // (receive_handshake closes its end when it returns, so a refused one
  // ends a blocked send with EPIPE).
  std::thread client([&] { send_with_fd(p.client.get(), regions_json(regions), uffd.get()); });
  HandshakeOptions options;
  options.max_regions = max_regions;
  auto hs = receive_handshake(std::move(p.server), options);
  client.join();
  return hs;
}

TEST(RegionLimit, CompletenessScanCountsTopLevelElementsOnly) {
  EXPECT_EQ(scan_json_array("[]").elements, 0u);
  EXPECT_EQ(scan_json_array(" [ ] ").elements, 0u);
  EXPECT_EQ(scan_json_array(R"([{"a":[1,2,3],"b":{"c":[4,5]}}])").elements, 1u);
  EXPECT_EQ(scan_json_array(R"([{"s":"x,y,[z]"} , {"t":"\",{"}, 3])").elements, 3u);
  EXPECT_EQ(scan_json_array(R"(["a,b", [1,2], {}])").elements, 3u);
  // Incomplete input counts the elements begun so far.
  EXPECT_EQ(scan_json_array(R"([{"a":1},{"b":)").elements, 2u);
  EXPECT_EQ(scan_json_array(R"([{"a":1},)").elements, 1u);
  EXPECT_EQ(scan_json_array(regions_json(1000)).elements, 1000u);
}

TEST(RegionLimit, ExactlyTheLimitIsAccepted) {
  auto hs = handshake_with(64, 64);
  ASSERT_TRUE(hs) << hs.error().describe();
  EXPECT_EQ(hs->regions.size(), 64u);
}

TEST(RegionLimit, OneRegionOverTheLimitIsRefusedNamingTheLimitAndTheFlag) {
  auto hs = handshake_with(65, 64);
  ASSERT_FALSE(hs);
  EXPECT_THAT(hs.error().message, HasSubstr("describes 65 regions, more than the limit of 64"));
  EXPECT_THAT(hs.error().message, HasSubstr("--max-regions"));
}

TEST(RegionLimit, TheDefaultAcceptsWhatFirecrackerSendsAndRefusesMore) {
  // Two DRAM regions around the MMIO hole plus a virtio-mem hotplug region.
  EXPECT_TRUE(handshake_with(3, HandshakeOptions{}.max_regions));
  EXPECT_TRUE(handshake_with(HandshakeOptions{}.max_regions, HandshakeOptions{}.max_regions));
  EXPECT_FALSE(handshake_with(HandshakeOptions{}.max_regions + 1, HandshakeOptions{}.max_regions));
}

TEST(RegionLimit, IsEnforcedWhileTheJsonIsStillArrivingWithoutWaitingForTheRest) {
  // 200 regions' worth of an unfinished array and no fd; the connection stays
  // open. Only counting as the bytes arrive can refuse this: parsing needs
  // the whole array, and the timeout (an hour) is not what fails it.
  Pair p = socket_pair();
  std::string partial = regions_json(200);
  partial.resize(partial.size() / 2);
  send_with_fd(p.client.get(), partial, -1);
  HandshakeOptions options;
  options.max_regions = 10;
  options.timeout = std::chrono::hours(1);
  auto hs = receive_handshake(std::move(p.server), options);
  ASSERT_FALSE(hs);
  EXPECT_THAT(hs.error().message, HasSubstr("regions so far, more than the limit of 10 (faultline serve --max-regions)"));
}

TEST(RegionLimit, TheLargestAllowedLimitAcceptsThatManyRegions) {
  auto hs = handshake_with(kMaxRegionsCeiling, kMaxRegionsCeiling);
  ASSERT_TRUE(hs) << hs.error().describe();
  EXPECT_EQ(hs->regions.size(), kMaxRegionsCeiling);
}

}  // namespace
}  // namespace faultline::protocol
