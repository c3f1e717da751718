// Reading another process's memory: the bytes a paused VM holds, for a diff
// snapshot (server/diff_export.h).
//
// process_vm_readv() copies straight from the other address space with one
// system call per large run. Where it is refused (EPERM: a seccomp filter or
// a Yama/LSM policy that still allows ptrace-mode reads of /proc/PID/mem;
// ENOSYS: a kernel or sandbox without it), pread() on /proc/PID/mem reads the
// same bytes under the same ptrace-access check.
//
// Reading a page that is missing in a userfaultfd-registered range faults it
// in like any access would (the memory server must be serving); callers read
// pages they know to be present.
//
// Thread-safety: free functions, safe from any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <span>

#include "common/error.h"

namespace faultline::kernel {

enum class MemoryReadMethod {
  kAuto,         // process_vm_readv, then /proc/PID/mem if it is refused
  kProcessVmReadv,
  kProcMem,      // /proc/PID/mem only
};

// Fills `out` with the bytes of [address, address + out.size()) of process
// `pid`. All or nothing: a short read is continued where it stopped, and a
// range that cannot be read whole (part of it unmapped, the process gone) is
// an error that names the pid, the address and the length, and where it
// stopped.
Status read_process_memory(pid_t pid, uint64_t address, std::span<uint8_t> out,
                           MemoryReadMethod method = MemoryReadMethod::kAuto);

// Whether a process_vm_readv() failure with `error` (an errno) means "this
// way of reading is not allowed here, try /proc/PID/mem", rather than a
// failure that /proc/PID/mem would report too (EFAULT, ESRCH, ENOMEM).
bool process_vm_readv_refused(int error);

}  // namespace faultline::kernel
