// faultline-baseline-server: the uffd servers faultline-bench compares
// faultline with, run the way Firecracker meets a uffd handler: a separate
// process listening on a Unix socket, accepting ONE Firecracker handshake
// (the uffd by SCM_RIGHTS and the JSON list of GuestRegionUffdMapping, read
// with faultline's protocol layer) and serving that uffd from the memory
// file until the client is gone. Two designs, both one thread:
//
//   --mode naive      the design of Firecracker's example handler
//                     (src/firecracker/examples/uffd/*_handler.rs): block in
//                     poll(), read ONE uffd_msg per read(2), pread the page,
//                     ONE UFFDIO_COPY (which also wakes the faulting thread).
//   --mode busy-poll  the simplest thing a competitor would try against
//                     wake-up latency: the same thread, but it never sleeps:
//                     it spins on a non-blocking read(2) of the uffd.
//
// Both handle UFFD_EVENT_REMOVE the way the example does since balloon
// support: removed pages are remembered and a later fault on one is served
// zeros (DESIGN.md §3). While a REMOVE is unread every install fails EAGAIN
// (DESIGN.md §4); the fault is kept and retried after the next read.
//
// The serving loop issues raw uffd ioctls on purpose: a baseline is a
// stand-alone reference and must not share faultline's server or kernel layers.
//
//   faultline-baseline-server --mode naive|busy-poll --socket PATH --memory FILE
//   faultline-baseline-server --spin N      (N threads spinning until killed:
//                                            faultline-bench's background load)
//
// Standard output, one JSON object per line (bench/baseline_process.h reads them):
//   {"event":"listening","socket":PATH}                     bound and listening
//   {"event":"serving","regions":R,"page_size":P,"state_bytes":B,"watch_socket":W}
//                                                             handshake received
//   {"event":"exit","mode":M,"faults":F,"removes":R,"eagain_retries":E,
//    "state_bytes":B,"reason":"..."[,"error":"..."]}           the last line
// Exit code 0 when the client went away (its socket closed, or the uffd said
// its memory is gone), 1 on an error, 2 on bad arguments.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/unique_fd.h"
#include "guest/region.h"
#include "protocol/handshake_socket.h"

namespace {

using faultline::GuestRegion;
using faultline::Result;
using faultline::Status;
using faultline::UniqueFd;

void print_line(const nlohmann::json& j) {
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);  // a pipe: the bench waits for each line
}

// Heap memory freed with std::free (page-aligned buffers for UFFDIO_COPY).
struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using PageBuffer = std::unique_ptr<uint8_t, FreeDeleter>;

class BaselineServer {
 public:
  enum class Mode { kNaive, kBusyPoll };

  BaselineServer(Mode mode, faultline::protocol::Handshake handshake, UniqueFd file)
      : mode_(mode),
        uffd_(std::move(handshake.uffd)),
        connection_(std::move(handshake.connection)),
        watch_socket_(!handshake.peer_closed),
        regions_(std::move(handshake.regions)),
        page_size_(regions_.front().page_size),
        file_(std::move(file)) {
    uint64_t pages = 0;
    for (const GuestRegion& r : regions_) {
      region_first_page_.push_back(pages);
      pages += r.size / page_size_;
    }
    removed_.assign(pages, 0);
    deferred_.reserve(64);
  }

