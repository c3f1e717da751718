// AtomicFileWriter: a large file appears whole under its name or not at all.
#include "common/atomic_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include "tests/temp_dir.h"

namespace faultline {
namespace {

class ScratchDir : public faultline::testing::TempDir {
 public:
  size_t entries() const { return static_cast<size_t>(std::distance(std::filesystem::directory_iterator(path()), {})); }
};

std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(AtomicFileWriter, AWriterDestroyedUncommittedLeavesNoFileAndNoTemporary) {
  ScratchDir dir;
  {
    auto w = AtomicFileWriter::create(dir.file("out"));
    ASSERT_TRUE(w) << w.error().describe();
    ASSERT_TRUE(w->pwrite_all("half", 0));
  }
  EXPECT_EQ(dir.entries(), 0u);
}

TEST(AtomicFileWriter, CommitReplacesTheOldFileWithTheWholeNewOneSparseTailIncluded) {
  ScratchDir dir;
  ASSERT_TRUE(write_file_atomically(dir.file("out"), "old"));
  auto w = AtomicFileWriter::create(dir.file("out"));
  ASSERT_TRUE(w);
  ASSERT_TRUE(w->truncate(3 * 4096));
  ASSERT_TRUE(w->pwrite_all("page one", 4096));
  EXPECT_EQ(contents(dir.file("out")), "old") << "readers see the old file until commit";
  ASSERT_TRUE(w->commit());
  std::string expected(3 * 4096, '\0');
  expected.replace(4096, 8, "page one");
  EXPECT_EQ(contents(dir.file("out")), expected);
  EXPECT_EQ(dir.entries(), 1u);
}

TEST(AtomicFileWriter, RefusesANameThatIsNotAPlainFile) {
  ScratchDir dir;
  EXPECT_FALSE(AtomicFileWriter::create(dir.file(".hidden")));
  EXPECT_FALSE(AtomicFileWriter::create(dir.file("")));
}

}  // namespace
}  // namespace faultline
