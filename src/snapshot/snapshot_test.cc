#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sys/stat.h>
#include <fcntl.h>
#include <zlib.h>

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
  // Overwrites page `page` of the file with `byte` (0: zeros).
  void write_page(uint64_t page, uint8_t byte) {
    std::fstream f(path_, std::ios::binary | std::ios::in | std::ios::out);
    const std::string bytes(4096, static_cast<char>(byte));
    f.seekp(static_cast<std::streamoff>(page * 4096));
    f.write(bytes.data(), bytes.size());
  }
  ZeroIndex build() {
    auto src = MemoryFile::open(path_);
    EXPECT_TRUE(src);
    auto id = (*src)->identity();
    EXPECT_TRUE(id);
    auto z = ZeroIndex::build(**src, *id);
    EXPECT_TRUE(z) << z.error().describe();
    return std::move(*z);
  }
  char path_[64] = "/tmp/faultline-zi-XXXXXX";
};

TEST_F(ZeroIndexTest, FindsExactlyTheZeroPagesAndSurvivesASaveAndLoad) {
  auto src = MemoryFile::open(path_);
  ASSERT_TRUE(src);
  auto id = (*src)->identity();
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
  EXPECT_EQ(loaded->serialize(), z->serialize());
}

TEST_F(ZeroIndexTest, IdentityComesFromTheOpenFileNotThePath) {
  auto src = MemoryFile::open(path_);
  auto before = (*src)->identity();
  ASSERT_TRUE(before);
  // Another file renamed over the path: the open file keeps its identity.
  const std::string other = std::string(path_) + ".other";
  std::ofstream(other, std::ios::binary) << std::string(4096, 'x');
  ASSERT_EQ(::rename(other.c_str(), path_), 0);
  auto after = (*src)->identity();
  ASSERT_TRUE(after);
  // Same file (losing its name moved only its ctime: the link count changed).
  EXPECT_EQ(after->device, before->device);
  EXPECT_EQ(after->inode, before->inode);
  EXPECT_EQ(after->size, before->size);
  EXPECT_EQ(after->mtime_ns, before->mtime_ns);
  struct stat st {};
  ASSERT_EQ(::stat(path_, &st), 0);
  EXPECT_NE(static_cast<uint64_t>(st.st_ino), before->inode);
}

TEST_F(ZeroIndexTest, AnIndexForAnyOtherIdentityIsStale) {
  const ZeroIndex z = build();
  const std::string bytes = z.serialize();
  const FileIdentity id = z.identity();
  std::vector<std::pair<const char*, FileIdentity>> others;
  for (const char* field : {"device", "inode", "size", "mtime_ns", "ctime_ns"}) {
    FileIdentity changed = id;
    const std::string f = field;
    (f == "device" ? changed.device : f == "inode" ? changed.inode : f == "size" ? changed.size
                                                    : f == "mtime_ns" ? changed.mtime_ns : changed.ctime_ns) += 4096;
    auto stale = ZeroIndex::parse(bytes, changed);
    ASSERT_FALSE(stale) << field;
    EXPECT_NE(stale.error().message.find("stale"), std::string::npos) << stale.error().message;
    EXPECT_NE(stale.error().message.find(field), std::string::npos) << stale.error().message;
  }
}

TEST_F(ZeroIndexTest, RestoringMtimeAfterAnInPlaceWriteStillMakesTheIndexStale) {
  const ZeroIndex z = build();
  struct stat st {};
  ASSERT_EQ(::stat(path_, &st), 0);
  write_page(0, 0xab);  // data where the index says zero
  const timespec times[2] = {st.st_atim, st.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, path_, times, 0), 0);
  auto src = MemoryFile::open(path_);
  auto id = (*src)->identity();
  EXPECT_EQ(id->mtime_ns, z.identity().mtime_ns) << "mtime was restored";
  auto loaded = ZeroIndex::parse(z.serialize(), *id);
  ASSERT_FALSE(loaded);
  EXPECT_NE(loaded.error().message.find("ctime_ns"), std::string::npos) << loaded.error().message;
}

TEST_F(ZeroIndexTest, EveryDamageIsRejected) {
  const ZeroIndex z = build();
  const FileIdentity id = z.identity();
  const std::string good = z.serialize();
  auto expect_rejected = [&](const std::string& bytes, const char* needle) {
    auto r = ZeroIndex::parse(bytes, id);
    ASSERT_FALSE(r) << needle;
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().message;
  };
  auto with_crc = [](std::string bytes) {
    bytes.resize(bytes.size() - 4);
    const auto c = static_cast<uint32_t>(::crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()),
                                                 static_cast<uInt>(bytes.size())));
    bytes.append(reinterpret_cast<const char*>(&c), 4);
    return bytes;
  };
  expect_rejected(good.substr(0, 30), "truncated");
  expect_rejected(good.substr(0, good.size() - 1), "wrong length");
  expect_rejected(good + "x", "wrong length");
  expect_rejected("XXXXXXXX" + good.substr(8), "bad magic");
  std::string flipped = good;
  flipped[60] ^= 1;
  expect_rejected(flipped, "checksum");
  std::string v1 = good;
  v1[8] = 1;  // the old format (stat() of the path) is rebuilt, never trusted
  expect_rejected(with_crc(v1), "version 1");
  std::string granule = good;
  granule[13] = 0x20;
  expect_rejected(with_crc(granule), "granule");
  // 64 pages: the bitmap is exactly 8 bytes and has no spare bits. A file of
  // 63 pages has one spare bit in its last byte, which must stay clear.
  std::string short_file(63 * 4096, '\0');
  std::ofstream(path_, std::ios::binary | std::ios::trunc).write(short_file.data(), short_file.size());
  const ZeroIndex all_zero = build();
  EXPECT_EQ(all_zero.zero_pages(), 63u);
  std::string padded = all_zero.serialize();
  padded[56 + 7] = static_cast<char>(0xff);
  auto r = ZeroIndex::parse(with_crc(padded), all_zero.identity());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("past the last page"), std::string::npos) << r.error().message;
}

