// Mapping::map_file: a whole file mapped shared, read-only or writable.
#include "common/mapping.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/atomic_file.h"
#include "tests/temp_dir.h"

namespace faultline {
namespace {

class ScratchFile {
 public:
  std::string path() const { return dir_.file("file"); }
  void write(const std::string& bytes) const { std::ofstream(path(), std::ios::binary | std::ios::trunc) << bytes; }

 private:
  faultline::testing::TempDir dir_;
};

TEST(MapFile, ReadOnlyMappingHoldsTheFilesBytesAndItsSize) {
  ScratchFile f;
  const std::string bytes = std::string(5000, 'a') + "end";
  f.write(bytes);
  auto m = Mapping::map_file(f.path());
  ASSERT_TRUE(m) << m.error().describe();
  ASSERT_EQ(m->size(), bytes.size());
  EXPECT_EQ(std::memcmp(m->bytes(), bytes.data(), bytes.size()), 0);
}

TEST(MapFile, ReadWriteMappingWritesReachTheFile) {
  ScratchFile f;
  f.write(std::string(8192, '\0'));
  {
    auto m = Mapping::map_file(f.path(), Mapping::Access::kReadWrite);
    ASSERT_TRUE(m) << m.error().describe();
    std::memcpy(m->bytes() + 4096, "written", 7);
  }
  auto after = read_whole_file(f.path());
  ASSERT_TRUE(after) << after.error().describe();
  ASSERT_EQ(after->size(), 8192u);
  EXPECT_EQ(after->substr(4096, 7), "written");
  EXPECT_EQ(after->substr(0, 4096), std::string(4096, '\0'));
}

TEST(MapFile, AMissingOrEmptyFileIsAnErrorNamingThePath) {
  ScratchFile f;
  auto missing = Mapping::map_file(f.path());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ENOENT);
  EXPECT_NE(missing.error().message.find(f.path()), std::string::npos) << missing.error().message;

  f.write("");
  auto empty = Mapping::map_file(f.path());
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error().code, EINVAL);
  EXPECT_NE(empty.error().message.find(f.path()), std::string::npos) << empty.error().message;
}

}  // namespace
}  // namespace faultline
