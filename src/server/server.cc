#include "server/server.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>

#include "kernel/process.h"
#include "server/control.h"
#include "protocol/handshake_socket.h"

namespace faultline {

struct Server::Connection {
  uint64_t id = 0;
  UniqueFd fd;
  std::thread thread;
  std::atomic<bool> done{false};
  std::mutex mu;
  std::shared_ptr<Session> session;  // GUARDED_BY(mu)
};

namespace {

// Loads FILE.zeroidx, or builds it on first use (and when the snapshot
// changed), saving it beside the snapshot when the directory is writable.
Result<std::shared_ptr<const ZeroIndex>> open_zero_index(const ServerConfig& config, const MemoryFile& memory,
                                                         const Logger& log) {
  const std::string path = config.zero_index_path.empty() ? config.memory_path + ".zeroidx" : config.zero_index_path;
  auto id = identify_file(config.memory_path);
  if (!id) return std::unexpected(id.error());
  auto loaded = ZeroIndex::load(path, *id);
  if (loaded) {
    log.info("zero_index_loaded", {{"path", path}, {"zero_pages", loaded->zero_pages()}, {"pages", loaded->pages()}});
    return std::make_shared<const ZeroIndex>(std::move(*loaded));
  }
  const auto started = std::chrono::steady_clock::now();
  auto built = ZeroIndex::build(memory, *id);
  if (!built) return std::unexpected(built.error());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  log.info("zero_index_built", {{"path", path},
                                {"reason", loaded.error().describe()},
                                {"zero_pages", built->zero_pages()},
                                {"pages", built->pages()},
                                {"seconds", seconds}});
  if (auto st = built->save(path); !st) {
    log.warn("zero_index_not_saved", {{"path", path}, {"error", st.error().describe()}});
  }
  return std::make_shared<const ZeroIndex>(std::move(*built));
}

}  // namespace

Result<std::unique_ptr<Server>> Server::create(const ServerConfig& config, const Logger& logger) {
  auto memory = MemoryFile::open(config.memory_path);
  if (!memory) return std::unexpected(memory.error());
  auto listener = protocol::UnixListener::bind(config.socket_path);
  if (!listener) return std::unexpected(listener.error());
  std::shared_ptr<const WorkingSet> prefetch;
  if (!config.prefetch_path.empty()) {
    auto set = read_working_set(config.prefetch_path, (*memory)->size());
    if (!set) return std::unexpected(set.error());
    prefetch = std::make_shared<const WorkingSet>(std::move(*set));
  }
  std::shared_ptr<const ZeroIndex> zero_index;
  if (config.zero_index) {
    auto z = open_zero_index(config, **memory, logger);
    if (!z) return std::unexpected(z.error());
    zero_index = std::move(*z);
  }
  auto server = std::unique_ptr<Server>(new Server(config, logger, std::move(*memory), std::move(*listener)));
  server->prefetch_ = std::move(prefetch);
  server->zero_index_ = std::move(zero_index);
  if (!config.control_path.empty()) {
    auto control = protocol::UnixListener::bind(config.control_path);
    if (!control) return std::unexpected(control.error());
    server->control_.emplace(std::move(*control));
  }
  return server;
}

Server::Server(ServerConfig config, const Logger& logger, std::shared_ptr<MemoryFile> memory,
               protocol::UnixListener listener)
    : config_(std::move(config)), log_(logger), memory_(std::move(memory)), listener_(std::move(listener)) {
  stop_efd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
}

Server::~Server() {
  stop();
  reap(true);
}

void Server::stop() {
  uint64_t one = 1;
  (void)!::write(stop_efd_.get(), &one, sizeof one);
}

Status Server::run() {
  log_.info("server_start", {{"socket", config_.socket_path},
                             {"memory", config_.memory_path},
                             {"memory_bytes", memory_->size()},
                             {"workers_per_session", config_.workers_per_session},
                             {"on_fatal", to_string(config_.on_fatal)},
                             {"record", config_.record_path},
                             {"prefetch", config_.prefetch_all ? std::string("all") : config_.prefetch_path},
                             {"prefetch_pages", prefetch_ ? prefetch_->offsets.size() : 0},
                             {"zero_pages", zero_index_ ? zero_index_->zero_pages() : 0}});
  for (;;) {
    std::array<pollfd, 3> fds{{{listener_.fd(), POLLIN, 0},
                               {stop_efd_.get(), POLLIN, 0},
                               {control_ ? control_->fd() : -1, POLLIN, 0}}};
    // Wake up now and then to join the threads of sessions that ended.
    const int rc = ::poll(fds.data(), fds.size(), 200);
    if (rc < 0 && errno != EINTR) return fail_errno("poll on the listening socket failed");
    reap(false);
    if (fds[1].revents) break;
    if (fds[2].revents & POLLIN) {
      int cfd = ::accept4(control_->fd(), nullptr, nullptr, SOCK_CLOEXEC);
      if (cfd >= 0) {
        UniqueFd owned(cfd);
        answer_control(cfd);
      }
    }
    if (rc <= 0 || !(fds[0].revents & POLLIN)) continue;
    int cfd = ::accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (cfd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      log_.error("accept_failed", {{"error", std::string(std::strerror(errno))}});
      continue;
    }
    auto c = std::make_unique<Connection>();
    c->id = next_id_++;
    c->fd.reset(cfd);
    Connection* raw = c.get();
    {
      std::lock_guard lock(mu_);
      connections_.push_back(std::move(c));
    }
    connection_threads_.fetch_add(1, std::memory_order_acq_rel);
    raw->thread = std::thread([this, raw] { handle_connection(*raw); });
  }
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    for (auto& c : connections_) {
      std::lock_guard clock(c->mu);
      if (c->session) c->session->stop();
    }
  }
  reap(true);
  log_.info("server_stop", {{"sessions", finished_sessions().size()}});
  return {};
}

