// FaultProxy: a small HTTP proxy in front of the real S3 gateway that
// misbehaves on purpose, the way a store and a network do: answers 503
// SlowDown (or 400 RequestTimeout, 403 AccessDenied, or 404 NoSuchUpload as
// AWS answers a completion repeated after it succeeded), resets connections (before forwarding the request, or after
// it: the store acted, its answer is lost), waits, takes a request and never answers (a hung store), or damages a
// response body, each when the test's rule says so for that request. Everything else is forwarded byte for byte (SigV4
// signs the Host header, which the client computed for the proxy's address and which reaches the gateway unchanged).
//
// One request per client connection: the proxy asks the gateway to close
// after its answer and closes the client's connection after forwarding it,
// so a response is simply everything up to the gateway's EOF (chunked or
// not). The client reconnects for its next request.
//
// Thread-safety: the rule runs on the proxy's connection threads (one per
// connection), possibly at once: it must be thread-safe.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace faultline::testing {

class FaultProxy {
 public:
  enum class Action {
    kForward,
    kSlowDown,
    kRequestTimeout,
    kAccessDenied,
    kNoSuchUpload,
    kReset,
    kCorruptBody,
    kDelay,
    kLoseAnswer,
    kHang
  };
  struct Decision {
    Action action = Action::kForward;
    std::chrono::milliseconds delay{0};  // kDelay: then forward
  };
  using Rule = std::function<Decision(const std::string& method, const std::string& path)>;

  FaultProxy(int upstream_port, Rule rule) : upstream_port_(upstream_port), rule_(std::move(rule)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a = loopback(0);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 64) != 0) return;
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~FaultProxy() {
    stopping_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    std::vector<std::thread> done;
    {
      std::lock_guard lock(mu_);
      done.swap(connections_);
    }
    for (auto& t : done) t.join();
    ::close(listen_fd_);
  }
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  int port() const { return port_; }  // 0: could not listen
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }

 private:
  static sockaddr_in loopback(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
  }
  static bool write_all(int fd, std::string_view data) {
    while (!data.empty()) {
      const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  void accept_loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (stopping_) return;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;
      }
      std::lock_guard lock(mu_);
      connections_.emplace_back([this, fd] { serve(fd); });
    }
  }

  void serve(int fd) {
    // The request: headers, then a body of Content-Length bytes.
    std::string req;
    char buf[65536];
    size_t header_end;
    while ((header_end = req.find("\r\n\r\n")) == std::string::npos) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) return (void)::close(fd);
      req.append(buf, static_cast<size_t>(n));
    }
    size_t body_len = 0;
    {
      std::string lower = req.substr(0, header_end);
      for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (auto at = lower.find("\r\ncontent-length:"); at != std::string::npos) {
        body_len = std::stoull(lower.substr(at + 17));
      }
    }
    while (req.size() < header_end + 4 + body_len) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) return (void)::close(fd);
      req.append(buf, static_cast<size_t>(n));
    }
    const size_t sp1 = req.find(' '), sp2 = req.find(' ', sp1 + 1);
    const std::string method = req.substr(0, sp1), path = req.substr(sp1 + 1, sp2 - sp1 - 1);
    const Decision d = rule_(method, path);
    if (d.action == Action::kReset) {
      linger l{1, 0};  // close() sends RST
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
      ::close(fd);
      return;
    }
    if (d.action == Action::kSlowDown || d.action == Action::kRequestTimeout || d.action == Action::kAccessDenied ||
        d.action == Action::kNoSuchUpload) {
      // S3's answers: 503 SlowDown, 400 RequestTimeout for a request whose
      // body came too slowly, 403 AccessDenied for what the credentials may
      // not do, 404 NoSuchUpload for an upload completed or aborted already.
      const char* status = d.action == Action::kSlowDown         ? "503 Service Unavailable"
                           : d.action == Action::kRequestTimeout ? "400 Bad Request"
                           : d.action == Action::kAccessDenied   ? "403 Forbidden"
                                                                 : "404 Not Found";
      const char* code = d.action == Action::kSlowDown         ? "SlowDown"
                         : d.action == Action::kRequestTimeout ? "RequestTimeout"
                         : d.action == Action::kAccessDenied   ? "AccessDenied"
                                                               : "NoSuchUpload";
      const std::string body =
          std::string("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>") + code + "</Code></Error>";
      write_all(fd, std::string("HTTP/1.1 ") + status +
                        "\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: " +
                        std::to_string(body.size()) + "\r\n\r\n" + body);
      ::close(fd);
      return;
    }
    if (d.action == Action::kHang) {
      // The request taken, no answer ever: until the client gives up (closes)
      // or the proxy goes.
      while (!stopping_) {
        pollfd p{fd, POLLIN, 0};
        char c;
        if (::poll(&p, 1, 50) > 0 && ::recv(fd, &c, 1, MSG_DONTWAIT) <= 0) break;
      }
      ::close(fd);
      return;
    }
    if (d.action == Action::kDelay) std::this_thread::sleep_for(d.delay);  // the misbehaviour itself
    // Forward, asking the gateway to close after answering (not a signed header).
    const std::string upstream_req = req.substr(0, header_end) + "\r\nConnection: close" + req.substr(header_end);
    const int up = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a = loopback(upstream_port_);
    std::string resp;
    if (::connect(up, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && write_all(up, upstream_req)) {
      for (;;) {
        const ssize_t n = ::recv(up, buf, sizeof buf, 0);
        if (n <= 0) break;
        resp.append(buf, static_cast<size_t>(n));
      }
    }
    ::close(up);
    if (d.action == Action::kLoseAnswer) {
      linger l{1, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
      ::close(fd);
      return;
    }
    if (d.action == Action::kCorruptBody) {
      const size_t end = resp.find("\r\n\r\n");
      if (end != std::string::npos && resp.size() > end + 4) resp[resp.size() - 1] ^= 0x5a;  // last body byte
    }
    write_all(fd, resp);
    ::close(fd);
  }

  int upstream_port_;
  Rule rule_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> connections_;
};

}  // namespace faultline::testing
