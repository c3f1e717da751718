#include "metrics/http_exporter.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include <httplib.h>

#include "common/unique_fd.h"

namespace faultline::metrics {

namespace {

using Clock = std::chrono::steady_clock;

// How often a wait re-checks whether the exporter is stopping.
constexpr std::chrono::milliseconds kStopCheck{100};

// A connection's socket, with one deadline for the whole exchange and a cap
// on the bytes read. cpp-httplib's own socket stream only has per-read and
// per-write timeouts, which a client defeats by sending a byte now and then.
class DeadlineStream final : public httplib::Stream {
 public:
  DeadlineStream(int fd, Clock::time_point deadline, size_t max_read, const std::atomic<bool>& stopping)
      : fd_(fd), deadline_(deadline), max_read_(max_read), stopping_(stopping) {}

  bool is_readable() const override { return buffered() > 0 || wait(POLLIN); }
  bool is_writable() const override { return wait(POLLOUT); }

  ssize_t read(char* ptr, size_t size) override {
    if (buffered() == 0) {
      if (total_read_ >= max_read_) return -1;  // the request is too large: give up on it
      begin_ = end_ = 0;
      for (;;) {
        if (!wait(POLLIN)) return -1;
        const size_t want = std::min(sizeof buffer_, max_read_ - total_read_);
        const ssize_t n = ::recv(fd_, buffer_, want, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
        if (n <= 0) return n;
        end_ = static_cast<size_t>(n);
        total_read_ += end_;
        break;
      }
    }
    const size_t n = std::min(size, buffered());
    std::memcpy(ptr, buffer_ + begin_, n);
    begin_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    for (;;) {
      if (!wait(POLLOUT)) return -1;
      // MSG_NOSIGNAL: a client that went away must not SIGPIPE the daemon.
      const ssize_t n = ::send(fd_, ptr, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
      return n;
    }
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { address_of(false, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { address_of(true, ip, port); }
  socket_t socket() const override { return fd_; }

 private:
  size_t buffered() const { return end_ - begin_; }

  // Waits until the socket is ready for `events`, the deadline passed, or the
  // exporter is stopping (then false).
  bool wait(short events) const {
    for (;;) {
      if (stopping_.load(std::memory_order_acquire)) return false;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, events, 0};
      const int rc = ::poll(&p, 1, static_cast<int>(std::min(left, kStopCheck).count()));
      if (rc < 0 && errno != EINTR) return false;
      if (rc > 0) return (p.revents & (events | POLLHUP | POLLERR)) != 0;
    }
  }

  void address_of(bool local, std::string& ip, int& port) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    const int rc = local ? ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len)
                         : ::getpeername(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    char host[NI_MAXHOST] = "";
    char serv[NI_MAXSERV] = "";
    if (rc == 0 && ::getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof host, serv, sizeof serv,
                                 NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
      ip = host;
      port = std::atoi(serv);
    }
  }

  int fd_;
  Clock::time_point deadline_;
  size_t max_read_;
  const std::atomic<bool>& stopping_;
  char buffer_[4096];
  size_t begin_ = 0, end_ = 0;
  size_t total_read_ = 0;
};

// cpp-httplib's own ThreadPool queues accepted connections without limit;
// this one holds at most `max_queued` and makes the accept loop wait for
// room, so a flood of connections stays in the kernel's listen backlog.
class BoundedTaskQueue final : public httplib::TaskQueue {
 public:
  BoundedTaskQueue(size_t threads, size_t max_queued) : max_queued_(max_queued) {
    for (size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~BoundedTaskQueue() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::unique_lock lock(mu_);
    room_.wait(lock, [&] { return jobs_.size() < max_queued_; });
    jobs_.push_back(std::move(fn));
    work_.notify_one();
  }

  // Runs what is queued (each job owns an accepted socket and closes it),
  // then joins the threads.
  void shutdown() override {
    {
      std::lock_guard lock(mu_);
      if (shut_down_) return;
      shut_down_ = true;
    }
    work_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock lock(mu_);
        work_.wait(lock, [&] { return !jobs_.empty() || shut_down_; });
        if (jobs_.empty()) return;
        fn = std::move(jobs_.front());
        jobs_.pop_front();
        room_.notify_one();
      }
      try {
        fn();
      } catch (...) {
        // The job serves one connection inside its own catch-all; nothing
        // may end this thread (and with it the daemon) all the same.
      }
    }
  }

  const size_t max_queued_;
  std::mutex mu_;
  std::condition_variable work_, room_;
  std::deque<std::function<void()>> jobs_;  // GUARDED_BY(mu_)
  bool shut_down_ = false;                  // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

// httplib::Server serving each connection through a DeadlineStream, one
// request per connection. Overriding process_and_close_socket() is how
// cpp-httplib's own SSLServer plugs in its stream.
class BoundedServer final : public httplib::Server {
 public:
  BoundedServer(std::chrono::milliseconds deadline, size_t max_request_bytes)
      : deadline_(deadline), max_request_bytes_(max_request_bytes) {}

  // Closes the listening socket, which ends the accept loop, and makes every
  // connection in progress give up at its next wait. Unlike Server::stop(),
  // it works even before the accept loop has started.
  void shut_down() {
    stopping_.store(true, std::memory_order_release);
    const socket_t sock = svr_sock_.exchange(INVALID_SOCKET);
    if (sock != INVALID_SOCKET) {
      ::shutdown(sock, SHUT_RDWR);
      ::close(sock);
    }
  }
  bool stopping() const { return stopping_.load(std::memory_order_acquire); }

 private:
  bool process_and_close_socket(socket_t sock) override {
    try {
      DeadlineStream stream(sock, Clock::now() + deadline_, max_request_bytes_, stopping_);
      bool connection_closed = false;
      process_request(stream, /*close_connection=*/true, connection_closed, [](httplib::Request&) {});
    } catch (...) {
      // Whatever a client sent, it ends here: its connection is closed below.
    }
    ::shutdown(sock, SHUT_RDWR);
    ::close(sock);
    return true;
  }

  const std::chrono::milliseconds deadline_;
  const size_t max_request_bytes_;
  std::atomic<bool> stopping_{false};
};

// Binds a socket the way cpp-httplib does, only to learn why it fails.
Error bind_error(const ListenAddress& a) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(a.port);
  const std::string what = "cannot listen on the metrics address " + a.to_string();
  if (const int rc = ::getaddrinfo(a.host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return Error{0, what + ": " + ::gai_strerror(rc)};
  }
  int err = 0;
  for (addrinfo* p = res; p != nullptr; p = p->ai_next) {
    UniqueFd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd) {
      err = errno;
      continue;
    }
    const int yes = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    if (::bind(fd.get(), p->ai_addr, p->ai_addrlen) != 0 || ::listen(fd.get(), 1) != 0) {
      err = errno;
      continue;
    }
    err = 0;
    break;
  }
  ::freeaddrinfo(res);
  return Error{err, what};
}

}  // namespace

std::string ListenAddress::to_string() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Result<ListenAddress> parse_listen_address(std::string_view text) {
  auto bad = [&](const std::string& why) {
    return fail("bad metrics address '" + std::string(text) + "': " + why + " (expected HOST:PORT or [IPV6]:PORT)");
  };
  ListenAddress a;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) return bad("no closing ']'");
    a.host = std::string(text.substr(1, close - 1));
    if (close + 1 >= text.size() || text[close + 1] != ':') return bad("no ':PORT' after the address");
    port = text.substr(close + 2);
    if (a.host.find(':') == std::string::npos) return bad("brackets are for IPv6 addresses");
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no port");
    a.host = std::string(text.substr(0, colon));
    if (a.host.find(':') != std::string::npos) return bad("an IPv6 address needs brackets");
    port = text.substr(colon + 1);
  }
  if (a.host.empty()) return bad("no host (use 0.0.0.0 or [::] for every address)");
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || value > 65535) {
    return bad("'" + std::string(port) + "' is not a port number");
  }
  a.port = static_cast<uint16_t>(value);
  return a;
}

