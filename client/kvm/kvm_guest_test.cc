// Tests for KvmGuest: the bytes a vCPU reads and writes are the host's bytes
// at the right offsets, across regions, vCPUs, huge pages and userfaultfd.
#include "client/kvm/kvm_guest.h"
#include "client/huge_page_reservation.h"

#include <gtest/gtest.h>
#include <linux/mman.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>

#include "client/kvm/pattern_fault_server.h"
#include "common/mapping.h"
#include "tests/capability.h"

namespace faultline::client {
namespace {

using testing::expected_first;
using testing::expected_last;
using testing::fill_pattern;
using testing::PatternFaultServer;

constexpr uint64_t k4K = 4096;
constexpr uint64_t k2M = 2ull << 20;

#define REQUIRE_KVM() FAULTLINE_REQUIRE_CAPABILITY("kvm", KvmGuest::available(), "no usable /dev/kvm")

Mapping map_anonymous(uint64_t size) {
  auto m = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  EXPECT_TRUE(m.has_value()) << m.error().describe();
  return m ? std::move(*m) : Mapping();
}

// Declares `name` as a KvmGuest built from the remaining arguments, or fails the test.
#define CREATE_GUEST(name, ...)                                   \
  auto name##_result = KvmGuest::create(__VA_ARGS__);             \
  ASSERT_TRUE(name##_result) << name##_result.error().describe(); \
  KvmGuest& name = *name##_result

std::vector<uint64_t> page_offsets(uint64_t first, uint64_t count, uint64_t stride = k4K) {
  std::vector<uint64_t> offsets(count);
  for (uint64_t i = 0; i < count; ++i) offsets[i] = first + i * stride;
  return offsets;
}

uint64_t load_qword(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void expect_reads_match_pattern(const VcpuTouchResult& r, const std::vector<uint64_t>& offsets,
                                uint64_t page_size = k4K) {
  ASSERT_EQ(r.pages_touched, offsets.size());
  ASSERT_EQ(r.first_qword.size(), offsets.size());
  ASSERT_EQ(r.last_qword.size(), offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) {
    ASSERT_EQ(r.first_qword[i], expected_first(offsets[i])) << "offset " << offsets[i];
    ASSERT_EQ(r.last_qword[i], expected_last(offsets[i], page_size)) << "offset " << offsets[i];
  }
}

TEST(KvmGuest, VcpuReadsReturnHostBytesForPagesInRandomOrder) {
  REQUIRE_KVM();
  constexpr uint64_t kPages = 256;
  Mapping mem = map_anonymous(kPages * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);

  std::vector<uint64_t> offsets = page_offsets(0, kPages);
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(42));
  auto r = guest.run_touch(0, offsets, VcpuAccess::kRead, 0);
  ASSERT_TRUE(r) << r.error().describe();
  expect_reads_match_pattern(*r, offsets);
}

TEST(KvmGuest, ReadOnlyTouchLeavesMemoryUnchanged) {
  REQUIRE_KVM();
  Mapping mem = map_anonymous(16 * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);
  auto r = guest.run_touch(0, page_offsets(0, 16), VcpuAccess::kRead, 0x1111);
  ASSERT_TRUE(r) << r.error().describe();
  std::vector<uint8_t> expected(mem.size());
  fill_pattern(expected.data(), 0, expected.size());
  EXPECT_EQ(std::memcmp(mem.bytes(), expected.data(), expected.size()), 0);
}

TEST(KvmGuest, VcpuWritesTagAndOffsetVisibleToHost) {
  REQUIRE_KVM();
  constexpr uint64_t kPages = 64;
  Mapping mem = map_anonymous(kPages * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);

  std::vector<uint64_t> offsets = page_offsets(0, kPages / 2, 2 * k4K);  // even pages only
  constexpr uint64_t kTag = 0xfeedfacecafebeefull;
  auto r = guest.run_touch(0, offsets, VcpuAccess::kWrite, kTag);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->pages_touched, offsets.size());
  EXPECT_TRUE(r->first_qword.empty());

  for (uint64_t page = 0; page < kPages; ++page) {
    const uint8_t* p = mem.bytes() + page * k4K;
    if (page % 2 == 0) {
      EXPECT_EQ(load_qword(p), kTag) << "page " << page;
      EXPECT_EQ(load_qword(p + 8), page * k4K) << "page " << page;
      // Only the first 16 bytes are written.
      EXPECT_EQ(load_qword(p + 16), testing::pattern_qword(page * k4K, 2)) << "page " << page;
    } else {
      EXPECT_EQ(load_qword(p), expected_first(page * k4K)) << "untouched page " << page;
    }
  }
}

TEST(KvmGuest, ReadThenWriteReportsBytesFromBeforeTheWrite) {
  REQUIRE_KVM();
  Mapping mem = map_anonymous(8 * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);
  std::vector<uint64_t> offsets = {5 * k4K, 0, 7 * k4K};
  auto r = guest.run_touch(0, offsets, VcpuAccess::kReadThenWrite, 77);
  ASSERT_TRUE(r) << r.error().describe();
  expect_reads_match_pattern(*r, offsets);
  for (uint64_t off : offsets) {
    EXPECT_EQ(load_qword(mem.bytes() + off), 77u);
    EXPECT_EQ(load_qword(mem.bytes() + off + 8), off);
  }
}

TEST(KvmGuest, PlanLongerThanOneBatchIsTouchedInOrder) {
  REQUIRE_KVM();
  // 2048 entries fit in one KVM_RUN batch; 2500 touches need two, and the
  // same page listed twice must read the first touch's write the second time.
  constexpr uint64_t kPages = 1250;
  Mapping mem = map_anonymous(kPages * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);
  std::vector<uint64_t> offsets = page_offsets(0, kPages);
  std::vector<uint64_t> twice = offsets;
  twice.insert(twice.end(), offsets.begin(), offsets.end());
  auto r = guest.run_touch(0, twice, VcpuAccess::kReadThenWrite, 9);
  ASSERT_TRUE(r) << r.error().describe();
  ASSERT_EQ(r->pages_touched, twice.size());
  for (size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(r->first_qword[i], expected_first(offsets[i]));
    ASSERT_EQ(r->first_qword[kPages + i], 9u) << "second touch of offset " << offsets[i];
  }
}

TEST(KvmGuest, TwoVcpusInTwoThreadsTouchDisjointPages) {
  REQUIRE_KVM();
  constexpr uint64_t kPages = 256;
  Mapping mem = map_anonymous(kPages * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 2, k4K);

  std::vector<uint64_t> plans[2];
  for (uint64_t page = 0; page < kPages; ++page) plans[page % 2].push_back(page * k4K);
  std::shuffle(plans[1].begin(), plans[1].end(), std::mt19937_64(7));
  Result<VcpuTouchResult> results[2];
  std::thread threads[2];
  for (int v = 0; v < 2; ++v) {
    threads[v] = std::thread([&, v] {
      results[v] = guest.run_touch(v, plans[v], VcpuAccess::kReadThenWrite, 100 + v);
    });
  }
  for (auto& t : threads) t.join();
  for (int v = 0; v < 2; ++v) {
    ASSERT_TRUE(results[v]) << results[v].error().describe();
    expect_reads_match_pattern(*results[v], plans[v]);
    for (uint64_t off : plans[v]) {
      ASSERT_EQ(load_qword(mem.bytes() + off), uint64_t(100 + v)) << "offset " << off;
      ASSERT_EQ(load_qword(mem.bytes() + off + 8), off);
    }
  }
}

TEST(KvmGuest, OffsetsMapAcrossTheBoundaryOfTwoRegions) {
  REQUIRE_KVM();
  // The first region is not a multiple of 2 MiB, so the second one's GPA
  // leaves a gap that offsets must skip.
  const uint64_t size_a = k2M / 2 + 5 * k4K;
  const uint64_t size_b = k2M + 3 * k4K;
  Mapping a = map_anonymous(size_a);
  Mapping b = map_anonymous(size_b);
  fill_pattern(a.bytes(), 0, size_a);
  fill_pattern(b.bytes(), size_a, size_b);
  CREATE_GUEST(guest, {{a.bytes(), size_a}, {b.bytes(), size_b}}, 1, k4K);
  EXPECT_EQ(guest.guest_memory_size(), size_a + size_b);

  std::vector<uint64_t> offsets = page_offsets(size_a - 4 * k4K, 8);  // 4 pages each side
  offsets.push_back(0);
  offsets.push_back(size_a + size_b - k4K);  // last page of the guest
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(3));
  auto r = guest.run_touch(0, offsets, VcpuAccess::kReadThenWrite, 5);
  ASSERT_TRUE(r) << r.error().describe();
  expect_reads_match_pattern(*r, offsets);
  for (uint64_t off : offsets) {
    const uint8_t* host = off < size_a ? a.bytes() + off : b.bytes() + (off - size_a);
    EXPECT_EQ(load_qword(host), 5u) << "offset " << off;
    EXPECT_EQ(load_qword(host + 8), off) << "offset " << off;
  }
}



TEST(KvmGuest, HugetlbRegionWithTwoMiBPagesReadsAndWritesTheRightBytes) {
  REQUIRE_KVM();
  HugePageReservation reservation(2);
  FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation.ok(), reservation.reason());
  auto mem = Mapping::map(2 * k2M, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB);
  FAULTLINE_REQUIRE_CAPABILITY("hugepages", mem.has_value(), "2 MiB hugetlb mmap failed: " << (mem ? "" : mem.error().describe()));
  fill_pattern(mem->bytes(), 0, mem->size());
  {
    CREATE_GUEST(guest, {{mem->bytes(), mem->size()}}, 1, k2M);
    std::vector<uint64_t> offsets = {k2M + 8 * k4K, 0, k4K, k2M - k4K, k2M};
    auto r = guest.run_touch(0, offsets, VcpuAccess::kReadThenWrite, 0x2222);
    ASSERT_TRUE(r) << r.error().describe();
    expect_reads_match_pattern(*r, offsets, k2M);
    for (uint64_t off : offsets) {
      EXPECT_EQ(load_qword(mem->bytes() + off), 0x2222u);
      EXPECT_EQ(load_qword(mem->bytes() + off + 8), off);
    }
  }
  mem->reset();  // before the reservation is given back
}

