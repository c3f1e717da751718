#include "client/test_fault_server.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <nlohmann/json.hpp>

namespace faultline::client::testing {

Result<std::unique_ptr<TestFaultServer>> TestFaultServer::listen(const std::string& socket_path,
                                                                 const std::string& memory_path,
                                                                 TestFaultServerOptions options) {
  std::unique_ptr<TestFaultServer> server(new TestFaultServer());
  server->options_ = options;
  server->socket_path_ = socket_path;
  server->memory_file_.reset(::open(memory_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!server->memory_file_) return fail_errno("cannot open " + memory_path);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(address.sun_path)) return fail("socket path too long");
  std::memcpy(address.sun_path, socket_path.c_str(), socket_path.size() + 1);
  ::unlink(socket_path.c_str());
  server->listen_socket_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!server->listen_socket_) return fail_errno("socket failed");
  if (::bind(server->listen_socket_.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    return fail_errno("bind to " + socket_path + " failed");
  }
  if (::listen(server->listen_socket_.get(), 1) != 0) return fail_errno("listen failed");
  server->stop_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!server->stop_) return fail_errno("eventfd failed");
  server->thread_ = std::thread([s = server.get()] { s->run(); });
  return server;
}

TestFaultServer::~TestFaultServer() {
  uint64_t one = 1;
  (void)!::write(stop_.get(), &one, sizeof one);
  if (thread_.joinable()) thread_.join();
  ::unlink(socket_path_.c_str());
}

std::string TestFaultServer::handshake_json() const {
  std::lock_guard lock(mutex_);
  return json_;
}

std::vector<GuestRegion> TestFaultServer::regions() const {
  std::lock_guard lock(mutex_);
  return regions_;
}

std::string TestFaultServer::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

void TestFaultServer::set_error(std::string what) {
  std::lock_guard lock(mutex_);
  if (error_.empty()) error_ = std::move(what);
}

void TestFaultServer::run() {
  if (auto s = receive_handshake(); !s) {
    set_error(s.error().describe());
    return;
  }
  if (auto s = serve(); !s) {
    set_error(s.error().describe());
    // Unregistering wakes every blocked toucher (their faults then fill zero
    // pages), so a broken test server fails the test instead of hanging it.
    for (const GuestRegion& r : regions()) {
      uffdio_range range{r.base_host_virt_addr, r.size};
      ::ioctl(uffd_.get(), UFFDIO_UNREGISTER, &range);
    }
  }
}

Result<std::string> read_handshake(int socket, std::vector<int>& fds, std::vector<size_t>* piece_sizes) {
  std::string json;
  while (!nlohmann::json::accept(json)) {
    char buffer[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
    iovec iov{buffer, sizeof buffer};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("recvmsg of the handshake failed");
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds.push_back(fd);
      }
    }
    if (n == 0) return fail("client closed the socket before the handshake was complete");
    if (piece_sizes) piece_sizes->push_back(static_cast<size_t>(n));
    json.append(buffer, static_cast<size_t>(n));
  }
  return json;
}

