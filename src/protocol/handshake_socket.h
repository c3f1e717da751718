// The socket half of the Firecracker uffd handshake (DESIGN.md §2): listening
// on a Unix stream socket and receiving the region JSON plus the userfaultfd.
//
// This is the only code in faultline that touches the handshake socket. It
// hands the layers above typed values: parsed regions, an owned and verified
// userfaultfd, any extra fds, the peer's credentials, and the still-open
// connection (whose EOF later means "Firecracker exited" on v1.12+).
//
// Thread safety: receive_handshake() is a free function with no shared state;
// concurrent calls on different connections are safe. UnixListener is not
// thread-safe: REQUIRES external synchronization, and one thread accepting at
// a time (fd() may be polled from anywhere while the listener is alive).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "guest/region.h"
#include "protocol/handshake.h"

namespace faultline::protocol {

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct Handshake {
  std::vector<GuestRegion> regions;
  HandshakeFormat format = HandshakeFormat::kNoPageSize;
  UniqueFd uffd;                    // the first received fd that is a userfaultfd
  std::vector<UniqueFd> extra_fds;  // every other fd (forks send a guest memfd), in arrival order
  PeerCredentials peer;             // SO_PEERCRED of the connection
  UniqueFd connection;              // the accepted socket, still open
  // EOF (or peer hang-up) was already seen when the handshake completed.
  // Firecracker before v1.12 closes right after sending, so true is normal
  // there; false does not promise the peer is still alive.
  bool peer_closed = false;
  std::string raw_json;             // exactly the bytes received, for logs
  // A pidfd of the peer taken when it connected (identify_peer()), if the
  // caller had one; invalid otherwise. The session signals and watches the
  // peer through it, so that a pid reused since the connect is never hit.
  UniqueFd peer_pidfd;
};

struct HandshakeOptions {
  // Overall budget for the whole handshake, from the call to the last byte.
  std::chrono::milliseconds timeout{5000};
  // Firecracker sends ~110 bytes per region; 1 MiB is thousands of regions.
  size_t max_json_bytes = 1 << 20;
  // Most regions one handshake may describe (`faultline serve --max-regions`;
  // at most kMaxRegionsCeiling). Firecracker sends one region per guest
  // memory region it mmaps: one for an x86 guest up to 3 GiB, two above
  // (DRAM is split around the MMIO hole below 4 GiB), one on aarch64, and
  // since v1.14 one more for the virtio-mem hotplug area when configured (a
  // single mmap, whatever its number of KVM slots; checked in Firecracker's
  // persist.rs and vstate/memory.rs). So at most 3; 64 leaves room for forks
  // and other VMMs while keeping what a client can make the server do per
  // handshake small (every region is validated, indexed and looked up at
  // O(log n) per fault, at any count up to the ceiling). Counted as the JSON
  // arrives, before anything is parsed.
  size_t max_regions = 64;
  // Most fds accepted over the whole handshake. Firecracker sends 1, forks 2.
  // The control buffer holds at least this many (CMSG_SPACE may round it up);
  // a message whose fds do not fit is reported as truncated (MSG_CTRUNC), and
  // more than this many in total is an error too.
  size_t max_fds = 8;
};

// Reads the handshake from an accepted connection.
//
// Keeps receiving (poll + recvmsg, bounded by options.timeout overall) until
// the JSON array is complete AND at least one fd has arrived. The JSON may come
// in any number of pieces and the fd with any of them. Every fd received is
// owned from the moment recvmsg returns, so none leaks on any error path.
// The userfaultfd is identified by its /proc/self/fd link
// ("anon_inode:[userfaultfd]"); other fds go to extra_fds.
//
// Errors (each one sentence, the connection is closed): timeout (with what had
// arrived), EOF before the JSON was complete, JSON larger than
// max_json_bytes, more than max_regions regions (refused as soon as the
// arriving bytes hold more, complete or not), bytes that cannot be a JSON
// array, invalid JSON or regions
// (parse_handshake_json's message), EOF after the JSON with no fd, truncated
// control data, more than max_fds fds, and no userfaultfd among the fds.
//
// With `failure`, an error also says whether a userfaultfd had arrived and who
// sent it: the client may then resume a VM that nobody serves, which hangs on
// its first fault, so the caller may want to kill it.
struct HandshakeFailure {
  bool uffd_received = false;
  // The kernel dropped fds the client sent because they did not fit
  // (MSG_CTRUNC: too many, or no free fd slot in this process, EMFILE). One
  // of them may have been the uffd: the client may then wait forever too.
  bool fds_lost = false;
  // Refused for describing more than max_regions regions.
  bool over_region_limit = false;
  std::optional<PeerCredentials> peer;
};
Result<Handshake> receive_handshake(UniqueFd connection, const HandshakeOptions& options = {},
                                    HandshakeFailure* failure = nullptr);

// Reads SO_PEERCRED of a connected Unix socket.
Result<PeerCredentials> peer_credentials(int connection_fd);

// Who is on the other end of an accepted connection, and a handle on that
// process that cannot be confused with a later process given the same pid.
struct PeerIdentity {
  enum class PidfdSource {
    kPeerPidfd,  // SO_PEERPIDFD (Linux 6.5+): the process that connected, whatever happened since
    kPidfdOpen,  // pidfd_open(SO_PEERCRED pid) right after accept: the kernel lacks SO_PEERPIDFD
    kNone,       // no pidfd: the pid is 0 (another pid namespace) and the kernel lacks
                 // SO_PEERPIDFD, or the process is already gone
  };
  PeerCredentials cred;
  UniqueFd pidfd;
  PidfdSource source = PidfdSource::kNone;
};
const char* to_string(PeerIdentity::PidfdSource source);

// SO_PEERCRED, plus a pidfd of the peer: SO_PEERPIDFD where the kernel has
// it, else pidfd_open() of the SO_PEERCRED pid. Call it right after accept.
// An error when SO_PEERCRED fails or when no pidfd could be made for want of
// fds or memory (EMFILE, ENFILE, ENOMEM); a peer that has no pidfd for other
// reasons (pid 0 without SO_PEERPIDFD, already exited) is not an error.
Result<PeerIdentity> identify_peer(int connection_fd);

// Receives, without waiting, whatever a client already sent on a connection
// that is about to be refused, and reports whether a userfaultfd was among
// the fds (the received fds are closed). A Firecracker that handed over its
// uffd resumes a VM nobody will serve; the caller may want to kill it.
bool drain_pending_uffd(int connection_fd);

// Who may use a listening socket's path: set on the socket file after bind()
// and before listen(), so no client can connect before they apply.
struct SocketAccess {
  mode_t mode = 0600;              // permission bits of the socket file (connect needs write)
  std::optional<uid_t> owner;      // chown the socket file to this user
  std::optional<gid_t> group;      // ... and/or this group
};

// A listening Unix stream socket at a filesystem path (backlog 64, close-on-exec).
//
// bind() replaces a stale socket file left by a previous run, but refuses to
// remove anything that is not a socket. The destructor unlinks the path only if
// it is still the socket this listener created. Move-only.
class UnixListener {
 public:
  static Result<UnixListener> bind(const std::string& path, const SocketAccess& access = {});

  UnixListener(UnixListener&& other) noexcept;
  UnixListener& operator=(UnixListener&& other) noexcept;
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;
  ~UnixListener();

  // Blocks until a client connects. The returned fd is close-on-exec and
  // blocking. REQUIRES: only one thread accepts at a time.
  Result<UniqueFd> accept();

  // Like accept(), but fails with ETIMEDOUT if no client connects in time.
  Result<UniqueFd> accept_with_timeout(std::chrono::milliseconds timeout);

  // The listening fd, for a server that polls it together with a stop eventfd
  // and calls accept() when it is readable.
  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }

 private:
  UnixListener(UniqueFd fd, std::string path, dev_t dev, ino_t ino)
      : fd_(std::move(fd)), path_(std::move(path)), dev_(dev), ino_(ino) {}
  void unlink_if_ours();

  UniqueFd fd_;
  std::string path_;  // empty once moved from: nothing to unlink
  dev_t dev_ = 0;     // identity of the socket file bind() created
  ino_t ino_ = 0;
};

}  // namespace faultline::protocol
