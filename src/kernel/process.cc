#include "kernel/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

namespace faultline::kernel {

Result<PeerProcess> PeerProcess::open(pid_t pid) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return fail_errno("pidfd_open(" + std::to_string(pid) + ") failed");
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  PeerProcess p;
  p.pid_ = pid;
  p.pidfd_.reset(fd);
  return p;
}

PeerProcess PeerProcess::adopt(pid_t pid, UniqueFd pidfd) {
  PeerProcess p;
  p.pid_ = pid;
  p.pidfd_ = std::move(pidfd);
  return p;
}

bool PeerProcess::exited() const {
  if (!pidfd_.valid()) return true;
  pollfd pfd{pidfd_.get(), POLLIN, 0};
  return ::poll(&pfd, 1, 0) > 0 && (pfd.revents & POLLIN);
}

Status PeerProcess::kill() const {
  if (!pidfd_.valid()) return fail("no pidfd for the peer");
  return kill_through_pidfd(pidfd_.get(), pid_);
}

Status kill_through_pidfd(int pidfd, pid_t pid) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0) != 0) {
    // EINVAL: the process lives in a pid namespace that is not ours or a
    // descendant of ours (its SO_PEERCRED pid reads 0); nothing here may
    // signal it. ESRCH: it has exited (never another process: the pidfd
    // pins this one).
    return fail_errno("sending SIGKILL to pid " + std::to_string(pid) + " failed");
  }
  return {};
}

Result<bool> range_registered_for_wp(pid_t pid, uint64_t start, uint64_t len) {
  std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
  if (!smaps) return fail("cannot read /proc/" + std::to_string(pid) + "/smaps", errno);
  const uint64_t end = start + len;
  std::string line;
  bool in_range = false;
  bool any = false;
  bool all_wp = true;
  while (std::getline(smaps, line)) {
    // VMA header lines look like "7f12a0000000-7f12b0000000 rw-p 00000000 00:00 0".
    uint64_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-' && line.find(':') > line.find(' ')) {
      in_range = lo < end && hi > start;
      continue;
    }
    if (in_range && line.rfind("VmFlags:", 0) == 0) {
      any = true;
      std::istringstream flags(line.substr(8));
      std::string f;
      bool wp = false;
      while (flags >> f) wp = wp || f == "uw";
      all_wp = all_wp && wp;
    }
  }
  if (!any) return fail("no mapping of pid " + std::to_string(pid) + " covers the guest region");
  return all_wp;
}

Result<std::vector<bool>> ranges_registered_for_wp(pid_t pid,
                                                   const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
  if (!smaps) return fail("cannot read /proc/" + std::to_string(pid) + "/smaps", errno);
  struct Vma {
    uint64_t lo, hi;
    bool wp;
  };
  std::vector<Vma> vmas;  // in address order, as smaps lists them
  std::string line;
  while (std::getline(smaps, line)) {
    uint64_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-' && line.find(':') > line.find(' ')) {
      vmas.push_back({lo, hi, false});
      continue;
    }
    if (!vmas.empty() && line.rfind("VmFlags:", 0) == 0) {
      std::istringstream flags(line.substr(8));
      std::string f;
      while (flags >> f) vmas.back().wp = vmas.back().wp || f == "uw";
    }
  }
  std::vector<bool> out;
  out.reserve(ranges.size());
  for (const auto& [start, len] : ranges) {
    const uint64_t end = start + len;
    // The first VMA ending after `start`, then every one starting before `end`.
    auto it = std::partition_point(vmas.begin(), vmas.end(), [&](const Vma& v) { return v.hi <= start; });
    bool any = false, all_wp = true;
    for (; it != vmas.end() && it->lo < end; ++it) {
      any = true;
      all_wp = all_wp && it->wp;
    }
    out.push_back(any && all_wp);
  }
  return out;
}

Result<std::vector<uint64_t>> read_pagemap(pid_t pid, uint64_t start, size_t count) {
  UniqueFd fd(::open(("/proc/" + std::to_string(pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open /proc/" + std::to_string(pid) + "/pagemap");
  std::vector<uint64_t> entries(count);
  const off_t off = static_cast<off_t>((start / 4096) * sizeof(uint64_t));
  size_t done = 0;
  while (done < count * sizeof(uint64_t)) {
    ssize_t n = ::pread(fd.get(), reinterpret_cast<char*>(entries.data()) + done, count * sizeof(uint64_t) - done,
                        off + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail_errno("reading pagemap failed");
    done += static_cast<size_t>(n);
  }
  return entries;
}

}  // namespace faultline::kernel
