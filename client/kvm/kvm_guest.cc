// How KvmGuest drives KVM. The header says what it guarantees.
//
// Control memslot (slot 0, GPA 0, owned by KvmGuest, never uffd-registered):
//   0x01000            the guest program (guest_touch.S), shared by all vCPUs
//   0x10000 + i*128K   vCPU i's area: header page, entry table, output table
// Region memslots (slot 1 + r) follow at 2 MiB-aligned GPAs.
#include "client/kvm/kvm_guest.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "client/kvm/format_message.h"
#include "common/mapping.h"
#include "common/unique_fd.h"

extern "C" const uint8_t guest_touch_start[];
extern "C" const uint8_t guest_touch_end[];

namespace faultline::client {
using detail::format_message;
namespace {

constexpr uint64_t k4K = 4096;
constexpr uint64_t k2M = 2ull << 20;

constexpr uint64_t kCodeGpa = 0x1000;
constexpr uint64_t kVcpuAreaBase = 0x10000;
constexpr uint64_t kVcpuAreaStride = 0x20000;
// Within a vCPU area.
constexpr uint64_t kHeaderOffset = 0;
constexpr uint64_t kTableOffset = 0x1000;
constexpr uint64_t kEntryBytes = 16;
constexpr uint64_t kBatchEntries = 2048;
constexpr uint64_t kOutputOffset = kTableOffset + kBatchEntries * kEntryBytes;
static_assert(kOutputOffset + kBatchEntries * 16 <= kVcpuAreaStride);

// Must match the port in guest_touch.S.
constexpr uint16_t kDonePort = 0x3f0;

// On Intel, KVM needs three pages of guest-physical space for a TSS (used
// when it emulates real mode without unrestricted guest). Firecracker and
// QEMU put it here, just under 4 GiB; the regions must end below it. With
// paging off, a 32-bit guest cannot address anything at or above 4 GiB anyway.
constexpr uint64_t kTssGpa = 0xfffbd000;
constexpr uint64_t kGuestPhysicalLimit = kTssGpa;

// Header layout shared with guest_touch.S.
struct GuestHeader {
  uint64_t write_tag;
  uint32_t entries_completed;
};

struct GuestEntry {
  uint32_t first_gpa;
  uint32_t last_gpa;
  uint64_t page_offset;
};
static_assert(sizeof(GuestEntry) == kEntryBytes);

uint64_t round_up(uint64_t v, uint64_t align) { return (v + align - 1) / align * align; }

const char* exit_reason_name(uint32_t reason) {
  switch (reason) {
    case KVM_EXIT_UNKNOWN: return "KVM_EXIT_UNKNOWN";
    case KVM_EXIT_EXCEPTION: return "KVM_EXIT_EXCEPTION";
    case KVM_EXIT_IO: return "KVM_EXIT_IO";
    case KVM_EXIT_HYPERCALL: return "KVM_EXIT_HYPERCALL";
    case KVM_EXIT_DEBUG: return "KVM_EXIT_DEBUG";
    case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
    case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
    case KVM_EXIT_IRQ_WINDOW_OPEN: return "KVM_EXIT_IRQ_WINDOW_OPEN";
    case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
    case KVM_EXIT_INTR: return "KVM_EXIT_INTR";
    case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "KVM_EXIT_SYSTEM_EVENT";
    default: return "unknown exit";
  }
}

}  // namespace

struct KvmGuest::State {
  struct RegionSlot {
    uint8_t* host;
    uint64_t size;
    uint64_t gpa;
    uint64_t offset;  // byte offset of the region in the concatenated guest memory
  };
  struct Vcpu {
    UniqueFd fd;
    Mapping run;  // struct kvm_run, shared with the kernel
    uint64_t area_gpa = 0;
    // Set once the guest stopped in an unexpected way: KVM may hold a
    // half-finished exit (e.g. an MMIO read waiting for data) that a fresh
    // KVM_RUN would complete in the wrong context, so the vCPU is not reused.
    bool broken = false;
  };

  UniqueFd kvm;
  UniqueFd vm;
  Mapping control;  // backing of the control memslot
  std::vector<RegionSlot> regions;
  std::vector<Vcpu> vcpus;
  uint64_t page_size = k4K;
  uint64_t total_size = 0;

  uint8_t* vcpu_area(int i) const { return control.bytes() + vcpus[i].area_gpa; }

