#include "client/vcpu_touch.h"

#include <chrono>
#include <thread>
#include <vector>

#if FAULTLINE_CLIENT_HAVE_KVM
#include "client/kvm/kvm_guest.h"
#endif

namespace faultline::client {

#if FAULTLINE_CLIENT_HAVE_KVM

struct VcpuToucher::State {
  KvmGuest guest;
};

bool VcpuToucher::available() { return KvmGuest::available(); }

Result<VcpuToucher> VcpuToucher::create(const FirecrackerClient& client, int vcpus) {
  std::vector<GuestMemorySpan> spans;
  for (const GuestRegion& r : client.regions()) {
    spans.push_back(GuestMemorySpan{reinterpret_cast<uint8_t*>(r.base_host_virt_addr), r.size});
  }
  auto guest = KvmGuest::create(std::move(spans), vcpus, client.page_size());
  if (!guest) return std::unexpected(guest.error());
  return VcpuToucher(std::make_unique<State>(State{std::move(*guest)}), vcpus);
}

Result<TouchResult> VcpuToucher::touch(Verifier& verifier, std::span<const PageTouch> plan,
                                       uint64_t write_tag) {
  if (write_tag == 0) return fail("the write tag must be non-zero");
  const uint64_t mismatches_before = verifier.mismatches();
  const auto start = std::chrono::steady_clock::now();
  struct Slice {
    std::vector<uint64_t> reads_only, read_then_write, writes_only;
    Error error;
    bool failed = false;
  };
  std::vector<Slice> slices(static_cast<size_t>(vcpus_));
  for (size_t i = 0; i < plan.size(); ++i) {
    Slice& s = slices[i * static_cast<size_t>(vcpus_) / plan.size()];
    switch (plan[i].access) {
      case Access::kRead: s.reads_only.push_back(plan[i].offset); break;
      case Access::kReadThenWrite: s.read_then_write.push_back(plan[i].offset); break;
      case Access::kWrite: s.writes_only.push_back(plan[i].offset); break;
    }
  }
  TouchResult result;
  std::vector<uint64_t> reads(slices.size()), writes(slices.size());
  {
    std::vector<std::jthread> pool;
    for (int v = 0; v < vcpus_; ++v) {
      pool.emplace_back([&, v] {
        Slice& s = slices[static_cast<size_t>(v)];
        auto run = [&](const std::vector<uint64_t>& offsets, VcpuAccess access) -> bool {
          if (offsets.empty()) return true;
          auto touched = state_->guest.run_touch(v, offsets, access, write_tag);
          if (!touched) {
            s.error = touched.error();
            s.failed = true;
            return false;
          }
          if (access != VcpuAccess::kWrite) {
            for (size_t i = 0; i < offsets.size(); ++i) {
              // Checked against the record before this write: the guest reports
              // the qwords it read before its own write.
              verifier.verify_qwords(offsets[i], touched->first_qword[i], touched->last_qword[i]);
            }
            reads[static_cast<size_t>(v)] += offsets.size();
          }
          if (access != VcpuAccess::kRead) {
            for (uint64_t offset : offsets) verifier.record_vcpu_write(offset, write_tag);
            writes[static_cast<size_t>(v)] += offsets.size();
          }
          return true;
        };
        run(s.reads_only, VcpuAccess::kRead) && run(s.read_then_write, VcpuAccess::kReadThenWrite) &&
            run(s.writes_only, VcpuAccess::kWrite);
      });
    }
  }
  for (size_t v = 0; v < slices.size(); ++v) {
    if (slices[v].failed) {
      Error e = slices[v].error;
      e.message = "vCPU " + std::to_string(v) + ": " + e.message;
      return std::unexpected(e);
    }
    result.page_reads += reads[v];
    result.page_writes += writes[v];
  }
  result.pages_touched = plan.size();
  result.elapsed = std::chrono::steady_clock::now() - start;
  result.mismatches = verifier.mismatches() - mismatches_before;
  return result;
}

#else  // built without client/kvm

struct VcpuToucher::State {};

bool VcpuToucher::available() { return false; }

Result<VcpuToucher> VcpuToucher::create(const FirecrackerClient&, int) {
  return fail("this faultline-client was built without client/kvm (no faultline_kvm target)");
}

Result<TouchResult> VcpuToucher::touch(Verifier&, std::span<const PageTouch>, uint64_t) {
  return fail("this faultline-client was built without client/kvm");
}

#endif

VcpuToucher::VcpuToucher(std::unique_ptr<State> state, int vcpus) : state_(std::move(state)), vcpus_(vcpus) {}
VcpuToucher::VcpuToucher(VcpuToucher&&) noexcept = default;
VcpuToucher& VcpuToucher::operator=(VcpuToucher&&) noexcept = default;
VcpuToucher::~VcpuToucher() = default;

}  // namespace faultline::client