TEST_F(ZeroIndexTest, SampledCheckAgreesWithTheFileItWasBuiltFrom) {
  const ZeroIndex z = build();
  auto src = MemoryFile::open(path_);
  for (uint64_t seed = 0; seed < 8; ++seed) {
    auto r = z.check_sample(**src, 16, seed);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->zero_pages_read, 16u);
    EXPECT_EQ(r->data_pages_read, 16u);
  }
  auto all = z.check_sample(**src, 1000, 1);
  ASSERT_TRUE(all);
  EXPECT_EQ(all->zero_pages_read, 22u) << "never more than the class holds";
  EXPECT_EQ(all->data_pages_read, 42u);
}

TEST_F(ZeroIndexTest, SampledCheckFindsZeroPagesThatNowHoldData) {
  const ZeroIndex z = build();
  for (uint64_t p = 0; p < 64; p += 3) write_page(p, 0x5a);
  auto src = MemoryFile::open(path_);
  auto r = z.check_sample(**src, 1, 42);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("listed as all zero but holds data"), std::string::npos) << r.error().message;
}

TEST_F(ZeroIndexTest, SampledCheckFindsDataPagesThatNowReadZero) {
  const ZeroIndex z = build();
  for (uint64_t p = 0; p < 64; ++p) {
    if (p % 3 != 0) write_page(p, 0);
  }
  auto src = MemoryFile::open(path_);
  auto r = z.check_sample(**src, 1, 42);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("holding data but is all zero"), std::string::npos) << r.error().message;
}

TEST_F(ZeroIndexTest, SampledCheckAlwaysReadsTheOnlyPageOfAClass) {
  // One zero page among 64: whatever the seed, the sample lands on it.
  std::string bytes(64 * 4096, '\x01');
  std::fill(bytes.begin() + 17 * 4096, bytes.begin() + 18 * 4096, '\0');
  std::ofstream(path_, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size());
  const ZeroIndex z = build();
  ASSERT_EQ(z.zero_pages(), 1u);
  write_page(17, 0x01);
  auto src = MemoryFile::open(path_);
  for (uint64_t seed = 0; seed < 16; ++seed) {
    auto r = z.check_sample(**src, 1, seed);
    ASSERT_FALSE(r) << seed;
    EXPECT_NE(r.error().message.find("page 17 "), std::string::npos) << r.error().message;
  }
}

TEST_F(ZeroIndexTest, SampledCheckFindsPagesBeforeItsRandomStartWhenTheBitmapEndsMidWord) {
  // Found by the zero_index fuzz target: with 40 pages (a bitmap word that
  // ends early) and data only in pages 0-15, a sample starting past page 15
  // stopped at the end of the word instead of wrapping around, and checked
  // nothing.
  std::string bytes(40 * 4096, '\0');
  std::fill(bytes.begin(), bytes.begin() + 16 * 4096, '\x07');
  std::ofstream(path_, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size());
  const ZeroIndex z = build();
  ASSERT_EQ(z.zero_pages(), 24u);
  for (uint64_t p = 0; p < 16; ++p) write_page(p, 0);
  auto src = MemoryFile::open(path_);
  for (uint64_t seed = 0; seed < 32; ++seed) {
    auto r = z.check_sample(**src, 1, seed);
    ASSERT_FALSE(r) << "seed " << seed << " checked nothing";
    EXPECT_NE(r.error().message.find("holding data but is all zero"), std::string::npos);
  }
}

TEST_F(ZeroIndexTest, ADisabledIndexCallsNoPageZero) {
  const ZeroIndex z = build();
  ASSERT_TRUE(z.is_zero(0, 4096));
  z.disable();
  EXPECT_TRUE(z.disabled());
  for (uint64_t p = 0; p < 64; ++p) EXPECT_FALSE(z.is_zero(p * 4096, 4096)) << p;
  EXPECT_EQ(z.zero_pages(), 22u) << "the count stays what the file held when it was built";
}

TEST_F(ZeroIndexTest, BuildRefusesAnIdentityOfAnotherSize) {
  auto src = MemoryFile::open(path_);
  auto id = (*src)->identity();
  id->size += 4096;
  EXPECT_FALSE(ZeroIndex::build(**src, *id));
}

}  // namespace
}  // namespace faultline