  // Translates a guest-memory offset to the entry the guest program reads.
  Result<GuestEntry> entry_for(uint64_t offset) const {
    if (offset % k4K != 0) return fail(format_message("page offset {:#x} is not 4 KiB-aligned", offset));
    if (offset >= total_size) {
      return fail(format_message("page offset {:#x} is beyond the guest's {:#x} bytes of memory",
                              offset, total_size));
    }
    auto it = std::upper_bound(regions.begin(), regions.end(), offset,
                               [](uint64_t off, const RegionSlot& r) { return off < r.offset; });
    const RegionSlot& r = *std::prev(it);
    uint64_t in_region = offset - r.offset;
    // Region sizes are multiples of page_size and region GPAs are 2 MiB
    // aligned, so the containing page lies wholly inside the region.
    uint64_t page_start = in_region / page_size * page_size;
    return GuestEntry{static_cast<uint32_t>(r.gpa + in_region),
                      static_cast<uint32_t>(r.gpa + page_start + page_size - 8), offset};
  }

  // Builds the Error for a guest exit other than the done signal and retires
  // the vCPU.
  Error unexpected_exit(int vcpu, uint32_t completed, uint64_t batch_start) {
    const kvm_run* run = static_cast<const kvm_run*>(vcpus[vcpu].run.get());
    kvm_regs regs{};
    std::string rip = "unknown";
    if (ioctl(vcpus[vcpu].fd.get(), KVM_GET_REGS, &regs) == 0) rip = format_message("{:#x}", regs.rip);
    std::string detail;
    switch (run->exit_reason) {
      case KVM_EXIT_IO:
        detail = format_message(" ({} port {:#x}, size {})",
                             run->io.direction == KVM_EXIT_IO_OUT ? "out to" : "in from",
                             run->io.port, run->io.size);
        break;
      case KVM_EXIT_MMIO:
        detail = format_message(" ({} of {} bytes at GPA {:#x}, which no memslot backs with host memory)",
                             run->mmio.is_write ? "write" : "read", run->mmio.len,
                             run->mmio.phys_addr);
        break;
      case KVM_EXIT_INTERNAL_ERROR:
        detail = format_message(" (suberror {})", run->internal.suberror);
        break;
      case KVM_EXIT_FAIL_ENTRY:
        detail = format_message(" (hardware entry failure reason {:#x})",
                             run->fail_entry.hardware_entry_failure_reason);
        break;
      case KVM_EXIT_SYSTEM_EVENT:
        detail = format_message(" (event type {})", run->system_event.type);
        break;
      default:
        break;
    }
    vcpus[vcpu].broken = true;
    return Error{0, format_message("vCPU {} stopped with {} ({}){} at RIP {} after {} of the plan's pages",
                                   vcpu, exit_reason_name(run->exit_reason), run->exit_reason,
                                   detail, rip, batch_start + completed)};
  }
};

KvmGuest::KvmGuest(std::unique_ptr<State> state) : state_(std::move(state)) {}
KvmGuest::KvmGuest(KvmGuest&&) noexcept = default;
KvmGuest& KvmGuest::operator=(KvmGuest&&) noexcept = default;
KvmGuest::~KvmGuest() = default;

int KvmGuest::vcpu_count() const { return static_cast<int>(state_->vcpus.size()); }
uint64_t KvmGuest::guest_memory_size() const { return state_->total_size; }

bool KvmGuest::available() {
  UniqueFd fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  return fd.valid();
}

Result<KvmGuest> KvmGuest::create(std::vector<GuestMemorySpan> regions, int vcpus,
                                  uint64_t page_size) {
  if (vcpus < 1 || vcpus > kMaxVcpus) {
    return fail(format_message("a KvmGuest needs 1 to {} vCPUs, not {}", kMaxVcpus, vcpus), EINVAL);
  }
  if (page_size != k4K && page_size != k2M) {
    return fail(format_message("page size {} is neither 4 KiB nor 2 MiB", page_size), EINVAL);
  }
  if (regions.empty()) return fail("a KvmGuest needs at least one memory region", EINVAL);

  auto state = std::make_unique<State>();
  state->page_size = page_size;

  // Lay out the guest-physical space before touching KVM, so that a guest
  // this mode cannot address is refused with a clear message.
  const uint64_t control_size = round_up(kVcpuAreaBase + uint64_t(vcpus) * kVcpuAreaStride, k2M);
  uint64_t next_gpa = control_size;
  uint64_t offset = 0;
  for (size_t i = 0; i < regions.size(); ++i) {
    const GuestMemorySpan& span = regions[i];
    auto host = reinterpret_cast<uintptr_t>(span.host);
    if (span.size == 0 || span.size % page_size != 0) {
      return fail(format_message("region {} is {:#x} bytes, not a non-zero multiple of the {:#x}-byte page",
                              i, span.size, page_size), EINVAL);
    }
    if (host % k4K != 0) {
      return fail(format_message("region {} starts at host address {:#x}, not page-aligned", i, host),
                  EINVAL);
    }
    uint64_t gpa = round_up(next_gpa, k2M);
    if (gpa + span.size > kGuestPhysicalLimit || gpa + span.size < gpa) {
      return fail(format_message(
          "the guest's regions need guest-physical space up to {:#x}, but the vCPUs run in "
          "32-bit protected mode without paging and reach only {:#x} (about 4 GiB minus {:#x} "
          "bytes of control memory and 2 MiB alignment gaps)",
          gpa + span.size, kGuestPhysicalLimit, control_size), EINVAL);
    }
    state->regions.push_back({span.host, span.size, gpa, offset});
    next_gpa = gpa + span.size;
    offset += span.size;
  }
  state->total_size = offset;

  state->kvm.reset(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!state->kvm) return fail_errno("cannot open /dev/kvm");
  int kvm = state->kvm.get();
  int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
  if (api != KVM_API_VERSION) {
    return fail(format_message("/dev/kvm speaks API version {}, expected {}", api, KVM_API_VERSION));
  }
  if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0) {
    return fail("KVM lacks KVM_CAP_USER_MEMORY (guest memory from host mappings)");
  }
  int memslots = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
  if (memslots > 0 && static_cast<size_t>(memslots) < regions.size() + 1) {
    return fail(format_message("KVM allows {} memslots; {} regions need {}", memslots,
                            regions.size(), regions.size() + 1));
  }
  int max_vcpus = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
  if (max_vcpus <= 0) max_vcpus = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS);
  if (max_vcpus > 0 && vcpus > max_vcpus) {
    return fail(format_message("KVM allows {} vCPUs per VM, {} asked", max_vcpus, vcpus));
  }

  state->vm.reset(ioctl(kvm, KVM_CREATE_VM, 0));
  if (!state->vm) return fail_errno("KVM_CREATE_VM failed");
  int vm = state->vm.get();
  // Only Intel needs the TSS (see kTssGpa); elsewhere the capability is absent.
  if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR) > 0 &&
      ioctl(vm, KVM_SET_TSS_ADDR, static_cast<unsigned long>(kTssGpa)) < 0) {
    return fail_errno("KVM_SET_TSS_ADDR failed");
  }

  auto control = Mapping::map(control_size, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  if (!control) return std::unexpected(control.error());
  state->control = std::move(*control);
  const size_t code_size = guest_touch_end - guest_touch_start;
  std::memcpy(state->control.bytes() + kCodeGpa, guest_touch_start, code_size);

  kvm_userspace_memory_region slot{};
  slot.slot = 0;
  slot.guest_phys_addr = 0;
  slot.memory_size = control_size;
  slot.userspace_addr = state->control.address();
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot) < 0) {
    return fail_errno("KVM_SET_USER_MEMORY_REGION for the control memslot failed");
  }
  for (size_t i = 0; i < state->regions.size(); ++i) {
    const State::RegionSlot& r = state->regions[i];
    slot.slot = static_cast<uint32_t>(i + 1);
    slot.guest_phys_addr = r.gpa;
    slot.memory_size = r.size;
    slot.userspace_addr = reinterpret_cast<uint64_t>(r.host);
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot) < 0) {
      return fail_errno(format_message("KVM_SET_USER_MEMORY_REGION for region {} ({:#x} bytes at GPA {:#x}) failed",
                                    i, r.size, r.gpa));
    }
  }

  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size < static_cast<int>(sizeof(kvm_run))) return fail_errno("KVM_GET_VCPU_MMAP_SIZE failed");
  for (int i = 0; i < vcpus; ++i) {
    State::Vcpu vcpu;
    vcpu.fd.reset(ioctl(vm, KVM_CREATE_VCPU, i));
    if (!vcpu.fd) return fail_errno(format_message("KVM_CREATE_VCPU {} failed", i));
    auto run = Mapping::map(run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.fd.get());
    if (!run) return std::unexpected(run.error());
    vcpu.run = std::move(*run);
    vcpu.area_gpa = kVcpuAreaBase + uint64_t(i) * kVcpuAreaStride;

    // Protected mode straight from reset: the segment caches are loaded
    // directly, so no GDT is needed as long as the guest never reloads a
    // segment register (it does not). Flat 4 GiB segments with paging off
    // make every linear address the guest-physical address.
    kvm_sregs sregs{};
    if (ioctl(vcpu.fd.get(), KVM_GET_SREGS, &sregs) < 0) return fail_errno("KVM_GET_SREGS failed");
    kvm_segment code{};
    code.base = 0;
    code.limit = 0xffffffff;
    code.selector = 0x08;
    code.type = 0xb;  // execute/read, accessed
    code.present = 1;
    code.dpl = 0;
    code.db = 1;  // 32-bit default operand size
    code.s = 1;
    code.g = 1;
    kvm_segment data = code;
    data.selector = 0x10;
    data.type = 0x3;  // read/write, accessed
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.cr0 = 0x11;  // PE | ET; PG off
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vcpu.fd.get(), KVM_SET_SREGS, &sregs) < 0) return fail_errno("KVM_SET_SREGS failed");
    state->vcpus.push_back(std::move(vcpu));
  }
  return KvmGuest(std::move(state));
}

