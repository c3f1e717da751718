// Verifier: knows what every guest page must hold and checks what the client
// reads against it.
//
// A page starts as "snapshot" (its bytes in the memory file, read with pread
// at the same offset). remove() of it makes it "zero" (DESIGN.md §6.3: a page
// faulted after a REMOVE reads zero). A host write stamps the whole page with
// fill_write_pattern(tag, offset); a vCPU write puts (tag, offset) in its first
// 16 bytes only, over whatever the page held. The Verifier counts pages
// verified, bytes verified and mismatching pages, and keeps a description of
// the first few mismatches.
//
// Thread safety: all methods are safe to call concurrently. Calls about the
// same page are ordered by the caller with the accesses to that page (a page
// must not be verified while another thread writes it); two concurrent record
// calls for one page must record the same thing.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline::client {

struct Mismatch {
  uint64_t page_offset = 0;  // guest offset of the page
  uint64_t byte_offset = 0;  // guest offset of the first differing byte
  std::string description;   // "expected ... got ..."
};

class Verifier {
 public:
  // Opens `memory_path`, whose size must be `guest_size`. `page_size` is the
  // guest page size (the unit of records and checks).
  static Result<std::unique_ptr<Verifier>> open(const std::string& memory_path, uint64_t guest_size,
                                                uint64_t page_size);

  Verifier(const Verifier&) = delete;
  Verifier& operator=(const Verifier&) = delete;

  uint64_t page_size() const { return page_size_; }
  uint64_t guest_size() const { return guest_size_; }

  // State changes. REQUIRE: page_offset is page-aligned and inside guest memory.
  void record_removed(uint64_t page_offset);
  void record_host_write(uint64_t page_offset, uint64_t tag);
  void record_vcpu_write(uint64_t page_offset, uint64_t tag);

  // Compares the page_size bytes at `page` (the guest page itself, so the
  // comparison is the touch) with what the page must hold. Returns true on a
  // match; on a mismatch counts it and describes the first differing byte.
  bool verify_page(uint64_t page_offset, const uint8_t* page);

  // Checks the first and last qword a vCPU read from a page.
  bool verify_qwords(uint64_t page_offset, uint64_t first_qword, uint64_t last_qword);

  // Fills `out` (page_size bytes) with what the page must hold now.
  Status expected_page(uint64_t page_offset, std::span<uint8_t> out) const;

  uint64_t pages_verified() const { return pages_verified_.load(); }
  uint64_t bytes_verified() const { return bytes_verified_.load(); }
  uint64_t mismatches() const { return mismatches_.load(); }
  // The first kMaxDescribed mismatches, in the order they were found.
  std::vector<Mismatch> described_mismatches() const;
  static constexpr size_t kMaxDescribed = 8;

 private:
  enum class Base : uint8_t { kSnapshot, kZero, kHostPattern };
  struct PageRecord {
    std::atomic<uint8_t> base{static_cast<uint8_t>(Base::kSnapshot)};
    std::atomic<uint64_t> pattern_tag{0};  // for kHostPattern
    std::atomic<uint64_t> header_tag{0};   // non-zero: a vCPU wrote (tag, offset) over bytes 0..15
  };

  Verifier(UniqueFd file, uint64_t guest_size, uint64_t page_size);
  PageRecord& record(uint64_t page_offset) const { return records_[page_offset / page_size_]; }
  void report(uint64_t page_offset, uint64_t byte_offset, std::string description);

  UniqueFd file_;
  const uint64_t guest_size_;
  const uint64_t page_size_;
  std::unique_ptr<PageRecord[]> records_;
  std::atomic<uint64_t> pages_verified_{0};
  std::atomic<uint64_t> bytes_verified_{0};
  std::atomic<uint64_t> mismatches_{0};
  mutable std::mutex described_mutex_;
  std::vector<Mismatch> described_;  // GUARDED_BY(described_mutex_)
};

}  // namespace faultline::client