  // Allocates the page buffers. Called once before serve().
  Status prepare() {
    buffer_.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, page_size_)));
    zeros_.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, page_size_)));
    if (!buffer_ || !zeros_) return faultline::fail("cannot allocate the page buffers", ENOMEM);
    std::memset(zeros_.get(), 0, page_size_);
    if (mode_ == Mode::kBusyPoll) {
      // Firecracker creates its uffd O_NONBLOCK already; the flag lives in the
      // open file description shared with the client, so set it only if missing.
      const int flags = ::fcntl(uffd_.get(), F_GETFL);
      if (flags < 0) return faultline::fail_errno("F_GETFL of the uffd");
      if ((flags & O_NONBLOCK) == 0 && ::fcntl(uffd_.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
        return faultline::fail_errno("cannot make the uffd non-blocking");
      }
    }
    return {};
  }

  // Serves until the client is gone (returns its reason) or an error.
  Result<std::string> serve() { return mode_ == Mode::kNaive ? serve_naive() : serve_busy_poll(); }

  uint64_t state_bytes() const { return removed_.capacity() + 2 * page_size_; }
  uint64_t faults() const { return faults_; }
  uint64_t removes() const { return removes_; }
  uint64_t eagain_retries() const { return eagain_retries_; }
  bool watch_socket() const { return watch_socket_; }
  uint64_t page_size() const { return page_size_; }
  size_t region_count() const { return regions_.size(); }

 private:
  enum class Install { kDone, kRetry, kPeerGone };

  // Firecracker v1.12+ keeps the handshake socket open while it lives: EOF
  // (or a hang-up) means it exited. It sends nothing more; bytes that come
  // anyway are read and dropped so that the socket stops polling readable.
  bool peer_closed_socket() {
    char sink[256];
    for (;;) {
      const ssize_t n = ::recv(connection_.get(), sink, sizeof sink, MSG_DONTWAIT);
      if (n == 0) return true;
      if (n > 0) continue;
      if (errno == EINTR) continue;
      return errno != EAGAIN && errno != EWOULDBLOCK;  // ECONNRESET and the like: gone too
    }
  }

  void on_remove(uint64_t start, uint64_t end) {
    for (size_t i = 0; i < regions_.size(); ++i) {
      const GuestRegion& r = regions_[i];
      const uint64_t b = std::max(start, r.base_host_virt_addr);
      const uint64_t e = std::min(end, r.end());
      if (b >= e) continue;
      // Only whole pages are removed; madvise() gives page-aligned ranges anyway.
      const uint64_t first = (b - r.base_host_virt_addr + page_size_ - 1) / page_size_;
      const uint64_t last = (e - r.base_host_virt_addr) / page_size_;
      for (uint64_t p = first; p < last; ++p) removed_[region_first_page_[i] + p] = 1;
    }
    ++removes_;
  }

  Result<Install> install(uint64_t address) {
    const uint64_t page_addr = address & ~(page_size_ - 1);
    for (size_t i = 0; i < regions_.size(); ++i) {
      const GuestRegion& r = regions_[i];
      if (!r.contains(page_addr)) continue;
      const uint64_t index = (page_addr - r.base_host_virt_addr) / page_size_;
      // Removed pages are served zeros copied from a zero buffer, as
      // Firecracker's example does (hugetlbfs has no UFFDIO_ZEROPAGE).
      const uint8_t* src = zeros_.get();
      if (!removed_[region_first_page_[i] + index]) {
        const off_t at = static_cast<off_t>(r.offset + index * page_size_);
        const ssize_t n = ::pread(file_.get(), buffer_.get(), page_size_, at);
        if (n != static_cast<ssize_t>(page_size_)) {
          return faultline::fail(n < 0 ? std::string("pread of the memory file: ") + std::strerror(errno)
                                       : "the memory file is shorter than the guest");
        }
        src = buffer_.get();
      }
      uffdio_copy copy{};
      copy.dst = page_addr;
      copy.src = reinterpret_cast<uint64_t>(src);
      copy.len = page_size_;
      copy.mode = 0;  // wakes the faulting thread
      if (::ioctl(uffd_.get(), UFFDIO_COPY, &copy) == 0) return Install::kDone;
      if (errno == EEXIST) {
        // Already present (another fault of the same page won): the failed
        // copy woke nobody, so wake the waiters.
        uffdio_range range{page_addr, page_size_};
        (void)::ioctl(uffd_.get(), UFFDIO_WAKE, &range);
        return Install::kDone;
      }
      // While a REMOVE is unread every install fails EAGAIN: read it first.
      if (errno == EAGAIN) return Install::kRetry;
      // The guest's memory is gone (the client's mm exited) or unmapped.
      if (errno == ESRCH || errno == ENOENT) return Install::kPeerGone;
      return faultline::fail_errno("UFFDIO_COPY failed");
    }
    return faultline::fail("a fault outside every region");
  }

  // One message read from the uffd: handles it. kPeerGone ends serving.
  Result<Install> handle(const uffd_msg& msg) {
    switch (msg.event) {
      case UFFD_EVENT_PAGEFAULT: {
        ++faults_;
        auto r = install(msg.arg.pagefault.address);
        if (r && *r == Install::kRetry) deferred_.push_back(msg.arg.pagefault.address);
        return r;
      }
      case UFFD_EVENT_REMOVE:
        on_remove(msg.arg.remove.start, msg.arg.remove.end);
        return Install::kDone;
      default:
        return Install::kDone;  // Firecracker requests no other events
    }
  }

  // Retries the faults whose install failed EAGAIN (after a read, since a
  // pending REMOVE fails every install until it is read).
  Result<Install> retry_deferred() {
    if (deferred_.empty()) return Install::kDone;
    retry_.swap(deferred_);
    for (uint64_t a : retry_) {
      ++eagain_retries_;
      auto r = install(a);
      if (!r) return r;
      if (*r == Install::kPeerGone) return r;
      if (*r == Install::kRetry) deferred_.push_back(a);
    }
    retry_.clear();
    return Install::kDone;
  }

  Result<std::string> serve_naive() {
    for (;;) {
      pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {watch_socket_ ? connection_.get() : -1, POLLIN | POLLRDHUP, 0}};
      // While faults wait on EAGAIN the loop polls without sleeping: the
      // madvising thread clears the kernel's "mmap changing" mark only once it
      // runs again after its REMOVE was read, and no event announces that.
      const int rc = ::poll(fds, 2, deferred_.empty() ? -1 : 0);
      if (rc < 0) {
        if (errno == EINTR) continue;
        return faultline::fail_errno("poll failed");
      }
      if (fds[1].revents != 0 && peer_closed_socket()) return std::string("the client closed its socket");
      if (fds[0].revents & POLLIN) {
        uffd_msg msg;
        const ssize_t n = ::read(uffd_.get(), &msg, sizeof msg);  // ONE message per read, like the example
        if (n < 0 && errno != EAGAIN && errno != EINTR) return faultline::fail_errno("read of the uffd failed");
        if (n == sizeof msg) {
          auto r = handle(msg);
          if (!r) return std::unexpected(r.error());
          if (*r == Install::kPeerGone) return std::string("the guest memory is gone (UFFDIO_COPY: ESRCH/ENOENT)");
        }
      }
      auto r = retry_deferred();
      if (!r) return std::unexpected(r.error());
      if (*r == Install::kPeerGone) return std::string("the guest memory is gone (UFFDIO_COPY: ESRCH/ENOENT)");
      if (!deferred_.empty() && rc == 0) ::sched_yield();  // let the madvising thread run
    }
  }

  Result<std::string> serve_busy_poll() {
    // An empty read costs a few hundred ns: checking the socket every 4096 of
    // them notices a client that went away within a few ms, and costs a fault
    // arriving meanwhile at most one recv().
    constexpr uint32_t kIdleReadsPerSocketCheck = 4096;
    uint32_t idle = 0;
    for (;;) {
      uffd_msg msg;
      const ssize_t n = ::read(uffd_.get(), &msg, sizeof msg);  // ONE message per read, never sleeping
      if (n == sizeof msg) {
        idle = 0;
        auto r = handle(msg);
        if (!r) return std::unexpected(r.error());
        if (*r == Install::kPeerGone) return std::string("the guest memory is gone (UFFDIO_COPY: ESRCH/ENOENT)");
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        return faultline::fail_errno("read of the uffd failed");
      } else if (++idle == kIdleReadsPerSocketCheck) {
        idle = 0;
        if (watch_socket_ && peer_closed_socket()) return std::string("the client closed its socket");
      }
      auto r = retry_deferred();
      if (!r) return std::unexpected(r.error());
      if (*r == Install::kPeerGone) return std::string("the guest memory is gone (UFFDIO_COPY: ESRCH/ENOENT)");
    }
  }

  const Mode mode_;
  UniqueFd uffd_;
  UniqueFd connection_;
  const bool watch_socket_;  // false for pre-v1.12 clients, which close the socket right after sending
  const std::vector<GuestRegion> regions_;
  const uint64_t page_size_;
  UniqueFd file_;
  std::vector<uint64_t> region_first_page_;
  std::vector<uint8_t> removed_;  // one byte per guest page: 1 once removed
  PageBuffer buffer_;             // one page, page-aligned
  PageBuffer zeros_;              // one zero page
  std::vector<uint64_t> deferred_, retry_;
  uint64_t faults_ = 0, removes_ = 0, eagain_retries_ = 0;
};

