// AtomicFileWriter: a large file appears whole under its name or not at all.
#include "common/atomic_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

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

TEST(WriteFileAtomically, IfExistsFailRefusesAnExistingNameAndLeavesItsFileAndNoTemporary) {
  ScratchDir dir;
  ASSERT_TRUE(write_file_atomically(dir.file("out"), "first", 0644, IfExists::kFail));
  auto again = write_file_atomically(dir.file("out"), "second", 0644, IfExists::kFail);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EEXIST) << again.error().describe();
  EXPECT_EQ(contents(dir.file("out")), "first");
  EXPECT_EQ(dir.entries(), 1u) << "the refused write left its temporary file";
  // The default replaces.
  ASSERT_TRUE(write_file_atomically(dir.file("out"), "third"));
  EXPECT_EQ(contents(dir.file("out")), "third");
}

TEST(WriteFileAtomically, OfWritersRacingOnOneNameWithIfExistsFailExactlyOneWins) {
  ScratchDir dir;
  constexpr int kWriters = 8;
  std::barrier start(kWriters);
  std::vector<int> won(kWriters, 0);
  {
    std::vector<std::jthread> writers;
    for (int i = 0; i < kWriters; ++i) {
      writers.emplace_back([&, i] {
        start.arrive_and_wait();
        auto st = write_file_atomically(dir.file("out"), "writer " + std::to_string(i), 0644, IfExists::kFail);
        won[i] = st ? 1 : 0;
        if (!st) {
          EXPECT_EQ(st.error().code, EEXIST) << st.error().describe();
        }
      });
    }
  }
  ASSERT_EQ(std::count(won.begin(), won.end(), 1), 1);
  const int winner = static_cast<int>(std::find(won.begin(), won.end(), 1) - won.begin());
  EXPECT_EQ(contents(dir.file("out")), "writer " + std::to_string(winner)) << "a later writer replaced the winner";
  EXPECT_EQ(dir.entries(), 1u);
}

TEST(FileIo, PwriteAllWritesEveryByteAtItsOffsetAndReportsTheErrno) {
  ScratchDir dir;
  std::string bytes(3 << 20, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  {
    UniqueFd fd(::open(dir.file("f").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd);
    auto st = pwrite_all(fd.get(), bytes, 4096);
    ASSERT_TRUE(st) << st.error().describe();
  }
  auto read = read_whole_file(dir.file("f"));
  ASSERT_TRUE(read) << read.error().describe();
  EXPECT_EQ(*read, std::string(4096, '\0') + bytes);

  UniqueFd full(::open("/dev/full", O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(full);
  auto no_space = pwrite_all(full.get(), "x", 0);
  ASSERT_FALSE(no_space);
  EXPECT_EQ(no_space.error().code, ENOSPC);
  UniqueFd read_only(::open(dir.file("f").c_str(), O_RDONLY | O_CLOEXEC));
  auto not_writable = pwrite_all(read_only.get(), "x", 0);
  ASSERT_FALSE(not_writable);
  EXPECT_EQ(not_writable.error().code, EBADF);
}

TEST(FileIo, ReadingRefusesADirectoryAndASymlink) {
  ScratchDir dir;
  ASSERT_TRUE(write_file_atomically(dir.file("target"), "bytes"));
  ASSERT_EQ(::symlink(dir.file("target").c_str(), dir.file("link").c_str()), 0);
  ASSERT_EQ(::mkdir(dir.file("sub").c_str(), 0700), 0);
  auto opened = open_regular_file(dir.file("target"));
  ASSERT_TRUE(opened) << opened.error().describe();
  EXPECT_EQ(opened->second, 5u);
  auto link = read_whole_file(dir.file("link"));
  ASSERT_FALSE(link);
  EXPECT_EQ(link.error().code, ELOOP);
  auto sub = read_whole_file(dir.file("sub"));
  ASSERT_FALSE(sub);
  EXPECT_EQ(sub.error().code, EINVAL);
  EXPECT_NE(sub.error().message.find("not a regular file"), std::string::npos) << sub.error().message;
}

}  // namespace
}  // namespace faultline
