#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>

#include "snapshot/working_set.h"
#include "snapshot/zero_index.h"

namespace faultline {
namespace {

TEST(WorkingSetFile, RoundTripKeepsFirstTouchOrder) {
  WorkingSet s{4096, 1 << 20, {8192, 0, 4096 * 200, 4096}};
  auto back = parse_working_set(serialize_working_set(s), 1 << 20);
  ASSERT_TRUE(back) << back.error().describe();
  EXPECT_EQ(back->offsets, s.offsets);
  EXPECT_EQ(back->page_size, 4096u);
}

TEST(WorkingSetFile, EveryDamageIsAClearError) {
  const WorkingSet s{4096, 1 << 20, {8192, 0, 4096}};
  const std::string good = serialize_working_set(s);
  struct Case {
    std::string bytes;
    uint64_t memory;
    const char* needle;
  };
  std::string flipped = good;
  flipped[40] ^= 1;  // inside an offset: checksum catches it
  std::string bad_version = good;
  bad_version[8] = 9;
  std::vector<Case> cases = {
      {good.substr(0, 20), 1 << 20, "truncated"},
      {good.substr(0, good.size() - 9), 1 << 20, "truncated"},
      {good + "x", 1 << 20, "trailing"},
      {"XXXXXXXX" + good.substr(8), 1 << 20, "bad magic"},
      {bad_version, 1 << 20, "version 9"},
      {flipped, 1 << 20, "checksum"},
      {good, 2 << 20, "recorded on a"},
  };
  for (const Case& c : cases) {
    auto r = parse_working_set(c.bytes, c.memory);
    ASSERT_FALSE(r) << c.needle;
    EXPECT_NE(r.error().message.find(c.needle), std::string::npos) << r.error().message;
  }
  // A well-formed file whose entries are not pages of the snapshot.
  auto misaligned = parse_working_set(serialize_working_set({4096, 1 << 20, {100}}), 1 << 20);
  ASSERT_FALSE(misaligned);
  EXPECT_NE(misaligned.error().message.find("not a page"), std::string::npos);
  auto beyond = parse_working_set(serialize_working_set({4096, 1 << 20, {1 << 20}}), 1 << 20);
  ASSERT_FALSE(beyond);
}

TEST(WorkingSetFile, WriteThenReadFromDisk) {
  char path[] = "/tmp/faultline-ws-XXXXXX";
  int fd = ::mkstemp(path);
  ::close(fd);
  WorkingSet s{4096, 1 << 20, {4096, 8192}};
  ASSERT_TRUE(write_working_set(path, s));
  auto r = read_working_set(path, 1 << 20);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->offsets, s.offsets);
  auto missing = read_working_set(std::string(path) + ".nope", 1 << 20);
  EXPECT_FALSE(missing);
  std::remove(path);
}

class ZeroIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int fd = ::mkstemp(path_);
    ::close(fd);
    std::vector<uint8_t> data(64 * 4096, 0);
    for (size_t p = 0; p < 64; ++p) {
      if (p % 3 != 0) data[p * 4096 + (p * 37) % 4096] = 1;  // pages 0, 3, 6, ... stay zero
    }
    std::ofstream(path_, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), data.size());
  }
  void TearDown() override {
    std::remove(path_);
    std::remove((std::string(path_) + ".zeroidx").c_str());
  }
  char path_[64] = "/tmp/faultline-zi-XXXXXX";
};

TEST_F(ZeroIndexTest, FindsExactlyTheZeroPagesAndSurvivesASaveAndLoad) {
  auto src = MemoryFile::open(path_);
  ASSERT_TRUE(src);
  auto id = identify_file(path_);
  ASSERT_TRUE(id);
  auto z = ZeroIndex::build(**src, *id);
  ASSERT_TRUE(z) << z.error().describe();
  EXPECT_EQ(z->zero_pages(), 22u);  // 0, 3, ..., 63
  for (uint64_t p = 0; p < 64; ++p) EXPECT_EQ(z->is_zero(p * 4096, 4096), p % 3 == 0) << p;
  EXPECT_FALSE(z->is_zero(0, 2 * 4096)) << "a range is zero only if every page is";
  const std::string idx = std::string(path_) + ".zeroidx";
  ASSERT_TRUE(z->save(idx));
  auto loaded = ZeroIndex::load(idx, *id);
  ASSERT_TRUE(loaded) << loaded.error().describe();
  EXPECT_EQ(loaded->zero_pages(), 22u);
  EXPECT_TRUE(loaded->is_zero(3 * 4096, 4096));
}

TEST_F(ZeroIndexTest, StaleOrDamagedIndexIsRejected) {
  auto src = MemoryFile::open(path_);
  auto id = identify_file(path_);
  auto z = ZeroIndex::build(**src, *id);
  const std::string idx = std::string(path_) + ".zeroidx";
  ASSERT_TRUE(z->save(idx));
  FileIdentity changed = *id;
  changed.mtime_ns += 1;
  auto stale = ZeroIndex::load(idx, changed);
  ASSERT_FALSE(stale);
  EXPECT_NE(stale.error().message.find("stale"), std::string::npos);
  {
    std::fstream f(idx, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(41);
    f.put('\xff');
  }
  auto damaged = ZeroIndex::load(idx, *id);
  ASSERT_FALSE(damaged);
  EXPECT_NE(damaged.error().message.find("checksum"), std::string::npos);
}

}  // namespace
}  // namespace faultline
