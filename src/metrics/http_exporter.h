// HttpExporter: serves GET /metrics over HTTP (cpp-httplib) for Prometheus;
// every other path answers 404.
//
// Bounded, whatever a client does: a fixed number of threads serve requests
// (`threads`), at most `max_queued` accepted connections wait for one (the
// accept loop then stops accepting, and the kernel's backlog holds the
// rest), each connection serves one request and is closed, a request may
// not exceed `max_request_bytes` (request line, headers and body together),
// and reading the request plus writing the reply must finish within
// `deadline`: a client that trickles bytes or never reads is dropped then.
// Nothing a client sends can throw out of a serving thread: every request is
// served inside a catch-all.
//
// The exporter reads no guest data: the page holds counts only. Bind it to
// a loopback or management address.
//
// Thread-safety: start() and the destructor from one controlling thread;
// `render` is called from the serving threads, possibly concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/error.h"
#include "common/log.h"

namespace faultline::metrics {

// A listening address: "HOST:PORT", "[IPV6]:PORT". Port 0 asks for a free one.
struct ListenAddress {
  std::string host;  // without brackets
  uint16_t port = 0;
  std::string to_string() const;  // back to HOST:PORT / [IPV6]:PORT
};
Result<ListenAddress> parse_listen_address(std::string_view text);

class HttpExporter {
 public:
  struct Options {
    std::string address;  // as parse_listen_address() takes it
    int threads = 2;
    size_t max_queued = 16;
    std::chrono::milliseconds deadline{5000};  // per connection: request and reply together
    size_t max_request_bytes = 16 * 1024;
  };
  using RenderFn = std::function<std::string()>;

  // Binds `options.address` (an error if it cannot: in use, not local, bad
  // syntax) and starts serving; `render` produces the body of GET /metrics.
  // `log` (optional) gets metrics_listening and metrics_stopped events.
  static Result<std::unique_ptr<HttpExporter>> start(const Options& options, RenderFn render,
                                                     const Logger* log = nullptr);
  // Stops accepting, drops connections in progress, joins every thread.
  ~HttpExporter();
  HttpExporter(const HttpExporter&) = delete;
  HttpExporter& operator=(const HttpExporter&) = delete;

  // The address actually bound (with the port chosen when it was 0).
  const ListenAddress& address() const;

  // The Content-Type of the /metrics reply.
  static constexpr std::string_view kContentType = "text/plain; version=0.0.4";

 private:
  struct Impl;
  explicit HttpExporter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace faultline::metrics
