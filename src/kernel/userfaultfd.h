// Userfaultfd: the only place in faultline that issues uffd ioctls and parses
// raw uffd_msg records. Everything above it works with typed values.
//
// The fd is one Firecracker created, initialised (UFFDIO_API) and registered
// before handing it over; the server can only read events and resolve them.
//
// Thread-safety: all methods may be called concurrently from any thread (the
// kernel serialises what needs serialising). read_events() is meant for one
// reader thread at a time.
#pragma once

#include <cstdint>
#include <span>
#include <variant>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline::kernel {

// A thread faulted on a missing page (or, with WP, on a write-protected one).
struct PageFault {
  uint64_t address = 0;  // faulting address (page-aligned by the kernel unless EXACT_ADDRESS)
  bool write = false;    // UFFD_PAGEFAULT_FLAG_WRITE: the access was a write
  bool wp = false;       // UFFD_PAGEFAULT_FLAG_WP: a write-protect fault, not a missing one
  uint32_t tid = 0;      // faulting thread id if UFFD_FEATURE_THREAD_ID, else 0
};
// madvise(MADV_DONTNEED/REMOVE) of [start, end): pages there must read zero next.
struct RemoveEvent {
  uint64_t start = 0;
  uint64_t end = 0;
};
// munmap of [start, end).
struct UnmapEvent {
  uint64_t start = 0;
  uint64_t end = 0;
};
// mremap moved [from, from+len) to [to, to+len).
struct RemapEvent {
  uint64_t from = 0;
  uint64_t to = 0;
  uint64_t len = 0;
};
// fork(): the child got its own uffd, delivered as a new fd in this process.
struct ForkEvent {
  int child_uffd = -1;
};
// An event this build does not know.
struct UnknownEvent {
  uint8_t event = 0;
};

using UffdEvent = std::variant<PageFault, RemoveEvent, UnmapEvent, RemapEvent, ForkEvent, UnknownEvent>;

// What an install ioctl (COPY, ZEROPAGE, WRITEPROTECT) did.
enum class IoctlOutcome {
  kDone,       // the whole range was handled
  kExists,     // EEXIST: a page is already present (someone else installed it)
  kRetry,      // EAGAIN: an unread REMOVE/UNMAP/REMAP event blocks the mm; retry after the reader reads it
  kGone,       // ESRCH: the client process (its mm) is gone
  kUnmapped,   // ENOENT: the range is no longer registered/mapped
  kFailed,     // any other error; `error` holds the errno
};
const char* to_string(IoctlOutcome outcome);

struct IoctlResult {
  IoctlOutcome outcome = IoctlOutcome::kDone;
  uint64_t bytes = 0;  // bytes completed before the outcome (partial progress)
  int error = 0;       // errno when not kDone
};

// The result an install ioctl reports when it fails with `err` and no
// progress (for fault injection in tests, and for callers that need one).
IoctlResult result_for_errno(int err);

class Userfaultfd {
 public:
  Userfaultfd() = default;
  explicit Userfaultfd(UniqueFd fd) : fd_(std::move(fd)) {}

  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }

  // Reads as many pending messages as fit in `out` without blocking (the fd
  // is O_NONBLOCK). Returns the number read; 0 when nothing is pending.
  // REQUIRES: one reader at a time.
  Result<size_t> read_events(std::span<UffdEvent> out) const;

  // UFFDIO_COPY of `len` bytes from `src` (server memory) to `dst` (client).
  // `write_protect` installs the pages write-protected (needs a WP registration).
  IoctlResult copy(uint64_t dst, const void* src, uint64_t len, bool write_protect, bool dont_wake) const;
  // UFFDIO_ZEROPAGE. Not supported on hugetlbfs (copy a zero buffer there).
  IoctlResult zeropage(uint64_t dst, uint64_t len, bool dont_wake) const;
  // UFFDIO_WRITEPROTECT: protect (true) or unprotect (false) [start, start+len).
  IoctlResult writeprotect(uint64_t start, uint64_t len, bool protect, bool dont_wake) const;
  // UFFDIO_WAKE: wakes threads waiting on faults in [start, start+len).
  IoctlResult wake(uint64_t start, uint64_t len) const;

 private:
  UniqueFd fd_;
};

}  // namespace faultline::kernel
