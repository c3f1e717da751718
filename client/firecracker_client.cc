#include "client/firecracker_client.h"

#include <linux/memfd.h>
#include <linux/mman.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <fcntl.h>

#include <cstdlib>
#include <cstring>

#include "client/uffd_setup.h"

namespace faultline::client {

uint64_t free_huge_pages_2m() {
  UniqueFd fd(::open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", O_RDONLY | O_CLOEXEC));
  if (!fd) return 0;
  char text[32] = {};
  if (::read(fd.get(), text, sizeof text - 1) <= 0) return 0;
  return std::strtoull(text, nullptr, 10);
}

FirecrackerClient::FirecrackerClient(FirecrackerClient&&) noexcept = default;
FirecrackerClient& FirecrackerClient::operator=(FirecrackerClient&&) noexcept = default;
FirecrackerClient::~FirecrackerClient() = default;

Result<FirecrackerClient> FirecrackerClient::create(const ClientConfig& config) {
  if (config.region_sizes.empty()) return fail("a guest needs at least one memory region");
  if ((config.extra_events & ~kAllowedExtraEvents) != 0) {
    return fail("extra_events may only hold EVENT_UNMAP, EVENT_REMAP and EVENT_FORK");
  }
  FirecrackerClient client;
  client.config_ = config;
  client.page_size_ = config.huge_pages ? kPageSize2M : kPageSize4K;

  // Step 1, guest memory: one private anonymous mapping per region.
  // MAP_NORESERVE as Firecracker: a restored guest rarely touches all of it.
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  if (config.huge_pages) flags |= MAP_HUGETLB | MAP_HUGE_2MB;
  uint64_t offset = 0;
  for (uint64_t size : config.region_sizes) {
    if (size == 0 || size % client.page_size_ != 0) {
      return fail("region size " + std::to_string(size) + " is not a positive multiple of the " +
                  std::to_string(client.page_size_) + "-byte page size");
    }
    auto mapping = Mapping::map(size, PROT_READ | PROT_WRITE, flags);
    if (!mapping) {
      Error e = mapping.error();
      if (config.huge_pages) e.message += " (2 MiB pages need reserved huge pages: vm.nr_hugepages)";
      return std::unexpected(e);
    }
    // Firecracker lays regions out back to back in the memory file.
    client.regions_.push_back(GuestRegion{mapping->address(), size, offset, client.page_size_});
    client.mappings_.push_back(std::move(*mapping));
    offset += size;
  }
  client.guest_size_ = offset;

  // Step 2, the uffd.
  auto uffd = open_userfaultfd();
  if (!uffd) return std::unexpected(uffd.error());
  client.uffd_ = std::move(*uffd);
  if (auto s = uffd_api(client.uffd(), firecracker_uffd_features(config.wp_async, config.extra_events)); !s) {
    return std::unexpected(s.error());
  }
  const uint64_t mode = firecracker_register_mode(config.wp_async);
  for (const GuestRegion& r : client.regions_) {
    if (auto s = uffd_register(client.uffd(), r.base_host_virt_addr, r.size, mode); !s) {
      return std::unexpected(s.error());
    }
  }

  if (config.extra_memfd) {
    unsigned memfd_flags = MFD_CLOEXEC;
    if (config.huge_pages) memfd_flags |= MFD_HUGETLB | MFD_HUGE_2MB;
    client.memfd_.reset(::memfd_create("faultline-client-guest-mem", memfd_flags));
    if (!client.memfd_) return fail_errno("memfd_create for the extra guest memfd failed");
    if (::ftruncate(client.memfd_.get(), static_cast<off_t>(client.guest_size_)) != 0) {
      return fail_errno("sizing the extra guest memfd failed");
    }
  }
  return client;
}

std::string FirecrackerClient::handshake_json() const {
  return client::handshake_json(regions_, config_.version);
}

Status FirecrackerClient::connect_and_send(const std::string& socket_path, const SendPlan& plan) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(address.sun_path)) {
    return fail("socket path " + socket_path + " is longer than a Unix socket address allows");
  }
  std::memcpy(address.sun_path, socket_path.c_str(), socket_path.size() + 1);
  UniqueFd socket(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket) return fail_errno("socket(AF_UNIX, SOCK_STREAM) failed");
  if (::connect(socket.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    return fail_errno("cannot connect to the memory server at " + socket_path);
  }
  return send_on(std::move(socket), plan);
}

Status FirecrackerClient::send_on(UniqueFd socket, const SendPlan& plan) {
  socket_ = std::move(socket);
  std::vector<int> fds{uffd_.get()};
  if (memfd_) fds.push_back(memfd_.get());
  if (auto s = send_handshake(socket_.get(), handshake_json(), fds, plan); !s) return s;
  // Before v1.12 Firecracker dropped its end of the stream right after the
  // sendmsg; since v1.12 it holds it until it exits.
  if (!config_.version.keeps_socket_open()) close_socket();
  return {};
}

void FirecrackerClient::close_socket() { socket_.reset(); }

uint8_t* FirecrackerClient::guest_ptr(uint64_t guest_offset) const {
  for (const GuestRegion& r : regions_) {
    if (guest_offset >= r.offset && guest_offset < r.offset + r.size) {
      return reinterpret_cast<uint8_t*>(r.base_host_virt_addr + (guest_offset - r.offset));
    }
  }
  return nullptr;
}

Result<std::vector<GuestRange>> FirecrackerClient::remove(uint64_t offset, uint64_t length) {
  if (offset > guest_size_ || length > guest_size_ - offset) {
    return fail("remove of [" + std::to_string(offset) + ", +" + std::to_string(length) +
                ") is outside the " + std::to_string(guest_size_) + "-byte guest memory");
  }
  // Only whole pages inside the range: madvise() needs a page-aligned start
  // and would round the length up, removing a page the caller did not give.
  const uint64_t first = (offset + page_size_ - 1) / page_size_ * page_size_;
  const uint64_t last = (offset + length) / page_size_ * page_size_;
  std::vector<GuestRange> removed;
  if (first >= last) return removed;
  for (const GuestRegion& r : regions_) {
    const uint64_t begin = std::max(first, r.offset);
    const uint64_t end = std::min(last, r.offset + r.size);
    if (begin >= end) continue;
    void* host = reinterpret_cast<void*>(r.base_host_virt_addr + (begin - r.offset));
    // The kernel queues UFFD_EVENT_REMOVE and blocks here until the server
    // has read it; it zaps the pages after that (DESIGN.md §4).
    if (::madvise(host, end - begin, MADV_DONTNEED) != 0) {
      return fail_errno("madvise(MADV_DONTNEED) of guest range [" + std::to_string(begin) + ", " +
                        std::to_string(end) + ") failed");
    }
    removed.push_back(GuestRange{begin, end - begin});
  }
  std::lock_guard lock(*removed_mutex_);
  removed_.insert(removed_.end(), removed.begin(), removed.end());
  return removed;
}

std::vector<GuestRange> FirecrackerClient::removed_ranges() const {
  std::lock_guard lock(*removed_mutex_);
  return removed_;
}

}  // namespace faultline::client