void Server::answer_control(int fd) const {
  // One short request per connection; a client that stalls is dropped
  // after a second so it cannot hold up accepting VMs.
  timeval tv{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string request;
  char buf[4096];
  while (request.find('\n') == std::string::npos && request.size() < 65536) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    request.append(buf, static_cast<size_t>(n));
  }
  std::string reply = handle_control_request(*this, request.substr(0, request.find('\n'))) + "\n";
  size_t off = 0;
  while (off < reply.size()) {
    const ssize_t n = ::send(fd, reply.data() + off, reply.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
}

bool Server::kill_unserved_peer(pid_t pid) const {
  if (config_.on_fatal != OnFatal::kKill) return false;
  auto peer = kernel::PeerProcess::open(pid);
  return peer && peer->kill().has_value();
}

void Server::handle_connection(Connection& c) {
  protocol::HandshakeOptions options;
  options.timeout = config_.handshake_timeout;
  options.max_regions = config_.max_regions;
  protocol::HandshakeFailure failure;
  auto hs = protocol::receive_handshake(std::move(c.fd), options, &failure);
  if (!hs) {
    // A client that already handed over its uffd may resume a VM nobody
    // serves: it would hang on its first fault. --on-fatal applies.
    const bool killed = failure.uffd_received && failure.peer && kill_unserved_peer(failure.peer->pid);
    log_.error("handshake_failed", {{"session", c.id},
                                    {"pid", failure.peer ? static_cast<int64_t>(failure.peer->pid) : int64_t{0}},
                                    {"error", hs.error().describe()},
                                    {"uffd_received", failure.uffd_received},
                                    {"peer_killed", killed}});
    std::lock_guard lock(mu_);
    rejected_.push_back(hs.error().describe());
    c.done = true;
    ended_cv_.notify_all();
    return;
  }
  const pid_t pid = hs->peer.pid;
  SessionConfig sc{.id = c.id,
                   .workers = config_.workers_per_session,
                   .on_fatal = config_.on_fatal,
                   .logger = &log_,
                   .record_path = config_.record_path,
                   .prefetch = prefetch_,
                   .prefetch_all = config_.prefetch_all,
                   .prefetch_threads = config_.prefetch_threads,
                   .zero_index = zero_index_,
                   .reader_serves_cached = config_.reader_serves_cached,
                   .busy_poll = config_.busy_poll};
  auto session = Session::start(std::move(*hs), memory_, sc);
  if (!session) {
    // We hold the VM's uffd and cannot serve it: the guest would hang.
    const bool killed = kill_unserved_peer(pid);
    log_.error("session_rejected", {{"session", c.id}, {"pid", pid}, {"error", session.error().describe()},
                                    {"peer_killed", killed}, {"on_fatal", to_string(config_.on_fatal)}});
    std::lock_guard lock(mu_);
    rejected_.push_back(session.error().describe());
    c.done = true;
    ended_cv_.notify_all();
    return;
  }
  std::shared_ptr<Session> owned = std::move(*session);
  Session* s = owned.get();
  {
    std::lock_guard lock(mu_);
    std::lock_guard clock(c.mu);
    c.session = std::move(owned);
    if (stopping_) s->stop();
  }
  s->wait();
  std::lock_guard lock(mu_);
  finished_.push_back(s->summary());
  c.done = true;
  ended_cv_.notify_all();
}

void Server::reap(bool all) {
  std::list<std::unique_ptr<Connection>> done;
  {
    std::unique_lock lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (all || (*it)->done) {
        done.push_back(std::move(*it));
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : done) {
    const bool had_thread = c->thread.joinable();
    if (had_thread) c->thread.join();
    // Free the connection (its session's fds and memory) before the count
    // says it is gone, so that connection_threads() == 0 means released.
    c.reset();
    if (had_thread) connection_threads_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

std::vector<SessionSummary> Server::finished_sessions() const {
  std::lock_guard lock(mu_);
  return finished_;
}

std::vector<std::string> Server::rejected_connections() const {
  std::lock_guard lock(mu_);
  return rejected_;
}

size_t Server::active_sessions() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const auto& c : connections_) n += c->done ? 0 : 1;
  return n;
}

std::shared_ptr<Session> Server::session(uint64_t id) const {
  std::lock_guard lock(mu_);
  for (const auto& c : connections_) {
    std::lock_guard clock(c->mu);
    if (c->id == id && c->session && !c->done) return c->session;
  }
  return nullptr;
}

std::vector<SessionSummary> Server::live_sessions() const {
  std::lock_guard lock(mu_);
  std::vector<SessionSummary> out;
  for (const auto& c : connections_) {
    std::lock_guard clock(c->mu);
    if (c->session && !c->done) out.push_back(c->session->summary());
  }
  return out;
}

bool Server::wait_for_ended(size_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  return ended_cv_.wait_for(lock, timeout, [&] { return finished_.size() + rejected_.size() >= n; });
}

}  // namespace faultline
