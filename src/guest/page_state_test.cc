#include "guest/page_state.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace faultline {
namespace {

TEST(PageStateTable, UntouchedPagesServeSnapshotAndRemovedOnesServeZero) {
  PageStateTable t(4);
  EXPECT_EQ(t.state(0), PageState::kUntouched);
  EXPECT_FALSE(PageStateTable::serves_zero(t.state(0)));
  EXPECT_TRUE(t.record_install(0, PageState::kUntouched, PageState::kSnapshot, false));
  t.mark_removed(0);
  EXPECT_TRUE(PageStateTable::serves_zero(t.state(0)));
  EXPECT_TRUE(t.record_install(0, PageState::kRemoved, PageState::kZero, true));
  EXPECT_EQ(t.state(0), PageState::kZero);
  EXPECT_TRUE(t.written(0));
  EXPECT_TRUE(PageStateTable::serves_zero(t.state(0)));
}

TEST(PageStateTable, InstallRecordLosesToAConcurrentRemove) {
  PageStateTable t(1);
  t.mark_removed(0);  // REMOVE recorded after the installer looked
  EXPECT_FALSE(t.record_install(0, PageState::kUntouched, PageState::kSnapshot, false));
  EXPECT_EQ(t.state(0), PageState::kRemoved);
}

TEST(PageStateTable, OneBytePerPage) { EXPECT_EQ(PageStateTable::kBytesPerPage, 1u); }

TEST(PageStateTable, ConcurrentUpdatesOfDifferentPagesDoNotInterfere) {
  PageStateTable t(1 << 16);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (uint64_t p = static_cast<uint64_t>(k); p < t.size(); p += 4) {
        t.record_install(p, PageState::kUntouched, PageState::kSnapshot, k % 2 == 0);
        if (p % 3 == 0) t.mark_removed(p);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (uint64_t p = 0; p < t.size(); ++p) {
    EXPECT_EQ(t.state(p), p % 3 == 0 ? PageState::kRemoved : PageState::kSnapshot);
  }
}

}  // namespace
}  // namespace faultline
