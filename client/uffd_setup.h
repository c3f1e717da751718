// Creating and registering a userfaultfd exactly as Firecracker does before it
// hands the fd to a memory server (DESIGN.md §2, §4).
//
// Firecracker (through the `userfaultfd` crate) opens the uffd with
// O_CLOEXEC|O_NONBLOCK and without UFFD_USER_MODE_ONLY, because faults raised
// by KVM inside the kernel must reach the server too; it runs UFFDIO_API with
// UFFD_FEATURE_EVENT_REMOVE (upstream) or EVENT_REMOVE|WP_ASYNC (forks that
// track dirty pages through uffd write-protect), then registers every guest
// region MISSING (upstream) or MISSING|WP (those forks). The server cannot add
// features afterwards: UFFDIO_API succeeds once per fd.
//
// Free functions over fds the caller owns; thread-compatible.
#pragma once

#include <cstdint>

#include "common/error.h"
#include "common/unique_fd.h"
// The ABI values Debian 12's headers lack (WP_ASYNC, USERFAULTFD_IOC_NEW, ...),
// shared with the server.
#include "kernel/uffd_abi.h"

namespace faultline::client {

// The extra event features a test may ask for on top of what Firecracker
// requests (ClientConfig::extra_events accepts any OR of these).
inline constexpr uint64_t kExtraEventUnmap = UFFD_FEATURE_EVENT_UNMAP;
inline constexpr uint64_t kExtraEventRemap = UFFD_FEATURE_EVENT_REMAP;
inline constexpr uint64_t kExtraEventFork = UFFD_FEATURE_EVENT_FORK;
inline constexpr uint64_t kAllowedExtraEvents = kExtraEventUnmap | kExtraEventRemap | kExtraEventFork;

// The UFFDIO_API features Firecracker requests. Never WP_UNPOPULATED: the
// forks do not enable it, so a server must cope with non-present pages that
// cannot be write-protected (DESIGN.md §4).
uint64_t firecracker_uffd_features(bool wp_async, uint64_t extra_events);

// The UFFDIO_REGISTER mode Firecracker uses: MISSING, plus WP with wp_async.
uint64_t firecracker_register_mode(bool wp_async);

// A new uffd with O_CLOEXEC|O_NONBLOCK: /dev/userfaultfd + USERFAULTFD_IOC_NEW
// (6.1+; works where the syscall is restricted by vm.unprivileged_userfaultfd),
// falling back to the userfaultfd(2) syscall when the device is missing or
// refuses.
Result<UniqueFd> open_userfaultfd();

// UFFDIO_API with exactly `features`; fails if the kernel lacks any of them.
Status uffd_api(int uffd, uint64_t features);

// UFFDIO_REGISTER of [address, address + length) with `mode`.
Status uffd_register(int uffd, uint64_t address, uint64_t length, uint64_t mode);

}  // namespace faultline::client
