// A minimal HTTP/1.1 client over a TCP socket, for scraping an HttpExporter
// in tests and tools: sends bytes as given, reads the reply until the server
// closes the connection (HttpExporter serves one request per connection).
//
// Thread-safety: plain functions; each call owns its socket.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "common/error.h"
#include "metrics/http_exporter.h"

namespace faultline::metrics {

struct HttpReply {
  int status = 0;    // 0 when the server closed without a status line
  std::string head;  // status line and headers
  std::string body;
  // The value of header `name` (case-insensitive), or "".
  std::string header(std::string_view name) const;
};

// Connects to `address`, sends `request` verbatim, half-closes, and reads
// until EOF; an error when that takes longer than `limit` (a hang) or a
// system call fails.
Result<HttpReply> http_exchange(const ListenAddress& address, std::string_view request,
                                std::chrono::milliseconds limit = std::chrono::seconds(30));

// GET `path` (HTTP/1.1, Connection: close).
Result<HttpReply> http_get(const ListenAddress& address, std::string_view path,
                           std::chrono::milliseconds limit = std::chrono::seconds(30));

}  // namespace faultline::metrics
