// Test and benchmark support for faultline_kvm; not part of faultline.
//
// PatternFaultServer: registers one anonymous range with its own userfaultfd
// (MISSING mode, no features) and serves every fault from a host thread with
// UFFDIO_COPY of a page filled by fill_pattern_page(). It exists to prove
// that faults raised by KVM on behalf of a vCPU reach a uffd, with the least
// machinery possible; the real server lives in src/.
//
// fill_pattern_page() / pattern_qword() define the bytes of every guest page
// in these tests: each qword encodes the page offset and its index, so a
// page served or read at the wrong place is caught.
//
// Thread-safety: start() and the destructor need external synchronization;
// faults_served()/pages_served() may be read from any thread.
#pragma once

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include "client/kvm/format_message.h"
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline::client::testing {
using detail::format_message;

// The qword at byte `index * 8` of the page at guest offset `page_offset`.
inline uint64_t pattern_qword(uint64_t page_offset, uint64_t index) {
  return 0xa5a5000000000000ull ^ (page_offset << 12) ^ (index * 0x9e3779b1ull);
}

// Fills `bytes` bytes at `dst` (starting at guest offset `offset`, 8-aligned)
// with the pattern.
inline void fill_pattern(uint8_t* dst, uint64_t offset, uint64_t bytes) {
  for (uint64_t b = 0; b < bytes; b += 8) {
    uint64_t off = offset + b;
    uint64_t v = pattern_qword(off & ~4095ull, (off & 4095) / 8);
    std::memcpy(dst + b, &v, 8);
  }
}

// Expected first / last qword of a page of size `page_size` touched at `offset`.
inline uint64_t expected_first(uint64_t offset) { return pattern_qword(offset, 0); }
inline uint64_t expected_last(uint64_t offset, uint64_t page_size) {
  uint64_t last = offset / page_size * page_size + page_size - 8;
  return pattern_qword(last & ~4095ull, (last & 4095) / 8);
}

class PatternFaultServer {
 public:
  PatternFaultServer() = default;
  PatternFaultServer(const PatternFaultServer&) = delete;
  PatternFaultServer& operator=(const PatternFaultServer&) = delete;
  ~PatternFaultServer() { stop(); }

  // Registers [base, base + size) (4 KiB pages; guest offset 0 at `base`)
  // and starts the serving thread.
  Status start(uint8_t* base, uint64_t size) {
    base_ = base;
    size_ = size;
    uffd_.reset(static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
    if (!uffd_) return fail_errno("userfaultfd() failed");
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = 0;
    if (ioctl(uffd_.get(), UFFDIO_API, &api) < 0) return fail_errno("UFFDIO_API failed");
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uint64_t>(base);
    reg.range.len = size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd_.get(), UFFDIO_REGISTER, &reg) < 0) return fail_errno("UFFDIO_REGISTER failed");
    stop_.reset(eventfd(0, EFD_CLOEXEC));
    if (!stop_) return fail_errno("eventfd() failed");
    thread_ = std::thread([this] { serve(); });
    return {};
  }

  void stop() {
    if (!thread_.joinable()) return;
    uint64_t one = 1;
    (void)!write(stop_.get(), &one, sizeof one);
    thread_.join();
  }

  uint64_t faults_served() const { return faults_.load(); }
  // Distinct page offsets installed by this server.
  std::set<uint64_t> pages_served() const {
    std::lock_guard lock(mu_);
    return pages_;
  }
  // First error the serving thread hit, or empty.
  std::string error() const {
    std::lock_guard lock(mu_);
    return error_;
  }

 private:
  void serve() {
    alignas(4096) static thread_local uint8_t page[4096];
    pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    for (;;) {
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        record_error("poll failed");
        return;
      }
      if (fds[1].revents & POLLIN) return;
      uffd_msg msg;
      ssize_t n = read(uffd_.get(), &msg, sizeof msg);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        record_error("read from uffd failed");
        return;
      }
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t addr = msg.arg.pagefault.address & ~4095ull;
      uint64_t offset = addr - reinterpret_cast<uint64_t>(base_);
      fill_pattern(page, offset, 4096);
      uffdio_copy copy{};
      copy.dst = addr;
      copy.src = reinterpret_cast<uint64_t>(page);
      copy.len = 4096;
      // EEXIST: the page was installed by an earlier copy of a repeated
      // fault; the copy woke nobody, so wake explicitly.
      if (ioctl(uffd_.get(), UFFDIO_COPY, &copy) < 0) {
        if (errno == EEXIST) {
          uffdio_range range{addr, 4096};
          ioctl(uffd_.get(), UFFDIO_WAKE, &range);
        } else {
          record_error(format_message("UFFDIO_COPY at offset {:#x} failed: {}", offset,
                                   std::strerror(errno)));
          return;
        }
      }
      faults_.fetch_add(1);
      std::lock_guard lock(mu_);
      pages_.insert(offset);
    }
  }

  // Called before the serving thread gives up. Unregistering the range wakes
  // every thread blocked on it and lets later faults fill zero pages, so a
  // broken server fails the test with this message instead of hanging it.
  void record_error(std::string what) {
    uffdio_range range{reinterpret_cast<uint64_t>(base_), size_};
    ioctl(uffd_.get(), UFFDIO_UNREGISTER, &range);
    std::lock_guard lock(mu_);
    if (error_.empty()) error_ = std::move(what);
  }

  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  UniqueFd uffd_;
  UniqueFd stop_;
  std::thread thread_;
  std::atomic<uint64_t> faults_{0};
  mutable std::mutex mu_;
  std::set<uint64_t> pages_;
  std::string error_;
};

}  // namespace faultline::client::testing