TEST(KvmGuest, OffsetBeyondTheGuestIsAnErrorAndTouchesNothing) {
  REQUIRE_KVM();
  Mapping mem = map_anonymous(4 * k4K);
  fill_pattern(mem.bytes(), 0, mem.size());
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);

  std::vector<uint64_t> beyond = {0, 4 * k4K};
  auto r = guest.run_touch(0, beyond, VcpuAccess::kWrite, 1);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("beyond"), std::string::npos) << r.error().describe();
  EXPECT_EQ(load_qword(mem.bytes()), expected_first(0)) << "valid page before the bad one was written";

  std::vector<uint64_t> far = {1ull << 40};
  EXPECT_FALSE(guest.run_touch(0, far, VcpuAccess::kRead, 0));
  std::vector<uint64_t> unaligned = {8};
  EXPECT_FALSE(guest.run_touch(0, unaligned, VcpuAccess::kRead, 0));
  EXPECT_FALSE(guest.run_touch(1, beyond, VcpuAccess::kRead, 0)) << "vCPU 1 does not exist";

  // The vCPU is still usable.
  std::vector<uint64_t> good = {3 * k4K};
  auto ok = guest.run_touch(0, good, VcpuAccess::kRead, 0);
  ASSERT_TRUE(ok) << ok.error().describe();
  expect_reads_match_pattern(*ok, good);
}

