#include "protocol/handshake_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string_view>

namespace faultline::protocol {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view kUserfaultfdLink = "anon_inode:[userfaultfd]";
constexpr size_t kReceiveChunk = 64 * 1024;

// Debian 12's headers predate SO_PEERPIDFD (Linux 6.5, asm-generic value 77).
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

// What /proc/self/fd/N points at: "anon_inode:[userfaultfd]", "pipe:[123]",
// "/memfd:guest (deleted)"... Empty when it cannot be read.
std::string fd_link(int fd) {
  std::string proc = "/proc/self/fd/" + std::to_string(fd);
  char target[256];
  ssize_t n = ::readlink(proc.c_str(), target, sizeof target);
  if (n < 0) return {};
  return std::string(target, static_cast<size_t>(n));
}

// Takes ownership of every SCM_RIGHTS fd in `msg`, whatever else is wrong
// with the message, so that no error path can leak one.
void adopt_received_fds(msghdr& msg, std::vector<UniqueFd>& fds) {
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* data = CMSG_DATA(cmsg);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
}

std::string progress(size_t bytes, size_t fds, bool json_complete) {
  return std::to_string(bytes) + " bytes (" + (json_complete ? "JSON complete" : "JSON incomplete") +
         ") and " + std::to_string(fds) + (fds == 1 ? " fd" : " fds");
}

// The parse error for bytes the completeness scan rejected: nlohmann's own
// message says what a JSON reader thinks is wrong; the scan's reason says
// where the array broke. Both help someone debugging a client.
std::string invalid_json_message(const std::string& json, const std::string& scan_reason) {
  std::string message = "handshake bytes are not a JSON array: " + scan_reason;
  auto parsed = parse_handshake_json(json);
  if (!parsed) message += " (" + parsed.error().message + ")";
  return message;
}

}  // namespace

