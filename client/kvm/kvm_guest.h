// KvmGuest: a minimal KVM virtual machine whose vCPUs touch pages of given
// host memory, so that tests see guest faults arrive the way they do under
// Firecracker.
//
// Why it exists: when a Firecracker guest touches a missing page, the fault
// is raised by the kernel on KVM's behalf (GUP / the instruction emulator),
// not by a thread of the VMM. A uffd server that is only ever tested with
// host threads touching memory never sees such faults. KvmGuest maps the
// caller's memory regions into a VM's guest-physical address space and runs
// a tiny guest program (guest_touch.S) on real vCPUs that reads and/or
// writes the pages the caller names.
//
// Guest-physical layout: GPA 0 holds a small control memslot that belongs to
// KvmGuest (the guest program and one table area per vCPU); it is never part
// of the caller's regions, so registering the regions with a userfaultfd
// does not make the guest's own code fault. The regions follow, in order,
// each in its own memslot at a 2 MiB-aligned GPA (hugetlb-backed memslots
// must be 2 MiB-aligned). The vCPUs run in 32-bit protected mode with flat
// segments and paging off, so the regions must end below the 4 GiB
// guest-physical line (a little under 4 GiB of guest memory in total).
//
// Thread-safety: create() and the destructor need external synchronization.
// run_touch() may be called concurrently for DIFFERENT vcpu indexes, each
// call driving its vCPU on the calling thread; at most one call per vCPU at
// a time. REQUIRES: the regions stay mapped while the KvmGuest lives.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/error.h"

namespace faultline::client {

// One guest memory region as the caller sees it: a host mapping, page
// aligned, whose size is a multiple of 4 KiB (and of the page size passed to
// KvmGuest::create). Regions are given in guest order.
struct GuestMemorySpan {
  uint8_t* host;
  uint64_t size;
};

enum class VcpuAccess { kRead, kWrite, kReadThenWrite };

struct VcpuTouchResult {
  uint64_t pages_touched = 0;
  // For kRead / kReadThenWrite: for each touched offset, in plan order, the
  // qword at the offset itself and the last qword of the page (of the
  // KvmGuest's page size) that contains the offset, as the GUEST read them
  // before its own write. Empty for kWrite. With 4 KiB pages these are the
  // first and last 8 bytes of the touched page.
  std::vector<uint64_t> first_qword, last_qword;
};

class KvmGuest {
 public:
  // Most vCPUs create() accepts: each owns a table area in the control
  // memslot, and tests need only a few.
  static constexpr int kMaxVcpus = 64;

  // True when /dev/kvm can be opened read-write.
  static bool available();

  // Builds a VM with `vcpus` vCPUs whose guest memory is `regions` (see the
  // layout above). `page_size` (4096 or 2 MiB) only sets where the last
  // qword of a touched page is read; every region size must be a multiple
  // of it. Fails with a clear Error when the regions do not fit below
  // 4 GiB guest-physical, when a region is misaligned, or when KVM refuses.
  static Result<KvmGuest> create(std::vector<GuestMemorySpan> regions, int vcpus,
                                 uint64_t page_size);

  KvmGuest(KvmGuest&&) noexcept;
  KvmGuest& operator=(KvmGuest&&) noexcept;
  KvmGuest(const KvmGuest&) = delete;
  KvmGuest& operator=(const KvmGuest&) = delete;
  ~KvmGuest();

  // Runs vCPU `vcpu` through the guest program over `page_offsets` (byte
  // offsets into the concatenated regions, 4 KiB-aligned, any order),
  // touching each page in order: for kRead / kReadThenWrite the guest reads
  // the page's first and last qword (recorded in the result); for kWrite /
  // kReadThenWrite it then writes `write_tag` followed by the page offset
  // (both u64, little endian) into the page's first 16 bytes.
  // Long plans run in several KVM_RUN batches; that is invisible to the
  // caller except that a failure part-way leaves earlier pages touched.
  // Blocks while the guest's faults are pending (e.g. on a uffd nobody
  // serves). An invalid offset is an Error before the guest runs; a guest
  // exit other than the program's "done" signal is an Error naming the exit
  // reason, RIP and how many pages were completed; the guest signals done
  // with an OUT to its done port, so even a HLT is unexpected. After such
  // an Error the vCPU is retired: later calls for it fail.
  Result<VcpuTouchResult> run_touch(int vcpu, std::span<const uint64_t> page_offsets,
                                    VcpuAccess access, uint64_t write_tag);

  int vcpu_count() const;
  uint64_t guest_memory_size() const;  // sum of the region sizes

 private:
  struct State;
  explicit KvmGuest(std::unique_ptr<State> state);

  std::unique_ptr<State> state_;
};

}  // namespace faultline::client