TEST(KvmGuest, LastPageOfANearlyThreeGiBGuestIsReachable) {
  REQUIRE_KVM();
  // Only the touched pages get host memory (MAP_NORESERVE, anonymous).
  const uint64_t size = 3ull << 30;
  Mapping mem = map_anonymous(size);
  fill_pattern(mem.bytes() + size - k4K, size - k4K, k4K);
  fill_pattern(mem.bytes(), 0, k4K);
  CREATE_GUEST(guest, {{mem.bytes(), size}}, 1, k4K);
  std::vector<uint64_t> offsets = {size - k4K, 0};
  auto r = guest.run_touch(0, offsets, VcpuAccess::kRead, 0);
  ASSERT_TRUE(r) << r.error().describe();
  expect_reads_match_pattern(*r, offsets);
}

TEST(KvmGuest, GuestBeyondFourGiBIsRefusedWithAClearError) {
  REQUIRE_KVM();
  const uint64_t size = 4ull << 30;
  Mapping mem = map_anonymous(size);
  auto guest = KvmGuest::create({{mem.bytes(), size}}, 1, k4K);
  ASSERT_FALSE(guest);
  EXPECT_NE(guest.error().message.find("32-bit protected mode"), std::string::npos)
      << guest.error().describe();
}

TEST(KvmGuest, MisalignedRegionsAreRefused) {
  REQUIRE_KVM();
  Mapping mem = map_anonymous(4 * k4K);
  EXPECT_FALSE(KvmGuest::create({{mem.bytes() + 8, 2 * k4K}}, 1, k4K));
  EXPECT_FALSE(KvmGuest::create({{mem.bytes(), k4K + 8}}, 1, k4K));
  EXPECT_FALSE(KvmGuest::create({{mem.bytes(), 4 * k4K}}, 1, k2M)) << "size not a multiple of 2 MiB";
  EXPECT_FALSE(KvmGuest::create({{mem.bytes(), 4 * k4K}}, 0, k4K));
  EXPECT_FALSE(KvmGuest::create({}, 1, k4K));
}

