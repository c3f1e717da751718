// 2 MiB hugetlbfs guest memory served through faultline: installs copy whole
// 2 MiB pages (ZEROPAGE does not exist on hugetlbfs, so zeros are a copied
// zero buffer). These tests reserve huge pages and give them back.
#include "client/firecracker_client.h"
#include "client/restore_scenario.h"
#include "client/touch.h"
#include "client/vcpu_touch.h"
#include "client/verifier.h"
#include "harness.h"
#include "kernel/process.h"
#include "kernel/uffd_abi.h"

namespace faultline::testing {
namespace {

class HugePages : public ::testing::Test {
 protected:
  void SetUp() override { FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation_.ok(), reservation_.reason()); }
  HugePageReservation reservation_{160};  // 320 MiB: two 128 MiB guests, with room
};

client::RestoreOptions huge_options(const ServerHarness& h) {
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.huge_pages = true;
  return o;
}

TEST_F(HugePages, FirstTouchReadsAndWritesReturnSnapshotBytes) {
  ServerHarness::Options ho;
  ho.memory_bytes = 128 * kMiB;
  ServerHarness h(ho);
  client::RestoreOptions o = huge_options(h);
  o.order = client::PageOrder::kRandom;
  o.remove_fraction = 0.1;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  EXPECT_EQ(r->page_size, 2 * kMiB);
  ASSERT_TRUE(h.wait_ended(1));
  auto s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.counters.pages_snapshot, 64u);
  EXPECT_EQ(s.counters.bytes_installed % (2 * kMiB), 0u);
}

TEST_F(HugePages, RemoveThenTouchReadsZeroOnWholeHugePages) {
  ServerHarness::Options ho;
  ho.memory_bytes = 32 * kMiB;
  ServerHarness h(ho);
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {32 * kMiB}, .huge_pages = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  std::vector<uint64_t> pages{0, 2 * kMiB, 4 * kMiB, 6 * kMiB};
  ASSERT_TRUE(client::touch_pages(*c, **v, pages, client::Access::kRead));
  ASSERT_TRUE(c->remove(2 * kMiB, 4 * kMiB));
  (*v)->record_removed(2 * kMiB);
  (*v)->record_removed(4 * kMiB);
  auto r = client::touch_pages(*c, **v, pages, client::Access::kRead);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
  const uint8_t* p = c->guest_ptr(2 * kMiB);
  for (uint64_t b = 0; b < 4 * kMiB; b += 512) ASSERT_EQ(p[b], 0);
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_EQ(h.server().finished_sessions().at(0).counters.pages_zero, 2u);
}

TEST_F(HugePages, ManyThreadsOnTheSameHugePages) {
  ServerHarness::Options ho;
  ho.memory_bytes = 32 * kMiB;
  ServerHarness h(ho);
  auto c = client::FirecrackerClient::create({.version = {1, 16}, .region_sizes = {32 * kMiB}, .huge_pages = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  std::vector<uint64_t> pages{0, 6 * kMiB, 30 * kMiB};
  auto r = client::touch_pages(*c, **v, pages, client::Access::kRead,
                               {.threads = 8, .sharing = client::ThreadSharing::kIdentical});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_EQ(r->page_reads, 24u);
}

TEST_F(HugePages, KvmVcpusTouchHugePages) {
  FAULTLINE_REQUIRE_CAPABILITY("kvm", client::VcpuToucher::available(), "no usable /dev/kvm");
  ServerHarness::Options ho;
  ho.memory_bytes = 64 * kMiB;
  ServerHarness h(ho);
  client::RestoreOptions o = huge_options(h);
  o.threads = 0;
  o.kvm_vcpus = 2;
  auto r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_GT(r->vcpu_pages, 0u);
}

TEST_F(HugePages, WpAsyncHugePagesAreProtectedOnRead) {
  ServerHarness::Options ho;
  ho.memory_bytes = 16 * kMiB;
  ServerHarness h(ho);
  auto c = client::FirecrackerClient::create(
      {.version = {1, 14}, .region_sizes = {16 * kMiB}, .huge_pages = true, .wp_async = true});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{0}, client::Access::kRead));
  ASSERT_TRUE(client::touch_pages(*c, **v, std::vector<uint64_t>{2 * kMiB}, client::Access::kWrite));
  const uint64_t base = reinterpret_cast<uint64_t>(c->guest_ptr(0));
  auto pm = kernel::read_pagemap(::getpid(), base, 1024);
  ASSERT_TRUE(pm);
  EXPECT_TRUE((*pm)[0] & kPagemapPresent);
  EXPECT_TRUE((*pm)[0] & kPagemapUffdWp);
  EXPECT_TRUE((*pm)[512] & kPagemapPresent);
  EXPECT_FALSE((*pm)[512] & kPagemapUffdWp);
  c->close_socket();
  ASSERT_TRUE(h.wait_ended(1));
}

}  // namespace
}  // namespace faultline::testing