Result<PeerCredentials> peer_credentials(int connection_fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(connection_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return fail_errno("getsockopt(SO_PEERCRED) on the handshake connection failed");
  }
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

namespace {

// The body of receive_handshake(); received fds live in `fds` (the caller's)
// and the peer in `peer_out`, so that a failure can still be looked at.
Result<Handshake> receive_handshake_into(UniqueFd connection, const HandshakeOptions& options,
                                         std::vector<UniqueFd>& fds, std::optional<PeerCredentials>& peer_out,
                                         bool& fds_lost, bool& over_region_limit) {
  if (!connection.valid()) return fail("receive_handshake was given no connection", EBADF);

  auto peer = peer_credentials(connection.get());
  if (!peer) return std::unexpected(peer.error());
  peer_out = *peer;

  const Clock::time_point deadline = Clock::now() + options.timeout;
  std::string json;
  json.reserve(4096);
  std::optional<ParsedHandshake> parsed;
  bool peer_closed = false;
  std::vector<unsigned char> control(CMSG_SPACE(sizeof(int) * std::max<size_t>(options.max_fds, 1)));

  while (!(parsed && !fds.empty())) {
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      return fail("timed out after " + std::to_string(options.timeout.count()) +
                      " ms waiting for the Firecracker handshake; received " +
                      progress(json.size(), fds.size(), parsed.has_value()),
                  ETIMEDOUT);
    }
    auto wait = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    pollfd pfd{connection.get(), POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(wait.count(), INT32_MAX)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll on the handshake connection failed");
    }
    if (ready == 0) continue;  // the deadline check at the loop top reports it
    if (pfd.revents & POLLNVAL) return fail("handshake connection fd is not open", EBADF);

    // Never read more than one byte past the limit: enough to know it was
    // exceeded without buffering an unbounded stream.
    const size_t old_size = json.size();
    const size_t room = std::min(kReceiveChunk, options.max_json_bytes + 1 - old_size);
    json.resize(old_size + room);
    iovec iov{json.data() + old_size, room};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = options.max_fds == 0 ? 0 : control.size();
    // MSG_CMSG_CLOEXEC: received fds must not leak into anything we exec.
    // MSG_DONTWAIT: poll said readable, but never block past the deadline.
    ssize_t received = ::recvmsg(connection.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    const int recv_errno = errno;
    json.resize(old_size + static_cast<size_t>(std::max<ssize_t>(received, 0)));
    if (received < 0) {
      if (recv_errno == EAGAIN || recv_errno == EWOULDBLOCK || recv_errno == EINTR) continue;
      return fail("recvmsg on the handshake connection failed after " +
                      progress(json.size(), fds.size(), parsed.has_value()),
                  recv_errno);
    }
    adopt_received_fds(msg, fds);
    // With MSG_CTRUNC the kernel installed only the fds that fit and closed
    // the rest: the client sent more than we are prepared to hold.
    if (msg.msg_flags & MSG_CTRUNC) {
      // Also what EMFILE looks like here: the kernel could not install the
      // fds in our table and dropped them.
      fds_lost = true;
      return fail("handshake control data was truncated (MSG_CTRUNC): the client sent more than " +
                  std::to_string(options.max_fds) + " fds in one message");
    }
    if (fds.size() > options.max_fds) {
      return fail("handshake client sent " + std::to_string(fds.size()) + " fds; at most " +
                  std::to_string(options.max_fds) + " are accepted");
    }

    if (received == 0) {
      peer_closed = true;
      if (!parsed) {
        return fail("client closed the connection mid-handshake after " + std::to_string(json.size()) +
                    " bytes and " + std::to_string(fds.size()) + (fds.size() == 1 ? " fd" : " fds"));
      }
      // Complete JSON but no fd. Note a zero-length sendmsg on a Unix stream
      // socket carries no SCM_RIGHTS at all (the kernel drops the fds), so a
      // client that "sent the fd" with no data reaches this branch too.
      return fail("client closed the connection after sending the " + std::to_string(json.size()) +
                  "-byte handshake JSON but no userfaultfd");
    }
    if (json.size() > options.max_json_bytes) {
      return fail("handshake JSON exceeds the " + std::to_string(options.max_json_bytes) +
                  "-byte limit without completing");
    }

    // Rescan everything: cheap at handshake sizes, and a complete array
    // followed by new non-whitespace bytes must be rejected too.
    CompletenessScan scan = scan_json_array(json);
    if (scan.state == Completeness::kInvalid) return fail(invalid_json_message(json, scan.reason));
    // Before any per-region work: regions are counted as the bytes arrive.
    if (scan.elements > options.max_regions) {
      over_region_limit = true;
      return fail("handshake describes " + std::to_string(scan.elements) + " regions" +
                  (scan.state == Completeness::kComplete ? "" : " so far") + ", more than the limit of " +
                  std::to_string(options.max_regions) + " (faultline serve --max-regions)");
    }
    if (scan.state == Completeness::kComplete && !parsed) {
      auto result = parse_handshake_json(json);
      if (!result) return fail("invalid Firecracker handshake: " + result.error().message);
      parsed = std::move(*result);
    }
  }

  if (!peer_closed) {
    // Firecracker before v1.12 closes right after its single sendmsg; record
    // that now so the server does not mistake the expected EOF for a crash.
    pollfd pfd{connection.get(), POLLRDHUP, 0};
    if (::poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP))) peer_closed = true;
  }

  Handshake handshake;
  std::string seen;
  for (UniqueFd& fd : fds) {
    std::string link = fd_link(fd.get());
    if (!handshake.uffd.valid() && link == kUserfaultfdLink) {
      handshake.uffd = std::move(fd);
      continue;
    }
    if (!seen.empty()) seen += ", ";
    seen += link.empty() ? "unreadable fd link" : link;
    handshake.extra_fds.push_back(std::move(fd));
  }
  if (!handshake.uffd.valid()) {
    // Firecracker always sends the uffd it created; anything else means the
    // client is not Firecracker (or a fork that changed the protocol).
    return fail("none of the " + std::to_string(handshake.extra_fds.size()) +
                " fds received in the handshake is a userfaultfd (got: " + seen + ")");
  }
  handshake.regions = std::move(parsed->regions);
  handshake.format = parsed->format;
  handshake.peer = *peer;
  handshake.connection = std::move(connection);
  handshake.peer_closed = peer_closed;
  handshake.raw_json = std::move(json);
  return handshake;
}

}  // namespace

Result<Handshake> receive_handshake(UniqueFd connection, const HandshakeOptions& options, HandshakeFailure* failure) {
  std::vector<UniqueFd> fds;
  std::optional<PeerCredentials> peer;
  bool fds_lost = false, over_region_limit = false;
  auto hs = receive_handshake_into(std::move(connection), options, fds, peer, fds_lost, over_region_limit);
  if (!hs && failure != nullptr) {
    failure->peer = peer;
    failure->fds_lost = fds_lost;
    failure->over_region_limit = over_region_limit;
    failure->uffd_received = std::any_of(fds.begin(), fds.end(), [](const UniqueFd& fd) {
      return fd.valid() && fd_link(fd.get()) == kUserfaultfdLink;
    });
  }
  return hs;
}

