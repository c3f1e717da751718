#include "metrics/http_get.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <vector>

#include "common/unique_fd.h"

namespace faultline::metrics {

std::string HttpReply::header(std::string_view name) const {
  size_t pos = head.find("\r\n");
  while (pos != std::string::npos && pos + 2 < head.size()) {
    const size_t start = pos + 2;
    const size_t end = head.find("\r\n", start);
    const std::string_view line(head.data() + start, (end == std::string::npos ? head.size() : end) - start);
    const size_t colon = line.find(':');
    if (colon != std::string_view::npos && colon == name.size() &&
        std::equal(name.begin(), name.end(), line.begin(),
                   [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) ==
                                               std::tolower(static_cast<unsigned char>(b)); })) {
      std::string_view v = line.substr(colon + 1);
      while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
      return std::string(v);
    }
    pos = end;
  }
  return {};
}

Result<HttpReply> http_exchange(const ListenAddress& address, std::string_view request,
                                std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(address.port);
  if (const int rc = ::getaddrinfo(address.host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return fail("cannot resolve " + address.to_string() + ": " + ::gai_strerror(rc));
  }
  UniqueFd fd;
  int err = 0;
  for (addrinfo* p = res; p != nullptr && !fd; p = p->ai_next) {
    UniqueFd s(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (s && ::connect(s.get(), p->ai_addr, p->ai_addrlen) == 0) {
      fd = std::move(s);
    } else {
      err = errno;
    }
  }
  ::freeaddrinfo(res);
  if (!fd) return std::unexpected(Error{err, "cannot connect to " + address.to_string()});

  auto wait = [&](short events) -> Status {
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return fail("no reply from " + address.to_string() + " within the time limit");
      pollfd p{fd.get(), events, 0};
      const int rc = ::poll(&p, 1, static_cast<int>(left.count()));
      if (rc > 0) return {};
      if (rc < 0 && errno != EINTR) return fail_errno("poll failed");
    }
  };
  size_t sent = 0;
  while (sent < request.size()) {
    if (auto st = wait(POLLOUT); !st) return std::unexpected(st.error());
    const ssize_t n = ::send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    // The server may answer (and close) before it read everything: go read.
    if (n < 0) break;
    sent += static_cast<size_t>(n);
  }
  ::shutdown(fd.get(), SHUT_WR);
  std::string raw;
  std::vector<char> buf(256 * 1024);
  for (;;) {
    if (auto st = wait(POLLIN); !st) return std::unexpected(st.error());
    const ssize_t n = ::recv(fd.get(), buf.data(), buf.size(), MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n < 0 && errno == ECONNRESET) break;  // the server dropped us: what came so far is the reply
    if (n < 0) return fail_errno("reading from " + address.to_string() + " failed");
    if (n == 0) break;
    raw.append(buf.data(), static_cast<size_t>(n));
  }
  HttpReply reply;
  const size_t end_of_head = raw.find("\r\n\r\n");
  reply.head = raw.substr(0, end_of_head);
  if (end_of_head != std::string::npos) reply.body = raw.substr(end_of_head + 4);
  if (reply.head.rfind("HTTP/1.", 0) == 0 && reply.head.size() >= 12) reply.status = std::atoi(reply.head.c_str() + 9);
  return reply;
}

Result<HttpReply> http_get(const ListenAddress& address, std::string_view path, std::chrono::milliseconds limit) {
  const std::string request = "GET " + std::string(path) + " HTTP/1.1\r\nHost: " + address.to_string() +
                              "\r\nConnection: close\r\n\r\n";
  return http_exchange(address, request, limit);
}

}  // namespace faultline::metrics