struct HttpExporter::Impl {
  ListenAddress address;
  std::unique_ptr<BoundedServer> server;
  std::thread listener;
  const Logger* log = nullptr;
};

HttpExporter::HttpExporter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<HttpExporter>> HttpExporter::start(const Options& options, RenderFn render, const Logger* log) {
  auto address = parse_listen_address(options.address);
  if (!address) return std::unexpected(address.error());
  if (options.threads < 1 || options.max_queued < 1) return fail("the metrics exporter needs a thread and a queue");
  auto impl = std::make_unique<Impl>();
  impl->address = *address;
  impl->log = log;
  impl->server = std::make_unique<BoundedServer>(options.deadline, options.max_request_bytes);
  BoundedServer& srv = *impl->server;
  const size_t threads = static_cast<size_t>(options.threads);
  const size_t max_queued = options.max_queued;
  srv.new_task_queue = [threads, max_queued] { return new BoundedTaskQueue(threads, max_queued); };
  srv.set_payload_max_length(options.max_request_bytes);
  // cpp-httplib's default also sets SO_REUSEPORT, with which a second daemon
  // given the same address would bind it too and share its scrapes. Only
  // SO_REUSEADDR: a restarted daemon rebinds despite old connections in
  // TIME_WAIT, and a port in use is an error.
  srv.set_socket_options([](socket_t sock) {
    const int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  srv.Get("/metrics", [render = std::move(render)](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), std::string(kContentType));
  });
  // Exceptions are already caught around each connection; this only turns
  // one from a render into a 500 instead of a dropped connection.
  srv.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    res.status = 500;
    res.set_content("internal error\n", "text/plain");
  });

  if (address->port == 0) {
    const int port = srv.bind_to_any_port(address->host);
    if (port <= 0) return std::unexpected(bind_error(*address));
    impl->address.port = static_cast<uint16_t>(port);
  } else if (!srv.bind_to_port(address->host, address->port)) {
    return std::unexpected(bind_error(*address));
  }
  impl->listener = std::thread([&srv, log] {
    bool ok = false;
    try {
      ok = srv.listen_after_bind();
    } catch (...) {
      ok = false;
    }
    if (!ok && !srv.stopping() && log != nullptr) {
      log->error("metrics_stopped", {{"error", "the metrics HTTP server stopped accepting connections"}});
    }
  });
  if (log != nullptr) log->info("metrics_listening", {{"address", impl->address.to_string()}});
  return std::unique_ptr<HttpExporter>(new HttpExporter(std::move(impl)));
}

HttpExporter::~HttpExporter() {
  impl_->server->shut_down();
  if (impl_->listener.joinable()) impl_->listener.join();
}

const ListenAddress& HttpExporter::address() const { return impl_->address; }

}  // namespace faultline::metrics
