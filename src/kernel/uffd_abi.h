// userfaultfd ABI constants that Debian 12's <linux/userfaultfd.h> predates.
//
// The running kernel (6.18) knows them; the build headers do not. Each value
// is the kernel's UAPI value; only define what the headers lack.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

// /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
inline constexpr unsigned long long kPagemapPresent = 1ull << 63;
inline constexpr unsigned long long kPagemapUffdWp = 1ull << 57;
