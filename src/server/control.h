// The control socket: a Unix socket on which operators and tools ask a
// running daemon about its sessions. One request per connection, one line of
// JSON each way:
//   {"cmd":"sessions"}                    -> {"sessions":[{summary}, ...]}
//   {"cmd":"page_map","session":N}        -> PageMap::to_json() (the dirty query)
//   {"cmd":"record","session":N,"name":F} -> writes the session's working set now,
//                                            to F inside the daemon's --record-dir
//   {"cmd":"snapshot","session":N,"store":D,"name":I}
//                                         -> writes image I on top of the served image,
//                                            from the (paused) VM's memory (Server::snapshot)
//   {"cmd":"attach","socket":S,"image":I}  (or "memory":F; optional "prefetch":P|"all")
//                                         -> binds VM socket S (in --socket-dir) to image I
//                                            or memory file F (Server::attach): {attachment}
//   {"cmd":"detach","socket":S}           -> removes socket S; its VMs are served on: {attachment}
//   {"cmd":"attachments"}                 -> {"attachments":[{attachment}, ...]}
// Errors come back as {"error":"..."}.
//
// The socket is served by ServerConfig::control_threads threads, a request
// each, with a deadline for reading the request and one for writing the
// reply (see Server); a snapshot holds its thread while it writes its image,
// an attach while it opens its image. This file turns a request line into a reply and never throws,
// whatever bytes the line holds.
//
// Thread-safety: every function is safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"

namespace faultline {

class Server;

struct ControlRequest {
  enum class Command { kSessions, kPageMap, kRecord, kSnapshot, kAttach, kDetach, kAttachments };
  Command command = Command::kSessions;
  uint64_t session = 0;
  bool pagemap_fallback = false;  // page_map: read /proc/PID/pagemap instead of PAGEMAP_SCAN
  std::string name;               // record: a plain file name inside --record-dir; snapshot: the new image
  std::string store;              // snapshot: the store directory (must be the one the daemon serves from)
  std::string socket;             // attach, detach: the VM socket
  std::string image, memory;      // attach: what the socket serves (exactly one)
  std::string prefetch;           // attach: a working-set file, "all", or empty
};

// Parses one request line. Pure: no I/O, no shared state; never throws.
Result<ControlRequest> parse_control_request(std::string_view line);

// {"error":"..."} for `message`, whatever bytes it holds (invalid UTF-8 is
// replaced, never thrown on).
std::string control_error_reply(std::string_view message);

// Parses `line` and answers it from `server`'s state.
std::string handle_control_request(Server& server, std::string_view line);

}  // namespace faultline
