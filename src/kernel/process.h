// Facts about the client process that only /proc and pidfds can tell.
//
// Thread-safety: free functions are safe from any thread; a PeerProcess may be
// used from several threads once created.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline::kernel {

// A handle on the peer (Firecracker) process that survives pid reuse: signals
// go through the pidfd, so a recycled pid is never killed by mistake.
class PeerProcess {
 public:
  PeerProcess() = default;
  // pidfd_open(pid). Fails with ESRCH if the process is already gone.
  // Prefer adopt() with a pidfd taken when the peer connected: between a
  // connect and a later pidfd_open the process may have exited and its pid
  // been given to another process.
  static Result<PeerProcess> open(pid_t pid);
  // Takes ownership of a pidfd obtained elsewhere (SO_PEERPIDFD at accept
  // time). `pid` is only for logs and /proc: it is 0 for a peer in a pid
  // namespace this process cannot see, whose pidfd still reports its exit
  // but cannot be signalled (the kernel refuses with EINVAL).
  static PeerProcess adopt(pid_t pid, UniqueFd pidfd);

  pid_t pid() const { return pid_; }
  // Readable (POLLIN) once the process has exited.
  int pidfd() const { return pidfd_.get(); }
  bool exited() const;
  // SIGKILL through the pidfd. Returns an error if it could not be sent.
  Status kill() const;

 private:
  pid_t pid_ = 0;
  UniqueFd pidfd_;
};

// SIGKILL through `pidfd` (`pid` only names the process in the error). See
// PeerProcess::kill().
Status kill_through_pidfd(int pidfd, pid_t pid);

// Whether every VMA of `pid` covering [start, start+len) is registered with
// the uffd in write-protect mode (VmFlags "uw" in /proc/PID/smaps). The server
// cannot ask the uffd which modes the client registered, and guessing wrong
// either loses dirty tracking (no WP) or makes every install fail (EINVAL).
Result<bool> range_registered_for_wp(pid_t pid, uint64_t start, uint64_t len);

// The same answer for many ranges ({start, len} each) from one read of
// /proc/PID/smaps: O(VMAs + ranges x log VMAs) instead of one read per range,
// which would be quadratic for a handshake with thousands of regions. A range
// no mapping covers is reported false.
Result<std::vector<bool>> ranges_registered_for_wp(pid_t pid,
                                                   const std::vector<std::pair<uint64_t, uint64_t>>& ranges);

// Reads /proc/PID/pagemap entries for `count` 4 KiB pages from `start`.
// Bit 63 present, bit 57 uffd-wp (see uffd_abi.h).
Result<std::vector<uint64_t>> read_pagemap(pid_t pid, uint64_t start, size_t count);

}  // namespace faultline::kernel
