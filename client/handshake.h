// The Firecracker side of the uffd handshake (DESIGN.md §2): the JSON message
// that describes guest memory and the single sendmsg() that carries it with
// the uffd (and, for forks, a guest memfd) in SCM_RIGHTS.
//
// handshake_json() is a pure function. send_handshake() writes to a socket the
// caller owns; it is safe to call from any thread, but two concurrent calls on
// the same socket interleave their bytes (REQUIRES: external synchronization
// per socket).
#pragma once

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "client/version.h"
#include "common/error.h"
#include "guest/region.h"

namespace faultline::client {

// The compact JSON (nlohmann dump(), no newline, no length prefix) that
// Firecracker `version` sends for `regions`. Field order as Firecracker
// serializes its GuestRegionUffdMapping: base_host_virt_addr, size, offset,
// then page_size (v1.12+) and page_size_kib (v1.7+). Both page-size fields
// hold bytes (4096 or 2097152): Firecracker named one of them wrongly.
std::string handshake_json(std::span<const GuestRegion> regions, const FirecrackerVersion& version);

// How to deliver the message. The default is what Firecracker does: one
// sendmsg() with all the JSON and the fds. The other shapes exist for protocol
// tests of a server: a stream socket may legally deliver the JSON in pieces,
// and the fd may arrive with any of them.
struct SendPlan {
  // Byte positions at which the JSON is cut into separate sendmsg() calls;
  // strictly increasing, each inside (0, json.size()). Empty: one piece.
  std::vector<size_t> split_at;
  // Index of the piece that carries the SCM_RIGHTS fds.
  size_t fd_piece = 0;
  // Pause after each piece but the last, so the server's reads see the pieces
  // separately rather than coalesced by the socket buffer.
  std::chrono::milliseconds pause_between_pieces{0};

  // The fds "alone" first, then the rest of the JSON. On a Unix stream
  // socket ancillary data sent with zero payload bytes is silently dropped
  // (verified on 6.18: the receiver gets the next bytes and no fd), so
  // "alone" is the first byte of the JSON ('[') with the fds.
  static SendPlan fds_with_first_byte(std::chrono::milliseconds pause = std::chrono::milliseconds(20)) {
    return SendPlan{{1}, 0, pause};
  }
  // The JSON cut into `pieces` nearly equal parts, fds with piece `fd_piece`.
  static SendPlan even_pieces(size_t json_size, size_t pieces, size_t fd_piece,
                              std::chrono::milliseconds pause = std::chrono::milliseconds(20));
};

// Sends `json` with `fds` in SCM_RIGHTS on the connected stream socket
// `socket_fd`, shaped by `plan`. Does not close the socket.
Status send_handshake(int socket_fd, const std::string& json, std::span<const int> fds,
                      const SendPlan& plan = {});

}  // namespace faultline::client
