#include "client/uffd_setup.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>

namespace faultline::client {

uint64_t firecracker_uffd_features(bool wp_async, uint64_t extra_events) {
  // Upstream Firecracker requires EVENT_REMOVE so the server learns about
  // balloon / free-page-reporting madvise(MADV_DONTNEED) of guest ranges.
  uint64_t features = UFFD_FEATURE_EVENT_REMOVE;
  // Dirty-tracking forks add WP_ASYNC: the kernel resolves write faults on
  // write-protected pages itself (clearing the pagemap uffd-wp bit) with no
  // message to the server.
  if (wp_async) features |= UFFD_FEATURE_WP_ASYNC;
  return features | (extra_events & kAllowedExtraEvents);
}

uint64_t firecracker_register_mode(bool wp_async) {
  return wp_async ? (UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP)
                  : UFFDIO_REGISTER_MODE_MISSING;
}

Result<UniqueFd> open_userfaultfd() {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  UniqueFd device(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (device) {
    int fd = ::ioctl(device.get(), USERFAULTFD_IOC_NEW, flags);
    if (fd >= 0) return UniqueFd(fd);
  }
  long fd = ::syscall(SYS_userfaultfd, flags);
  if (fd < 0) return fail_errno("cannot create a userfaultfd (neither /dev/userfaultfd nor the syscall)");
  return UniqueFd(static_cast<int>(fd));
}

Status uffd_api(int uffd, uint64_t features) {
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(uffd, UFFDIO_API, &api) != 0) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "%#llx", static_cast<unsigned long long>(features));
    return fail_errno(std::string("UFFDIO_API with features ") + hex + " failed");
  }
  return {};
}

Status uffd_register(int uffd, uint64_t address, uint64_t length, uint64_t mode) {
  uffdio_register reg{};
  reg.range.start = address;
  reg.range.len = length;
  reg.mode = mode;
  if (::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
    return fail_errno("UFFDIO_REGISTER of " + std::to_string(length) + " bytes at " +
                      std::to_string(address) + " failed");
  }
  return {};
}

}  // namespace faultline::client
