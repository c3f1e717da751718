#include "client/verifier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "client/test_memory_file.h"

namespace faultline::client {

namespace {

// One expected-page buffer per thread: verification runs on every touch and
// must not allocate per page.
std::span<uint8_t> scratch_page(uint64_t page_size) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < page_size) buffer.resize(page_size);
  return {buffer.data(), page_size};
}

std::string hex(uint64_t v) {
  char text[32];
  std::snprintf(text, sizeof text, "%#" PRIx64, v);
  return text;
}

}  // namespace

Result<std::unique_ptr<Verifier>> Verifier::open(const std::string& memory_path, uint64_t guest_size,
                                                 uint64_t page_size) {
  UniqueFd file(::open(memory_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!file) return fail_errno("cannot open memory file " + memory_path);
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) return fail_errno("cannot stat memory file " + memory_path);
  if (static_cast<uint64_t>(st.st_size) != guest_size) {
    return fail("memory file " + memory_path + " holds " + std::to_string(st.st_size) +
                " bytes but guest memory is " + std::to_string(guest_size));
  }
  if (page_size == 0 || guest_size % page_size != 0) {
    return fail("guest size is not a multiple of the page size");
  }
  return std::unique_ptr<Verifier>(new Verifier(std::move(file), guest_size, page_size));
}

Verifier::Verifier(UniqueFd file, uint64_t guest_size, uint64_t page_size)
    : file_(std::move(file)),
      guest_size_(guest_size),
      page_size_(page_size),
      records_(new PageRecord[guest_size / page_size]) {}

void Verifier::record_removed(uint64_t page_offset) {
  PageRecord& r = record(page_offset);
  r.header_tag.store(0);
  r.base.store(static_cast<uint8_t>(Base::kZero));
}

void Verifier::record_host_write(uint64_t page_offset, uint64_t tag) {
  PageRecord& r = record(page_offset);
  r.pattern_tag.store(tag);
  r.header_tag.store(0);
  r.base.store(static_cast<uint8_t>(Base::kHostPattern));
}

void Verifier::record_vcpu_write(uint64_t page_offset, uint64_t tag) {
  // The rest of the page keeps whatever it held: record only the header.
  record(page_offset).header_tag.store(tag);
}

Status Verifier::expected_page(uint64_t page_offset, std::span<uint8_t> out) const {
  const PageRecord& r = record(page_offset);
  switch (static_cast<Base>(r.base.load())) {
    case Base::kSnapshot:
      for (uint64_t done = 0; done < page_size_;) {
        ssize_t n = ::pread(file_.get(), out.data() + done, page_size_ - done,
                            static_cast<off_t>(page_offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail_errno("pread of the memory file at " + std::to_string(page_offset) + " failed");
        if (n == 0) return fail("memory file ends before offset " + std::to_string(page_offset + done));
        done += static_cast<uint64_t>(n);
      }
      break;
    case Base::kZero:
      std::memset(out.data(), 0, page_size_);
      break;
    case Base::kHostPattern:
      fill_write_pattern(r.pattern_tag.load(), page_offset, out.first(page_size_));
      break;
  }
  if (uint64_t tag = r.header_tag.load(); tag != 0) {
    // What a vCPU write leaves in the first 16 bytes (client/kvm contract).
    std::memcpy(out.data(), &tag, 8);
    std::memcpy(out.data() + 8, &page_offset, 8);
  }
  return {};
}

static const char* base_name(uint8_t base, uint64_t header_tag) {
  static const char* const kNames[] = {"snapshot", "zero (removed)", "host-written pattern"};
  static const char* const kTagged[] = {"snapshot + vCPU tag", "zero + vCPU tag", "host pattern + vCPU tag"};
  return header_tag != 0 ? kTagged[base] : kNames[base];
}

bool Verifier::verify_page(uint64_t page_offset, const uint8_t* page) {
  std::span<uint8_t> expected = scratch_page(page_size_);
  if (auto s = expected_page(page_offset, expected); !s) {
    report(page_offset, page_offset, "cannot compute expected contents: " + s.error().describe());
    return false;
  }
  pages_verified_.fetch_add(1, std::memory_order_relaxed);
  bytes_verified_.fetch_add(page_size_, std::memory_order_relaxed);
  if (std::memcmp(expected.data(), page, page_size_) == 0) return true;
  uint64_t at = 0;
  while (at < page_size_ && expected[at] == page[at]) ++at;
  const PageRecord& r = record(page_offset);
  report(page_offset, page_offset + at,
         "page " + hex(page_offset) + " (" + base_name(r.base.load(), r.header_tag.load()) + "): byte " +
             hex(page_offset + at) + " expected " + hex(expected[at]) + " got " +
             hex(at < page_size_ ? page[at] : 0));
  return false;
}

bool Verifier::verify_qwords(uint64_t page_offset, uint64_t first_qword, uint64_t last_qword) {
  std::span<uint8_t> expected = scratch_page(page_size_);
  if (auto s = expected_page(page_offset, expected); !s) {
    report(page_offset, page_offset, "cannot compute expected contents: " + s.error().describe());
    return false;
  }
  pages_verified_.fetch_add(1, std::memory_order_relaxed);
  bytes_verified_.fetch_add(16, std::memory_order_relaxed);
  uint64_t want_first = 0, want_last = 0;
  std::memcpy(&want_first, expected.data(), 8);
  std::memcpy(&want_last, expected.data() + page_size_ - 8, 8);
  if (want_first == first_qword && want_last == last_qword) return true;
  const PageRecord& r = record(page_offset);
  const bool first_bad = want_first != first_qword;
  const uint64_t at = first_bad ? page_offset : page_offset + page_size_ - 8;
  report(page_offset, at,
         "page " + hex(page_offset) + " (" + base_name(r.base.load(), r.header_tag.load()) + "), read by a vCPU: " +
             (first_bad ? "first" : "last") + " qword expected " + hex(first_bad ? want_first : want_last) +
             " got " + hex(first_bad ? first_qword : last_qword));
  return false;
}

void Verifier::report(uint64_t page_offset, uint64_t byte_offset, std::string description) {
  mismatches_.fetch_add(1);
  std::lock_guard lock(described_mutex_);
  if (described_.size() < kMaxDescribed) {
    described_.push_back(Mismatch{page_offset, byte_offset, std::move(description)});
  }
}

std::vector<Mismatch> Verifier::described_mismatches() const {
  std::lock_guard lock(described_mutex_);
  return described_;
}

}  // namespace faultline::client
