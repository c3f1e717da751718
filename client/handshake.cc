#include "client/handshake.h"

#include <sys/socket.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

namespace faultline::client {

std::string handshake_json(std::span<const GuestRegion> regions, const FirecrackerVersion& version) {
  // ordered_json keeps insertion order, which is Firecracker's serde field
  // order; a server must not depend on it, but tests compare exact strings.
  nlohmann::ordered_json array = nlohmann::ordered_json::array();
  for (const GuestRegion& r : regions) {
    nlohmann::ordered_json region;
    region["base_host_virt_addr"] = r.base_host_virt_addr;
    region["size"] = r.size;
    region["offset"] = r.offset;
    if (version.sends_page_size()) region["page_size"] = r.page_size;
    // Firecracker stores bytes in "page_size_kib" (v1.7+), not KiB.
    if (version.sends_page_size_kib()) region["page_size_kib"] = r.page_size;
    array.push_back(std::move(region));
  }
  return array.dump();
}

SendPlan SendPlan::even_pieces(size_t json_size, size_t pieces, size_t fd_piece,
                               std::chrono::milliseconds pause) {
  SendPlan plan;
  plan.fd_piece = fd_piece;
  plan.pause_between_pieces = pause;
  if (pieces < 2 || json_size < 2) return plan;
  if (pieces > json_size) pieces = json_size;
  for (size_t i = 1; i < pieces; ++i) plan.split_at.push_back(json_size * i / pieces);
  return plan;
}

namespace {

// One sendmsg() of `bytes`, with `fds` attached when non-empty. Loops on short
// writes; the fds go with the first chunk only (the kernel attaches them to
// the first skb, so a partial write still delivered them).
Status send_piece(int socket_fd, const char* bytes, size_t length, std::span<const int> fds) {
  bool fds_pending = !fds.empty();
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  while (length > 0) {
    iovec iov{const_cast<char*>(bytes), length};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fds_pending) {
      std::memset(control.data(), 0, control.size());
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      cmsghdr* header = CMSG_FIRSTHDR(&msg);
      header->cmsg_level = SOL_SOCKET;
      header->cmsg_type = SCM_RIGHTS;
      header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
    }
    // MSG_NOSIGNAL: a server that hung up must produce EPIPE, not kill the client.
    ssize_t sent = ::sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return fail_errno("sendmsg of the uffd handshake failed");
    }
    fds_pending = false;
    bytes += sent;
    length -= static_cast<size_t>(sent);
  }
  return {};
}

}  // namespace

Status send_handshake(int socket_fd, const std::string& json, std::span<const int> fds,
                      const SendPlan& plan) {
  std::vector<size_t> cuts;
  cuts.push_back(0);
  for (size_t at : plan.split_at) {
    if (at <= cuts.back() || at >= json.size()) {
      return fail("SendPlan split position " + std::to_string(at) +
                  " is not strictly increasing inside the " + std::to_string(json.size()) +
                  "-byte message");
    }
    cuts.push_back(at);
  }
  cuts.push_back(json.size());
  const size_t pieces = cuts.size() - 1;
  if (plan.fd_piece >= pieces) {
    return fail("SendPlan puts the fds in piece " + std::to_string(plan.fd_piece) + " of " +
                std::to_string(pieces));
  }
  for (size_t i = 0; i < pieces; ++i) {
    std::span<const int> piece_fds = (i == plan.fd_piece) ? fds : std::span<const int>{};
    if (auto s = send_piece(socket_fd, json.data() + cuts[i], cuts[i + 1] - cuts[i], piece_fds); !s) {
      return s;
    }
    if (i + 1 < pieces && plan.pause_between_pieces.count() > 0) {
      std::this_thread::sleep_for(plan.pause_between_pieces);
    }
  }
  return {};
}

}  // namespace faultline::client