TEST(KvmGuest, VcpuFaultsOnUffdRegisteredMemoryAreServedThroughTheUffd) {
  REQUIRE_KVM();
  constexpr uint64_t kPages = 256;
  Mapping mem = map_anonymous(kPages * k4K);
  PatternFaultServer server;
  auto started = server.start(mem.bytes(), mem.size());
  ASSERT_TRUE(started) << started.error().describe();
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);

  std::vector<uint64_t> offsets = page_offsets(0, kPages);
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(11));
  auto r = guest.run_touch(0, offsets, VcpuAccess::kReadThenWrite, 0xabc);
  server.stop();
  ASSERT_TRUE(r) << r.error().describe();
  ASSERT_EQ(server.error(), "");
  // Every page was missing, so the only way the guest could read the pattern
  // is through a fault the uffd delivered and the server answered.
  expect_reads_match_pattern(*r, offsets);
  EXPECT_EQ(server.pages_served().size(), kPages);
  for (uint64_t off : offsets) {
    ASSERT_EQ(load_qword(mem.bytes() + off), 0xabcu);
    ASSERT_EQ(load_qword(mem.bytes() + off + 8), off);
    ASSERT_EQ(load_qword(mem.bytes() + off + 16), testing::pattern_qword(off, 2));
  }
}

TEST(KvmGuest, GuestThatCannotReachItsMemoryIsAnErrorAndTheVcpuIsRetired) {
  REQUIRE_KVM();
  // Breaks the REQUIRES on purpose: with the region's host mapping gone, KVM
  // cannot resolve the guest's access. Whether it reports that as a failed
  // KVM_RUN (EFAULT) or as an exit, run_touch must return an Error.
  Mapping mem = map_anonymous(4 * k4K);
  CREATE_GUEST(guest, {{mem.bytes(), mem.size()}}, 1, k4K);
  mem.reset();
  std::vector<uint64_t> offsets = {k4K};
  auto r = guest.run_touch(0, offsets, VcpuAccess::kRead, 0);
  ASSERT_FALSE(r);
  // Today KVM reports a GPA whose host page is gone as an MMIO exit.
  EXPECT_NE(r.error().message.find("RIP"), std::string::npos) << r.error().describe();
  auto again = guest.run_touch(0, offsets, VcpuAccess::kRead, 0);
  ASSERT_FALSE(again);
  EXPECT_NE(again.error().message.find("cannot be run again"), std::string::npos)
      << again.error().describe();
}

}  // namespace
}  // namespace faultline::client
