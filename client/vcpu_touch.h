// VcpuToucher: touches guest memory from real KVM vCPUs (client/kvm's
// KvmGuest) instead of host threads.
//
// Why: under Firecracker most first touches of guest memory are made by the
// guest, so the fault is raised by the kernel on KVM's behalf (GUP / the
// instruction emulator), not by a VMM thread (DESIGN.md §4). A server must be
// tested with those faults too.
//
// What a vCPU does per page (KvmGuest contract): a read fetches the page's
// first and last qword, checked with Verifier::verify_qwords; a write puts
// (tag, page offset) in the page's first 16 bytes, recorded with
// Verifier::record_vcpu_write.
//
// Built without client/kvm (no faultline_kvm target), available() is false
// and create() fails with a clear error.
//
// Thread safety: touch() may be called from one thread at a time (it drives
// every vCPU from its own thread and joins them). Move-only.
#pragma once

#include <memory>
#include <span>

#include "client/firecracker_client.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "common/error.h"

namespace faultline::client {

class VcpuToucher {
 public:
  // True when this build has client/kvm and /dev/kvm opens.
  static bool available();

  // A VM of `vcpus` vCPUs whose guest memory is the client's regions.
  // REQUIRES: `client` outlives the toucher.
  static Result<VcpuToucher> create(const FirecrackerClient& client, int vcpus);

  VcpuToucher(VcpuToucher&&) noexcept;
  VcpuToucher& operator=(VcpuToucher&&) noexcept;
  ~VcpuToucher();

  int vcpus() const { return vcpus_; }

  // Splits `plan` into one contiguous slice per vCPU and runs the vCPUs
  // concurrently. kReadThenWrite pages are checked before they are written
  // (the guest reports what it read before its own write). The result counts
  // 16 verified bytes per read page.
  Result<TouchResult> touch(Verifier& verifier, std::span<const PageTouch> plan, uint64_t write_tag);

 private:
  struct State;
  VcpuToucher(std::unique_ptr<State> state, int vcpus);

  std::unique_ptr<State> state_;
  int vcpus_ = 0;
};

}  // namespace faultline::client