Result<VcpuTouchResult> KvmGuest::run_touch(int vcpu, std::span<const uint64_t> page_offsets,
                                            VcpuAccess access, uint64_t write_tag) {
  State& s = *state_;
  if (vcpu < 0 || vcpu >= vcpu_count()) {
    return fail(format_message("vCPU {} does not exist (the guest has {})", vcpu, vcpu_count()), EINVAL);
  }
  State::Vcpu& v = s.vcpus[vcpu];
  if (v.broken) {
    return fail(format_message("vCPU {} stopped unexpectedly earlier and cannot be run again", vcpu));
  }

  // Validate the whole plan first: a bad offset must not leave half the
  // plan touched.
  std::vector<GuestEntry> entries;
  entries.reserve(page_offsets.size());
  for (uint64_t off : page_offsets) {
    auto entry = s.entry_for(off);
    if (!entry) return std::unexpected(entry.error());
    entries.push_back(*entry);
  }

  const bool reads = access != VcpuAccess::kWrite;
  const bool writes = access != VcpuAccess::kRead;
  VcpuTouchResult result;
  if (reads) {
    result.first_qword.reserve(entries.size());
    result.last_qword.reserve(entries.size());
  }

  uint8_t* area = s.vcpu_area(vcpu);
  auto* header = reinterpret_cast<GuestHeader*>(area + kHeaderOffset);
  const auto* run = static_cast<const kvm_run*>(v.run.get());

  for (size_t start = 0; start < entries.size(); start += kBatchEntries) {
    const size_t count = std::min<size_t>(kBatchEntries, entries.size() - start);
    header->write_tag = write_tag;
    header->entries_completed = 0;
    std::memcpy(area + kTableOffset, entries.data() + start, count * kEntryBytes);

    kvm_regs regs{};
    regs.rip = kCodeGpa;
    regs.rflags = 0x2;  // bit 1 is reserved-as-one; IF off: no interrupts wanted
    regs.rsi = v.area_gpa + kTableOffset;
    regs.rcx = count;
    regs.rdi = v.area_gpa + kOutputOffset;
    regs.rbx = (reads ? 1 : 0) | (writes ? 2 : 0);
    regs.rbp = v.area_gpa + kHeaderOffset;
    // Re-pointing RIP after the previous batch's done OUT is safe: KVM has
    // finished an OUT by the time it exits to us (verified here with
    // multi-batch plans and repeated calls on one vCPU).
    if (ioctl(v.fd.get(), KVM_SET_REGS, &regs) < 0) return fail_errno("KVM_SET_REGS failed");

    for (;;) {
      if (ioctl(v.fd.get(), KVM_RUN, 0) < 0) {
        // A signal to this thread interrupts KVM_RUN; the guest resumes
        // where it was on the next call.
        if (errno == EINTR || errno == EAGAIN) continue;
        int saved_errno = errno;
        v.broken = true;
        errno = saved_errno;
        return fail_errno(format_message("KVM_RUN on vCPU {} failed", vcpu));
      }
      if (run->exit_reason == KVM_EXIT_INTR) continue;
      if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT &&
          run->io.port == kDonePort) {
        break;
      }
      return std::unexpected(s.unexpected_exit(vcpu, header->entries_completed, start));
    }
    if (header->entries_completed != count) {
      v.broken = true;
      return fail(format_message("vCPU {} reported done after {} of {} pages of a batch", vcpu,
                              header->entries_completed, count));
    }
    if (reads) {
      const uint8_t* out = area + kOutputOffset;
      for (size_t i = 0; i < count; ++i) {
        uint64_t first, last;
        std::memcpy(&first, out + i * 16, 8);
        std::memcpy(&last, out + i * 16 + 8, 8);
        result.first_qword.push_back(first);
        result.last_qword.push_back(last);
      }
    }
    result.pages_touched += count;
  }
  return result;
}

}  // namespace faultline::client
