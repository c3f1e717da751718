// run_restore(): one whole Firecracker-like restore against a memory server,
// checked byte for byte. It is what `faultline-client restore` runs, kept in
// the library so tests can run it in-process against a server of their own.
//
// Phases, in order:
//   1. map guest memory, create and register the uffd, connect and send the
//      handshake (FirecrackerClient);
//   2. first touch: `touch_fraction` of the pages, `write_fraction` of those
//      read-then-written, from host threads and/or KVM vCPUs (with both, every
//      other page of the plan goes to the vCPUs) — every read checked against
//      the memory file;
//   3. balloon: madvise(MADV_DONTNEED) of random ranges (some unaligned)
//      covering about `remove_fraction` of guest memory;
//   4. touch every removed page again (they must read zero; some are written);
//   5. a final host read of every page touched, checked against what the
//      client knows it must hold (snapshot, zero or its own writes).
//
// Thread-safe (no shared state); each call owns its client and threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "client/handshake.h"
#include "client/touch.h"
#include "client/version.h"
#include "common/error.h"

namespace faultline::client {

struct RestoreOptions {
  std::string socket_path;
  std::string memory_path;
  FirecrackerVersion version{1, 14};
  // Empty: one region the size of the memory file. Otherwise the sizes must
  // add up to the memory file size.
  std::vector<uint64_t> region_sizes;
  bool huge_pages = false;
  bool wp_async = false;
  int threads = 2;     // host threads; may be 0 when kvm_vcpus > 0
  int kvm_vcpus = 0;   // 0: no KVM
  ThreadSharing sharing = ThreadSharing::kDisjoint;
  PageOrder order = PageOrder::kSequential;
  double touch_fraction = 1.0;
  double write_fraction = 0.25;
  double remove_fraction = 0.05;
  uint64_t seed = 1;
  SendPlan send_plan;
};

struct RestoreReport {
  uint64_t guest_size = 0;
  uint64_t page_size = 0;
  size_t regions = 0;
  uint64_t pages_touched = 0;   // distinct pages touched in phase 2 plus removed pages retouched
  uint64_t vcpu_pages = 0;      // of those, touched by vCPUs
  uint64_t page_writes = 0;
  uint64_t pages_removed = 0;   // distinct whole pages madvised away
  uint64_t missing_faults = 0;  // first touches of non-present pages, as the client infers them
  uint64_t pages_verified = 0;
  uint64_t bytes_verified = 0;
  uint64_t mismatches = 0;
  std::vector<std::string> mismatch_descriptions;  // the first few
  double elapsed_seconds = 0;  // connect to end of verification
  double touch_seconds = 0;    // phases 2 and 4
  double faults_per_second() const { return touch_seconds > 0 ? missing_faults / touch_seconds : 0; }

  std::string to_text() const;
  std::string to_json() const;  // one compact JSON object
};

// Runs the scenario. An Error means the restore could not be carried out (no
// server, bad options, a failing syscall); data mismatches are not Errors but
// counted in the report.
Result<RestoreReport> run_restore(const RestoreOptions& options);

}  // namespace faultline::client