// --spin N: the fixed background load of faultline-bench's "loaded" runs.
[[noreturn]] void spin(int threads) {
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([] {
      volatile uint64_t x = 0;
      for (;;) x = x + 1;  // never returns: the bench SIGKILLs this process
    });
  }
  for (std::thread& t : pool) t.join();
  std::abort();
}

int serve_one(BaselineServer::Mode mode, const std::string& socket_path, const std::string& memory_path) {
  const char* mode_name = mode == BaselineServer::Mode::kNaive ? "naive" : "busy-poll";
  auto exit_line = [&](const BaselineServer* s, const std::string& reason, const std::string& error) {
    nlohmann::json j{{"event", "exit"},
                     {"mode", mode_name},
                     {"faults", s ? s->faults() : 0},
                     {"removes", s ? s->removes() : 0},
                     {"eagain_retries", s ? s->eagain_retries() : 0},
                     {"state_bytes", s ? s->state_bytes() : 0},
                     {"reason", reason}};
    if (!error.empty()) j["error"] = error;
    print_line(j);
    return error.empty() ? 0 : 1;
  };
  UniqueFd file(::open(memory_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!file) return exit_line(nullptr, "error", "cannot open " + memory_path + ": " + std::strerror(errno));
  auto listener = faultline::protocol::UnixListener::bind(socket_path);
  if (!listener) return exit_line(nullptr, "error", listener.error().describe());
  print_line({{"event", "listening"}, {"socket", socket_path}});
  auto connection = listener->accept();
  if (!connection) return exit_line(nullptr, "error", connection.error().describe());
  auto handshake = faultline::protocol::receive_handshake(std::move(*connection));
  if (!handshake) return exit_line(nullptr, "error", "handshake: " + handshake.error().describe());
  for (const GuestRegion& r : handshake->regions) {
    if (r.page_size != handshake->regions.front().page_size) {
      return exit_line(nullptr, "error", "regions of different page sizes");
    }
  }
  BaselineServer server(mode, std::move(*handshake), std::move(file));
  if (auto st = server.prepare(); !st) return exit_line(&server, "error", st.error().describe());
  print_line({{"event", "serving"},
              {"regions", server.region_count()},
              {"page_size", server.page_size()},
              {"state_bytes", server.state_bytes()},
              {"watch_socket", server.watch_socket()}});
  auto reason = server.serve();
  if (!reason) return exit_line(&server, "error", reason.error().describe());
  return exit_line(&server, *reason, "");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faultline-baseline-server: the naive and busy-polling one-thread uffd servers faultline-bench "
               "measures faultline against, as separate processes behind the real Firecracker handshake"};
  std::string mode_name, socket_path, memory_path;
  int spin_threads = 0;
  auto* mode_opt = app.add_option("--mode", mode_name, "naive: poll + one read + pread + UFFDIO_COPY per fault; "
                                                       "busy-poll: the same, spinning on a non-blocking read")
                       ->check(CLI::IsMember({"naive", "busy-poll"}));
  auto* socket_opt = app.add_option("--socket", socket_path, "Unix socket to listen on for one handshake");
  auto* memory_opt = app.add_option("--memory", memory_path, "memory snapshot file to serve pages from");
  auto* spin_opt = app.add_option("--spin", spin_threads, "instead of serving: N threads spin until killed")
                       ->check(CLI::Range(1, 1024));
  spin_opt->excludes(mode_opt)->excludes(socket_opt)->excludes(memory_opt);
  mode_opt->needs(socket_opt)->needs(memory_opt);
  CLI11_PARSE(app, argc, argv);
  if (spin_threads > 0) spin(spin_threads);
  if (mode_name.empty()) {
    std::fprintf(stderr, "one of --mode or --spin is required\n");
    return 2;
  }
  return serve_one(mode_name == "naive" ? BaselineServer::Mode::kNaive : BaselineServer::Mode::kBusyPoll,
                   socket_path, memory_path);
}
