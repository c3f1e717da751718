#include "kernel/userfaultfd.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <array>

#include "kernel/uffd_abi.h"

namespace faultline::kernel {

const char* to_string(IoctlOutcome outcome) {
  switch (outcome) {
    case IoctlOutcome::kDone: return "done";
    case IoctlOutcome::kExists: return "exists";
    case IoctlOutcome::kRetry: return "retry";
    case IoctlOutcome::kGone: return "gone";
    case IoctlOutcome::kUnmapped: return "unmapped";
    case IoctlOutcome::kFailed: return "failed";
  }
  return "?";
}

namespace {

UffdEvent decode(const uffd_msg& msg) {
  switch (msg.event) {
    case UFFD_EVENT_PAGEFAULT:
      return PageFault{
          .address = msg.arg.pagefault.address,
          .write = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0,
          .wp = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0,
          .tid = msg.arg.pagefault.feat.ptid,
      };
    case UFFD_EVENT_REMOVE:
      return RemoveEvent{msg.arg.remove.start, msg.arg.remove.end};
    case UFFD_EVENT_UNMAP:
      return UnmapEvent{msg.arg.remove.start, msg.arg.remove.end};
    case UFFD_EVENT_REMAP:
      return RemapEvent{msg.arg.remap.from, msg.arg.remap.to, msg.arg.remap.len};
    case UFFD_EVENT_FORK:
      return ForkEvent{static_cast<int>(msg.arg.fork.ufd)};
    default:
      return UnknownEvent{msg.event};
  }
}

// Maps an ioctl's errno and progress field to an outcome. `progress` is the
// kernel's copy/zeropage field: bytes done, or a negated errno.
IoctlResult classify(int rc, int err, int64_t progress, uint64_t len) {
  if (rc == 0) return {IoctlOutcome::kDone, len, 0};
  IoctlResult r;
  r.error = err;
  r.bytes = progress > 0 ? static_cast<uint64_t>(progress) : 0;
  switch (err) {
    case EEXIST: r.outcome = IoctlOutcome::kExists; break;
    // A pending REMOVE/UNMAP/REMAP event makes every install fail until the
    // event is read. Zero progress shows as copy == 0 on older kernels and as
    // copy == -EAGAIN on newer ones: both land here.
    case EAGAIN: r.outcome = IoctlOutcome::kRetry; break;
    case ESRCH: r.outcome = IoctlOutcome::kGone; break;
    case ENOENT: r.outcome = IoctlOutcome::kUnmapped; break;
    default: r.outcome = IoctlOutcome::kFailed; break;
  }
  return r;
}

}  // namespace

IoctlResult result_for_errno(int err) { return classify(-1, err, 0, 0); }

Result<size_t> Userfaultfd::read_events(std::span<UffdEvent> out) const {
  std::array<uffd_msg, 64> msgs;
  const size_t want = std::min(out.size(), msgs.size());
  for (;;) {
    ssize_t n = ::read(fd_.get(), msgs.data(), want * sizeof(uffd_msg));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return 0;
      return fail_errno("reading the userfaultfd failed");
    }
    if (n % sizeof(uffd_msg) != 0) {
      return fail("short read from the userfaultfd: " + std::to_string(n) + " bytes is not a whole number of messages");
    }
    size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
    for (size_t i = 0; i < count; ++i) out[i] = decode(msgs[i]);
    return count;
  }
}

IoctlResult Userfaultfd::copy(uint64_t dst, const void* src, uint64_t len, bool write_protect,
                              bool dont_wake) const {
  uffdio_copy c{};
  c.dst = dst;
  c.src = reinterpret_cast<uint64_t>(src);
  c.len = len;
  c.mode = (write_protect ? UFFDIO_COPY_MODE_WP : 0) | (dont_wake ? UFFDIO_COPY_MODE_DONTWAKE : 0);
  int rc = ::ioctl(fd_.get(), UFFDIO_COPY, &c);
  return classify(rc, rc == 0 ? 0 : errno, c.copy, len);
}

IoctlResult Userfaultfd::zeropage(uint64_t dst, uint64_t len, bool dont_wake) const {
  uffdio_zeropage z{};
  z.range.start = dst;
  z.range.len = len;
  z.mode = dont_wake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
  int rc = ::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z);
  return classify(rc, rc == 0 ? 0 : errno, z.zeropage, len);
}

IoctlResult Userfaultfd::writeprotect(uint64_t start, uint64_t len, bool protect, bool dont_wake) const {
  uffdio_writeprotect w{};
  w.range.start = start;
  w.range.len = len;
  w.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) | (dont_wake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
  int rc = ::ioctl(fd_.get(), UFFDIO_WRITEPROTECT, &w);
  return classify(rc, rc == 0 ? 0 : errno, 0, len);
}

IoctlResult Userfaultfd::wake(uint64_t start, uint64_t len) const {
  uffdio_range r{start, len};
  int rc = ::ioctl(fd_.get(), UFFDIO_WAKE, &r);
  return classify(rc, rc == 0 ? 0 : errno, 0, len);
}

}  // namespace faultline::kernel
