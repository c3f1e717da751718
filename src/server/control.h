// The control socket: a Unix socket on which operators and tools ask a
// running daemon about its sessions. One request per connection, one line of
// JSON each way:
//   {"cmd":"sessions"}                  -> {"sessions":[{summary}, ...]}
//   {"cmd":"page_map","session":N}      -> PageMap::to_json() (the dirty query)
//   {"cmd":"record","session":N,"path":P} -> writes the session's working set now
// Errors come back as {"error":"..."}.
//
// Thread-safety: handle_control_request() is safe from any thread.
#pragma once

#include <string>
#include <string_view>

namespace faultline {

class Server;

std::string handle_control_request(const Server& server, std::string_view request);

}  // namespace faultline
