#include "bench/naive_server.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace faultline::bench {

Result<std::unique_ptr<NaiveServer>> NaiveServer::start(int uffd, std::vector<GuestRegion> regions,
                                                        const std::string& memory_path) {
  if (regions.empty()) return fail("the naive server needs at least one region");
  UniqueFd file(::open(memory_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!file) return fail_errno("naive server: cannot open " + memory_path);
  std::unique_ptr<NaiveServer> s(new NaiveServer(uffd, std::move(regions), std::move(file)));
  if (!s->stop_efd_ || !s->buffer_ || !s->zeros_) return fail("naive server: out of memory or eventfds");
  s->thread_ = std::thread([p = s.get()] { p->loop(); });
  return s;
}

NaiveServer::NaiveServer(int uffd, std::vector<GuestRegion> regions, UniqueFd file)
    : uffd_(uffd), regions_(std::move(regions)), page_size_(regions_.front().page_size), file_(std::move(file)) {
  stop_efd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  uint64_t pages = 0;
  for (const GuestRegion& r : regions_) {
    region_first_page_.push_back(pages);
    pages += r.size / page_size_;
  }
  removed_.assign(pages, 0);
  buffer_ = static_cast<uint8_t*>(std::aligned_alloc(4096, page_size_));
  zeros_ = static_cast<uint8_t*>(std::aligned_alloc(4096, page_size_));
  if (zeros_) std::memset(zeros_, 0, page_size_);
  deferred_.reserve(64);
}

NaiveServer::~NaiveServer() {
  stop();
  std::free(buffer_);
  std::free(zeros_);
}

void NaiveServer::stop() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  (void)!::write(stop_efd_.get(), &one, sizeof one);
  thread_.join();
}

uint64_t NaiveServer::state_bytes() const { return removed_.capacity() + 2 * page_size_; }

std::string NaiveServer::error() const { return thread_.joinable() ? std::string() : error_; }

void NaiveServer::on_remove(uint64_t start, uint64_t end) {
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
  removes_.fetch_add(1, std::memory_order_relaxed);
}

bool NaiveServer::serve(uint64_t address) {
  const uint64_t page_addr = address & ~(page_size_ - 1);
  for (size_t i = 0; i < regions_.size(); ++i) {
    const GuestRegion& r = regions_[i];
    if (!r.contains(page_addr)) continue;
    const uint64_t index = (page_addr - r.base_host_virt_addr) / page_size_;
    const uint8_t* src = zeros_;
    if (!removed_[region_first_page_[i] + index]) {
      const off_t at = static_cast<off_t>(r.offset + index * page_size_);
      if (::pread(file_.get(), buffer_, page_size_, at) != static_cast<ssize_t>(page_size_)) {
        error_ = "pread of the memory file failed or was short";
        return true;
      }
      src = buffer_;
    }
    // Zero pages are copied from a zero buffer, as Firecracker's example does
    // (UFFDIO_ZEROPAGE does not exist for hugetlbfs).
    uffdio_copy copy{};
    copy.dst = page_addr;
    copy.src = reinterpret_cast<uint64_t>(src);
    copy.len = page_size_;
    copy.mode = 0;  // wakes the faulting thread
    if (::ioctl(uffd_, UFFDIO_COPY, &copy) == 0) return true;
    if (errno == EEXIST) {
      // Already present (another fault of the same page won): the failed
      // copy woke nobody, so wake the waiters.
      uffdio_range range{page_addr, page_size_};
      (void)::ioctl(uffd_, UFFDIO_WAKE, &range);
      return true;
    }
    // While a REMOVE is unread every install fails EAGAIN: read it first.
    if (errno == EAGAIN) return false;
    if (errno == ESRCH || errno == ENOENT) return true;  // the guest is gone / unmapped
    error_ = std::string("UFFDIO_COPY failed: ") + std::strerror(errno);
    return true;
  }
  error_ = "fault outside every region";
  return true;
}

void NaiveServer::loop() {
  while (error_.empty()) {
    pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_efd_.get(), POLLIN, 0}};
    // While faults wait on EAGAIN the loop polls without sleeping: the
    // madvising thread clears the kernel's "mmap changing" mark only once it
    // runs again after its REMOVE was read, and no event announces that.
    const int rc = ::poll(fds, 2, deferred_.empty() ? -1 : 0);
    if (rc < 0) {
      if (errno == EINTR) continue;
      error_ = std::string("poll failed: ") + std::strerror(errno);
      break;
    }
    if (fds[1].revents) break;
    if (fds[0].revents & POLLIN) {
      uffd_msg msg;
      const ssize_t n = ::read(uffd_, &msg, sizeof msg);  // ONE message per read, like the example
      if (n < 0 && errno != EAGAIN && errno != EINTR) {
        error_ = std::string("read of the uffd failed: ") + std::strerror(errno);
        break;
      }
      if (n == sizeof msg) {
        switch (msg.event) {
          case UFFD_EVENT_PAGEFAULT:
            faults_.fetch_add(1, std::memory_order_relaxed);
            if (!serve(msg.arg.pagefault.address)) deferred_.push_back(msg.arg.pagefault.address);
            break;
          case UFFD_EVENT_REMOVE:
            on_remove(msg.arg.remove.start, msg.arg.remove.end);
            break;
          default:
            break;  // Firecracker requests no other events
        }
      }
    }
    // Deferred faults are retried after the event (a pending REMOVE fails
    // every install until it is read, so retrying before reading it is futile).
    if (!deferred_.empty()) {
      std::vector<uint64_t> retry;
      retry.swap(deferred_);
      for (uint64_t a : retry) {
        if (!serve(a)) deferred_.push_back(a);
      }
      if (!deferred_.empty() && rc == 0) ::sched_yield();  // let the madvising thread run
    }
  }
}

}  // namespace faultline::bench