const char* to_string(PeerIdentity::PidfdSource source) {
  switch (source) {
    case PeerIdentity::PidfdSource::kPeerPidfd: return "so_peerpidfd";
    case PeerIdentity::PidfdSource::kPidfdOpen: return "pidfd_open";
    case PeerIdentity::PidfdSource::kNone: return "none";
  }
  return "none";
}

Result<PeerIdentity> identify_peer(int connection_fd) {
  auto cred = peer_credentials(connection_fd);
  if (!cred) return std::unexpected(cred.error());
  PeerIdentity id;
  id.cred = *cred;
  // SO_PEERPIDFD names the process that called connect() (the kernel keeps
  // its struct pid with the socket), so no later process can stand in for
  // it. Verified on Linux 6.18: it also works for a peer in a pid namespace
  // we cannot see (SO_PEERCRED pid 0), whose exit the pidfd then reports,
  // though pidfd_send_signal() refuses it with EINVAL.
  int pidfd = -1;
  socklen_t len = sizeof pidfd;
  if (::getsockopt(connection_fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 && pidfd >= 0) {
    ::fcntl(pidfd, F_SETFD, FD_CLOEXEC);
    id.pidfd.reset(pidfd);
    id.source = PeerIdentity::PidfdSource::kPeerPidfd;
    return id;
  }
  // Older kernels (ENOPROTOOPT): pidfd_open right away. The process may
  // have exited and its pid been reused between its connect and this call;
  // taking it now, not when a kill is needed, makes that window as small as
  // it can be.
  if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) {
    return fail_errno("no pidfd for the peer (pid " + std::to_string(id.cred.pid) + ")");
  }
  if (id.cred.pid > 0) {
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, id.cred.pid, 0));
    if (fd >= 0) {
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
      id.pidfd.reset(fd);
      id.source = PeerIdentity::PidfdSource::kPidfdOpen;
    } else if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) {
      return fail_errno("no pidfd for the peer (pid " + std::to_string(id.cred.pid) + ")");
    }
  }
  return id;
}

bool drain_pending_uffd(int connection_fd) {
  bool uffd = false;
  std::vector<unsigned char> control(CMSG_SPACE(sizeof(int) * 8));
  char data[4096];
  // A few reads at most: Firecracker sends everything in one sendmsg, and a
  // client that keeps sending is not waited for.
  for (int round = 0; round < 4; ++round) {
    iovec iov{data, sizeof data};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    const ssize_t n = ::recvmsg(connection_fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n <= 0) break;
    std::vector<UniqueFd> fds;
    adopt_received_fds(msg, fds);
    for (const UniqueFd& fd : fds) uffd = uffd || fd_link(fd.get()) == kUserfaultfdLink;
    if (msg.msg_flags & MSG_CTRUNC) uffd = true;  // fds were dropped: assume the worst
  }
  return uffd;
}

// ---------------------------------------------------------------------------
// UnixListener

namespace {

// Applies `access` to the socket file bind() just created at `path`. The
// file is opened with O_PATH|O_NOFOLLOW and checked to be the very inode
// bind() created, so that a path swapped in the meantime (a symlink planted
// by someone who can write the directory) never redirects a chmod or chown.
Status apply_socket_access(const std::string& path, dev_t dev, ino_t ino, const SocketAccess& access) {
  UniqueFd file(::open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (!file) return fail_errno("cannot open the socket file \"" + path + "\" to set its permissions");
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) return fail_errno("cannot stat the socket file \"" + path + "\"");
  if (!S_ISSOCK(st.st_mode) || st.st_dev != dev || st.st_ino != ino) {
    return fail("the socket file \"" + path + "\" was replaced right after bind(); refusing to set permissions on it",
                EEXIST);
  }
  if (access.owner || access.group) {
    const uid_t uid = access.owner ? *access.owner : static_cast<uid_t>(-1);
    const gid_t gid = access.group ? *access.group : static_cast<gid_t>(-1);
    if (::fchownat(file.get(), "", uid, gid, AT_EMPTY_PATH) != 0) {
      return fail_errno("cannot change the owner of socket \"" + path + "\"");
    }
  }
  // chmod has no O_PATH form; /proc/self/fd/N names exactly the inode we
  // checked (the magic link is followed to it, never to a new path).
  const std::string via = "/proc/self/fd/" + std::to_string(file.get());
  if (::chmod(via.c_str(), access.mode & 07777) != 0) {
    return fail_errno("cannot set mode " + std::to_string(access.mode) + " on socket \"" + path + "\"");
  }
  return {};
}

}  // namespace