Status TestFaultServer::receive_handshake() {
  pollfd fds[2] = {{listen_socket_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
  while (::poll(fds, 2, -1) < 0) {
    if (errno != EINTR) return fail_errno("poll for a client failed");
  }
  if (fds[1].revents & POLLIN) return fail("stopped before a client connected");
  connection_.reset(::accept4(listen_socket_.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!connection_) return fail_errno("accept failed");
  std::vector<int> received;
  auto json = read_handshake(connection_.get(), received);
  for (int fd : received) {
    // The first fd is the uffd; extra ones (a fork's memfd) are closed.
    if (!uffd_) uffd_.reset(fd); else ::close(fd);
    fds_received_.fetch_add(1);
  }
  if (!json) return std::unexpected(json.error());
  if (!uffd_) return fail("handshake carried no uffd");
  std::vector<GuestRegion> regions;
  for (const auto& r : nlohmann::json::parse(*json)) {
    GuestRegion region;
    region.base_host_virt_addr = r.at("base_host_virt_addr").get<uint64_t>();
    region.size = r.at("size").get<uint64_t>();
    region.offset = r.at("offset").get<uint64_t>();
    // Both fields hold bytes, whatever the name says.
    if (r.contains("page_size")) region.page_size = r["page_size"].get<uint64_t>();
    else if (r.contains("page_size_kib")) region.page_size = r["page_size_kib"].get<uint64_t>();
    regions.push_back(region);
  }
  std::lock_guard lock(mutex_);
  json_ = std::move(*json);
  regions_ = std::move(regions);
  return {};
}

Status TestFaultServer::serve() {
  const std::vector<GuestRegion> regions = this->regions();
  std::vector<std::pair<uint64_t, uint64_t>> removed;  // [start, end) file offsets
  std::deque<uint64_t> pending;                        // fault addresses waiting to be served
  std::vector<uint8_t> page;

  // Returns false when the copy must wait: a REMOVE event is unread.
  auto install = [&](uint64_t address) -> Result<bool> {
    const GuestRegion* region = nullptr;
    for (const GuestRegion& r : regions) {
      if (r.contains(address)) region = &r;
    }
    if (region == nullptr) return fail("fault at an address outside every region");
    const uint64_t host = address / region->page_size * region->page_size;
    const uint64_t offset = region->offset + (host - region->base_host_virt_addr);
    page.assign(region->page_size, 0);
    bool zero = false;
    for (auto [start, end] : removed) zero = zero || (offset >= start && offset < end);
    if (!zero && ::pread(memory_file_.get(), page.data(), page.size(), static_cast<off_t>(offset)) !=
                     static_cast<ssize_t>(page.size())) {
      return fail_errno("pread of the memory file failed");
    }
    if (options_.corrupt_page_offset == offset) page[100] ^= 0xFF;
    uffdio_copy copy{};
    copy.dst = host;
    copy.src = reinterpret_cast<uint64_t>(page.data());
    copy.len = page.size();
    // Counted before the copy wakes the faulting thread, so a test that saw
    // its touch complete also sees the count.
    faults_.fetch_add(1);
    if (::ioctl(uffd_.get(), UFFDIO_COPY, &copy) != 0) {
      // While a REMOVE event is unread every UFFDIO_COPY fails EAGAIN: read
      // the event first, then retry.
      if (errno == EAGAIN) {
        faults_.fetch_sub(1);
        return false;
      }
      if (errno == EEXIST) {
        // Present already (a repeated fault): the copy woke nobody.
        uffdio_range range{host, region->page_size};
        ::ioctl(uffd_.get(), UFFDIO_WAKE, &range);
      } else {
        return fail_errno("UFFDIO_COPY failed");
      }
    }
    return true;
  };

  pollfd fds[3] = {{uffd_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}, {connection_.get(), POLLIN, 0}};
  for (;;) {
    const int timeout = pending.empty() ? -1 : 1;
    if (::poll(fds, peer_closed_ ? 2 : 3, timeout) < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll failed");
    }
    if (fds[1].revents & POLLIN) return {};
    if (!peer_closed_ && (fds[2].revents & (POLLIN | POLLHUP))) {
      char byte;
      if (::recv(connection_.get(), &byte, 1, MSG_DONTWAIT) == 0) peer_closed_ = true;
    }
    for (;;) {
      uffd_msg msg;
      ssize_t n = ::read(uffd_.get(), &msg, sizeof msg);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
      if (n < 0) return fail_errno("read of the uffd failed");
      if (msg.event == UFFD_EVENT_PAGEFAULT) {
        pending.push_back(msg.arg.pagefault.address);
      } else if (msg.event == UFFD_EVENT_REMOVE) {
        removes_.fetch_add(1);
        for (const GuestRegion& r : regions) {
          if (msg.arg.remove.start >= r.base_host_virt_addr && msg.arg.remove.start < r.end()) {
            removed.emplace_back(r.offset + (msg.arg.remove.start - r.base_host_virt_addr),
                                 r.offset + (msg.arg.remove.end - r.base_host_virt_addr));
          }
        }
      }
    }
    while (!pending.empty()) {
      auto done = install(pending.front());
      if (!done) return std::unexpected(done.error());
      if (!*done) break;
      pending.pop_front();
    }
  }
}

}  // namespace faultline::client::testing
