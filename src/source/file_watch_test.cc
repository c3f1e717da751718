#include "source/file_watch.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <vector>

#include "tests/temp_dir.h"

namespace faultline {
namespace {

// A unique temporary directory holding one 64 KiB file "mem".
class FileWatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_.path();
    path_ = dir_ + "/mem";
    write_file(path_, 'a');
  }

  static void write_file(const std::string& path, char fill) {
    UniqueFd fd(::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd);
    const std::string bytes(64 * 1024, fill);
    ASSERT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }

  // Records what the watch reported; wait_for() blocks until an event came.
  struct Recorder {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<FileWatch::Event> events;
    FileWatch::Callback callback() {
      return [this](FileWatch::Event e, const std::string&) {
        std::lock_guard lock(mu);
        events.push_back(e);
        cv.notify_all();
      };
    }
    bool wait_for(FileWatch::Event e) {
      std::unique_lock lock(mu);
      return cv.wait_for(lock, std::chrono::seconds(10), [&] {
        return std::find(events.begin(), events.end(), e) != events.end();
      });
    }
    size_t count(FileWatch::Event e) {
      std::lock_guard lock(mu);
      return static_cast<size_t>(std::count(events.begin(), events.end(), e));
    }
  };

  faultline::testing::TempDir scratch_;
  std::string dir_, path_;
};

TEST_F(FileWatchTest, AWriterOpeningTheFileWaitsUntilTheOwnerWasTold) {
  auto file = MemoryFile::open(path_);
  ASSERT_TRUE(file);
  Recorder rec;
  auto watch = FileWatch::start(**file, rec.callback());
  ASSERT_TRUE(watch) << watch.error().describe();
  ASSERT_EQ((*watch)->guard(), FileWatch::Guard::kLease) << (*watch)->guard_note();
  EXPECT_FALSE((*watch)->content_changed());
  // The kernel holds this open() until the watch released its lease, which
  // it does only after reporting: no sleep or wait is needed to see it.
  UniqueFd writer(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(writer);
  EXPECT_TRUE((*watch)->content_changed());
  EXPECT_EQ(rec.count(FileWatch::Event::kContentChange), 1u);
}

TEST_F(FileWatchTest, TruncatingThePathBreaksTheLeaseFirst) {
  auto file = MemoryFile::open(path_);
  Recorder rec;
  auto watch = FileWatch::start(**file, rec.callback());
  ASSERT_TRUE(watch);
  ASSERT_EQ((*watch)->guard(), FileWatch::Guard::kLease);
  ASSERT_EQ(::truncate(path_.c_str(), 4096), 0);
  EXPECT_TRUE((*watch)->content_changed());
}

TEST_F(FileWatchTest, WithAWriterAlreadyOpenTheWatchFallsBackToInotifyAndSeesTheWrite) {
  UniqueFd early_writer(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(early_writer);
  auto file = MemoryFile::open(path_);
  Recorder rec;
  auto watch = FileWatch::start(**file, rec.callback());
  ASSERT_TRUE(watch) << watch.error().describe();
  EXPECT_EQ((*watch)->guard(), FileWatch::Guard::kInotify);
  EXPECT_NE((*watch)->guard_note().find("open for writing"), std::string::npos) << (*watch)->guard_note();
  ASSERT_EQ(::pwrite(early_writer.get(), "x", 1, 100), 1);
  ASSERT_TRUE(rec.wait_for(FileWatch::Event::kContentChange));
  EXPECT_TRUE((*watch)->content_changed());
}

TEST_F(FileWatchTest, ReplacingThePathIsReportedAndMetadataChangesAreNotContentChanges) {
  auto file = MemoryFile::open(path_);
  Recorder rec;
  auto watch = FileWatch::start(**file, rec.callback());
  ASSERT_TRUE(watch);
  // Metadata only: the content of the served file is unchanged.
  const timespec times[2] = {{1, 0}, {1, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path_.c_str(), times, 0), 0);
  ASSERT_EQ(::chmod(path_.c_str(), 0600), 0);
  // A new file renamed over the path: the served inode loses its last name.
  const std::string fresh = dir_ + "/mem.new";
  write_file(fresh, 'b');
  ASSERT_EQ(::rename(fresh.c_str(), path_.c_str()), 0);
  ASSERT_TRUE(rec.wait_for(FileWatch::Event::kReplaced));
  // Events are reported in order: had utimensat or chmod counted as a
  // content change, it would be recorded by now.
  EXPECT_EQ(rec.count(FileWatch::Event::kContentChange), 0u);
  EXPECT_FALSE((*watch)->content_changed());
}

TEST_F(FileWatchTest, StoppingReleasesTheLease) {
  auto file = MemoryFile::open(path_);
  Recorder rec;
  {
    auto watch = FileWatch::start(**file, rec.callback());
    ASSERT_TRUE(watch);
  }
  UniqueFd writer(::open(path_.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
  EXPECT_TRUE(writer) << "a lease left behind makes a non-blocking open fail with EWOULDBLOCK: "
                      << std::strerror(errno);
  EXPECT_EQ(rec.count(FileWatch::Event::kContentChange), 0u);
}

}  // namespace
}  // namespace faultline