Result<UnixListener> UnixListener::bind(const std::string& path, const SocketAccess& access) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return fail("Unix socket path is empty", EINVAL);
  if (path.size() >= sizeof addr.sun_path) {
    return fail("Unix socket path \"" + path + "\" is longer than " +
                    std::to_string(sizeof addr.sun_path - 1) + " bytes",
                ENAMETOOLONG);
  }

  // A socket file outlives the process that bound it, so a restart finds the
  // previous one. It is replaced, but only if it is a socket: a typo in the
  // path must not delete someone's file.
  struct stat existing {};
  const bool stale = ::lstat(path.c_str(), &existing) == 0;
  if (stale && !S_ISSOCK(existing.st_mode)) {
    return fail("refusing to replace \"" + path + "\": it exists and is not a socket", EEXIST);
  }
  if (!stale && errno != ENOENT) return fail_errno("cannot inspect socket path \"" + path + "\"");

  // The socket is bound under a temporary name beside `path`, given its mode
  // and owner, made to listen, and only then renamed to `path`: the path
  // appears when connecting to it works (clients and orchestrators wait for
  // the file), and never with the wrong mode. When the temporary name would
  // not fit sun_path, `path` is bound directly: until listen() a connect()
  // is refused (ECONNREFUSED), so the mode still holds before any accept.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  uint32_t r = 0;
  (void)!::getrandom(&r, sizeof r, 0);
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, ".fl-%08x", r);
  const std::string temporary = dir + suffix;
  const bool via_temporary = temporary.size() < sizeof addr.sun_path;
  const std::string& bound = via_temporary ? temporary : path;
  if (!via_temporary && stale && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return fail_errno("cannot remove stale socket \"" + path + "\"");
  }
  std::memcpy(addr.sun_path, bound.c_str(), bound.size() + 1);

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket(AF_UNIX, SOCK_STREAM) failed");
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return fail_errno("cannot bind Unix socket \"" + bound + "\"");
  }
  auto abandon = [&](Error e) {
    ::unlink(bound.c_str());
    return std::unexpected(std::move(e));
  };
  struct stat created {};
  if (::lstat(bound.c_str(), &created) != 0) {
    return abandon(Error{errno, "cannot stat freshly bound socket \"" + bound + "\""});
  }
  if (auto st = apply_socket_access(bound, created.st_dev, created.st_ino, access); !st) return abandon(st.error());
  if (::listen(fd.get(), 64) != 0) return abandon(Error{errno, "cannot listen on Unix socket \"" + path + "\""});
  // rename() replaces a stale socket at `path` in one step.
  if (via_temporary && ::rename(temporary.c_str(), path.c_str()) != 0) {
    return abandon(Error{errno, "cannot rename the new socket to \"" + path + "\""});
  }
  return UnixListener(std::move(fd), path, created.st_dev, created.st_ino);
}

UnixListener::UnixListener(UnixListener&& other) noexcept
    : fd_(std::move(other.fd_)),
      path_(std::exchange(other.path_, std::string())),
      dev_(other.dev_),
      ino_(other.ino_) {}

UnixListener& UnixListener::operator=(UnixListener&& other) noexcept {
  if (this != &other) {
    unlink_if_ours();
    fd_ = std::move(other.fd_);
    path_ = std::exchange(other.path_, std::string());
    dev_ = other.dev_;
    ino_ = other.ino_;
  }
  return *this;
}

UnixListener::~UnixListener() { unlink_if_ours(); }

void UnixListener::unlink_if_ours() {
  if (path_.empty()) return;
  // Another process may have bound a new socket at the same path since (e.g.
  // a second server started by mistake); only remove the file we created.
  struct stat current {};
  if (::lstat(path_.c_str(), &current) == 0 && current.st_dev == dev_ && current.st_ino == ino_) {
    ::unlink(path_.c_str());
  }
  path_.clear();
}

Result<UniqueFd> UnixListener::accept() {
  while (true) {
    int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return UniqueFd(fd);
    // A connection reset before accept() shows up as ECONNABORTED on Linux;
    // it is no reason to stop listening.
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return fail_errno("accept on \"" + path_ + "\" failed");
  }
}

Result<UniqueFd> UnixListener::accept_with_timeout(std::chrono::milliseconds timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (true) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      return fail("no client connected to \"" + path_ + "\" within " + std::to_string(timeout.count()) + " ms",
                  ETIMEDOUT);
    }
    pollfd pfd{fd_.get(), POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll on listening socket \"" + path_ + "\" failed");
    }
    if (ready > 0) return accept();
  }
}

}  // namespace faultline::protocol
