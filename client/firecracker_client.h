// FirecrackerClient: does to a uffd memory server, step for step, what
// Firecracker does when it restores a VM with the Uffd memory backend
// (DESIGN.md §2): maps guest memory, creates and registers a uffd, connects to
// the server's socket and sends the handshake, then lets tests touch guest
// memory and madvise(MADV_DONTNEED) ranges of it like the balloon does.
//
// Guest offsets: the guest memory is the concatenation of its regions, in
// order; a guest offset is a byte position in that concatenation, which is also
// the byte position in the memory snapshot file (Firecracker gives region i the
// file offset sum(size of regions before i)).
//
// Thread safety: create(), connect_and_send(), send_on() and close_socket()
// REQUIRE external synchronization (one controlling thread). The accessors and
// guest_ptr() are const and safe from any thread; remove() and
// removed_ranges() are safe to call concurrently with each other and with
// touches of other pages. Guest memory itself may be touched from any number of
// threads while the client is alive. Move-only; moving REQUIRES that no other
// thread is using the client.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "client/handshake.h"
#include "client/version.h"
#include "common/error.h"
#include "common/mapping.h"
#include "common/unique_fd.h"
#include "guest/region.h"

namespace faultline::client {

struct ClientConfig {
  FirecrackerVersion version{1, 14};
  // One mmap per entry, in order. Each must be a multiple of the page size.
  // x86 VMs above ~3 GiB have two (the MMIO hole); tests keep them small.
  std::vector<uint64_t> region_sizes;
  // 2 MiB hugetlbfs pages (MAP_HUGETLB|MAP_HUGE_2MB); needs reserved huge pages
  // (vm.nr_hugepages), else create() fails with ENOMEM.
  bool huge_pages = false;
  // Dirty-tracking fork mode: UFFDIO_API adds WP_ASYNC and regions are
  // registered MISSING|WP.
  bool wp_async = false;
  // Also send a memfd the size of guest memory as a second SCM_RIGHTS fd, as
  // some forks do. The guest mapping here stays anonymous: the memfd only
  // checks that a server tolerates (and closes) extra fds.
  bool extra_memfd = false;
  // OR of kExtraEventUnmap / kExtraEventRemap / kExtraEventFork (uffd_setup.h),
  // which Firecracker itself never requests.
  uint64_t extra_events = 0;
};

// A byte range of guest memory, by guest offset.
struct GuestRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  friend bool operator==(const GuestRange&, const GuestRange&) = default;
};

// Free 2 MiB hugetlbfs pages on this host (0 if unknown). Guest memory is
// mapped MAP_NORESERVE, as Firecracker does, so a shortage shows up only when
// a page is installed (the server's UFFDIO_COPY fails ENOMEM and the guest
// stalls), not at mmap: callers check this first.
uint64_t free_huge_pages_2m();

class FirecrackerClient {
 public:
  // Maps guest memory and creates the registered uffd (steps 1 and 2 of a
  // Firecracker restore). Touching guest memory before a server has the uffd
  // blocks the toucher forever (upstream Firecracker behaves the same).
  static Result<FirecrackerClient> create(const ClientConfig& config);

  FirecrackerClient(FirecrackerClient&&) noexcept;
  FirecrackerClient& operator=(FirecrackerClient&&) noexcept;
  FirecrackerClient(const FirecrackerClient&) = delete;
  FirecrackerClient& operator=(const FirecrackerClient&) = delete;
  ~FirecrackerClient();

  // connect() to the server's Unix stream socket at `socket_path`, then
  // send_on() it. Fails if the server is not listening: Firecracker does not
  // retry either.
  Status connect_and_send(const std::string& socket_path, const SendPlan& plan = {});

  // Sends the handshake on an already connected stream socket (e.g. one end
  // of a socketpair) and takes ownership of it. Before v1.12 the socket is
  // closed right after sending, as Firecracker does; from v1.12 on it stays
  // open until close_socket() or destruction.
  Status send_on(UniqueFd socket, const SendPlan& plan = {});

  // Closes the client's end of the socket: simulates Firecracker exiting
  // (v1.12+ servers see EOF/HUP). The uffd and guest memory stay.
  void close_socket();
  bool socket_open() const { return socket_.valid(); }

  // The JSON this client sends (or sent).
  std::string handshake_json() const;

  const ClientConfig& config() const { return config_; }
  const std::vector<GuestRegion>& regions() const { return regions_; }
  uint64_t guest_size() const { return guest_size_; }
  uint64_t page_size() const { return page_size_; }
  uint64_t page_count() const { return guest_size_ / page_size_; }
  int uffd() const { return uffd_.get(); }

  // Host address of guest offset `guest_offset`, or nullptr if outside guest
  // memory. Regions are separate mappings: a range that crosses a region end
  // is not contiguous in the host.
  uint8_t* guest_ptr(uint64_t guest_offset) const;

  // madvise(MADV_DONTNEED) of the guest range [offset, offset + length), as the
  // balloon / free page reporting does. Unaligned ranges are allowed; only the
  // whole pages inside are removed (madvise() itself rejects an unaligned
  // start and rounds the length up, so the client trims first; for hugetlb the
  // kernel requires 2 MiB alignment, which trimming to the page size gives).
  // Crosses regions by issuing one madvise per region. Blocks until the server
  // has read the REMOVE event (the kernel waits for it). Returns the removed
  // whole-page ranges (empty if none), which are also appended to
  // removed_ranges().
  Result<std::vector<GuestRange>> remove(uint64_t offset, uint64_t length);

  // Every range remove() has removed, in call order.
  std::vector<GuestRange> removed_ranges() const;

 private:
  FirecrackerClient() = default;

  ClientConfig config_;
  uint64_t page_size_ = 0;
  uint64_t guest_size_ = 0;
  std::vector<Mapping> mappings_;
  std::vector<GuestRegion> regions_;
  UniqueFd uffd_;
  UniqueFd memfd_;
  UniqueFd socket_;
  // Heap-allocated so the client stays movable.
  std::unique_ptr<std::mutex> removed_mutex_ = std::make_unique<std::mutex>();
  std::vector<GuestRange> removed_;  // GUARDED_BY(*removed_mutex_)
};

}  // namespace faultline::client
