// NaiveServer: baseline (c) of faultline-bench, the reference a uffd memory
// server has to beat. It is deliberately built like Firecracker's example
// handler (src/firecracker/examples/uffd/*_handler.rs): ONE thread that polls
// the uffd, reads ONE uffd_msg per read(2), preads the faulted page from the
// memory file and installs it with ONE UFFDIO_COPY (which also wakes the
// faulting thread). No batching, no workers, no prefetch.
//
// It handles UFFD_EVENT_REMOVE the way the example does since balloon support:
// the removed pages are remembered and a later fault on them is served zero
// (DESIGN.md §3), so scenario 3 can run against it. While a REMOVE is unread
// every install fails EAGAIN (DESIGN.md §4); the fault is then kept and retried
// after the next message has been read.
//
// It issues raw uffd ioctls on purpose: it is a stand-alone reference, not a
// part of faultline, and must not share faultline's kernel layer.
//
// Thread-safety: start() and stop() from one controlling thread. The server
// thread is owned and joined by stop() / the destructor.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "guest/region.h"

namespace faultline::bench {

class NaiveServer {
 public:
  // Serves `uffd` (borrowed: the caller keeps it open until stop()) for the
  // guest `regions` from the memory file at `memory_path`.
  static Result<std::unique_ptr<NaiveServer>> start(int uffd, std::vector<GuestRegion> regions,
                                                    const std::string& memory_path);
  ~NaiveServer();
  NaiveServer(const NaiveServer&) = delete;
  NaiveServer& operator=(const NaiveServer&) = delete;

  // Ends the server thread and joins it. Idempotent.
  void stop();

  uint64_t faults() const { return faults_.load(std::memory_order_relaxed); }
  uint64_t removes() const { return removes_.load(std::memory_order_relaxed); }
  // Heap bytes the server holds for its state (removed-page map + page buffer).
  uint64_t state_bytes() const;
  // Set when the server hit an error it could not handle (then it stops serving).
  std::string error() const;

 private:
  NaiveServer(int uffd, std::vector<GuestRegion> regions, UniqueFd file);
  void loop();
  // Returns false when the install must be retried after the next read (EAGAIN).
  bool serve(uint64_t address);
  void on_remove(uint64_t start, uint64_t end);

  const int uffd_;
  const std::vector<GuestRegion> regions_;
  const uint64_t page_size_;
  UniqueFd file_;
  UniqueFd stop_efd_;
  std::vector<uint64_t> region_first_page_;
  std::vector<uint8_t> removed_;  // one byte per guest page: 1 once removed
  uint8_t* buffer_ = nullptr;     // one page, page-aligned
  uint8_t* zeros_ = nullptr;      // one zero page (hugetlbfs has no UFFDIO_ZEROPAGE)
  std::vector<uint64_t> deferred_;
  std::thread thread_;
  std::atomic<uint64_t> faults_{0}, removes_{0};
  std::string error_;  // written by the server thread before it exits; read after join
};

}  // namespace faultline::bench
