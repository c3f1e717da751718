// The trace generator of the trace-replay scenario (bench/trace.h): the
// shape it promises, determinism, and the round trip through a working-set
// file read back with faultline's own reader.
#include "bench/trace.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include <gtest/gtest.h>

#include "snapshot/working_set.h"

namespace faultline::bench {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

std::string temp_path(const std::string& name) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return (std::filesystem::temp_directory_path() /
          ("trace_test-" + std::to_string(::getpid()) + "-" + info->name() + "-" + name))
      .string();
}

Trace generated(uint64_t guest, int streams, bool random = false, uint64_t seed = 1) {
  TraceOptions o;
  o.guest_bytes = guest;
  o.streams = streams;
  o.random_access = random;
  o.seed = seed;
  auto t = generate_trace(o);
  EXPECT_TRUE(t.has_value()) << (t ? "" : t.error().describe());
  return t ? *t : Trace{};
}

TEST(TraceShape, CountsNextPageRunsBlocksAndBackwardJumpsOfAHandMadeTrace) {
  // Stream 0: pages 0,1,2,3 then 40 then 20,21 (a backward jump from 40).
  // Stream 1: pages 16..31 minus 20,21 (taken by stream 0): 16..19, 22..31.
  Trace t;
  t.guest_bytes = 64 * kTracePage;
  t.streams = {{0, 1 * kTracePage, 2 * kTracePage, 3 * kTracePage, 40 * kTracePage, 20 * kTracePage, 21 * kTracePage},
               {}};
  for (uint64_t p = 16; p < 32; ++p) {
    if (p != 20 && p != 21) t.streams[1].push_back(p * kTracePage);
  }
  const TraceShape s = measure_shape(t);
  EXPECT_EQ(s.pages, 21u);
  // Followed by the next page: 0,1,2 and 20 in stream 0; 16,17,18 and 22..30 in stream 1.
  EXPECT_DOUBLE_EQ(s.next_page_share, (4.0 + 3.0 + 9.0) / 21.0);
  // Blocks 0 (4 pages), 1 (16 pages, all), 2 (page 40): 21 of 48 pages.
  EXPECT_DOUBLE_EQ(s.block_use, 21.0 / 48.0);
  EXPECT_DOUBLE_EQ(s.full_block_share, 1.0 / 3.0);
  // Runs: [0-3] [40] [20-21] [16-19] [22-31].
  EXPECT_EQ(s.runs, 5u);
  EXPECT_EQ(s.longest_run_pages, 10u);
  EXPECT_DOUBLE_EQ(s.single_page_run_share, 1.0 / 5.0);
  EXPECT_DOUBLE_EQ(s.backward_jump_share, 1.0 / 21.0);  // 40 -> 20 (19 -> 22 is forward)
}

TEST(TraceGenerator, DefaultTraceHasTheShapeOfARealGuest) {
  // The issue: ~95 % of touches followed by the next page, 64 KiB blocks ~90 % used.
  for (int streams : {1, 2, 4}) {
    const Trace t = generated(256 * kMiB, streams);
    const TraceShape s = measure_shape(t);
    SCOPED_TRACE(std::to_string(streams) + " streams: " + describe_shape(s));
    EXPECT_EQ(s.pages, 256 * kMiB / kTracePage / 4);
    EXPECT_GE(s.next_page_share, 0.93);
    EXPECT_LE(s.next_page_share, 0.97);
    EXPECT_GE(s.block_use, 0.87);
    EXPECT_LE(s.block_use, 0.95);
    // Not one long sweep: runs of varied length, some single pages, some going back.
    EXPECT_GE(s.runs, s.pages / 50);
    EXPECT_GE(s.longest_run_pages, 100u);
    EXPECT_GT(s.single_page_run_share, 0.02);
    EXPECT_GT(s.backward_jump_share, 0.005);
  }
}

TEST(TraceGenerator, RandomAccessTraceHasNoRuns) {
  const TraceShape s = measure_shape(generated(256 * kMiB, 1, true));
  SCOPED_TRACE(describe_shape(s));
  EXPECT_EQ(s.pages, 256 * kMiB / kTracePage / 4);
  EXPECT_LT(s.next_page_share, 0.01);
  EXPECT_LT(s.block_use, 0.35);  // a quarter of the pages, spread over most blocks
}

TEST(TraceGenerator, EveryPageIsDistinctAlignedAndInsideTheGuest) {
  for (bool random : {false, true}) {
    const Trace t = generated(32 * kMiB, 3, random);
    std::set<uint64_t> seen;
    for (const auto& s : t.streams) {
      for (uint64_t off : s) {
        EXPECT_EQ(off % kTracePage, 0u);
        EXPECT_LT(off, 32 * kMiB);
        EXPECT_TRUE(seen.insert(off).second) << "page " << off << " twice";
      }
    }
    EXPECT_EQ(seen.size(), t.pages());
  }
}

TEST(TraceGenerator, SameSeedSameTraceOtherSeedOtherTrace) {
  EXPECT_EQ(generated(32 * kMiB, 2, false, 5).streams, generated(32 * kMiB, 2, false, 5).streams);
  EXPECT_NE(generated(32 * kMiB, 2, false, 5).streams, generated(32 * kMiB, 2, false, 6).streams);
}

TEST(TraceGenerator, RejectsOptionsOutOfRange) {
  TraceOptions o;
  o.guest_bytes = 32 * kMiB + 1;
  EXPECT_EQ(generate_trace(o).error().code, EINVAL);
  o.guest_bytes = 32 * kMiB;
  o.streams = 5;
  EXPECT_EQ(generate_trace(o).error().code, EINVAL);
  o.streams = 1;
  o.fraction = 0.9;
  EXPECT_EQ(generate_trace(o).error().code, EINVAL);
}

TEST(TraceFile, GeneratedTraceReadsBackWithTheWorkingSetReaderAsTheStreamsWritten) {
  for (int streams : {1, 2, 3, 4}) {
    const Trace t = generated(32 * kMiB, streams, false, 9);
    const std::string path = temp_path(std::to_string(streams));
    ASSERT_TRUE(write_trace(path, t).has_value());
    // faultline's own reader takes it: the --record format, unchanged.
    auto set = read_working_set(path, 32 * kMiB);
    ASSERT_TRUE(set.has_value()) << set.error().describe();
    EXPECT_EQ(set->page_size, 4096u);
    EXPECT_EQ(set->memory_file_size, 32 * kMiB);
    std::vector<uint64_t> concatenated;
    for (const auto& s : t.streams) concatenated.insert(concatenated.end(), s.begin(), s.end());
    EXPECT_EQ(set->offsets, concatenated);
    auto back = read_trace(path, streams);
    ASSERT_TRUE(back.has_value()) << back.error().describe();
    EXPECT_EQ(back->guest_bytes, 32 * kMiB);
    EXPECT_EQ(back->streams, t.streams);
    std::filesystem::remove(path);
  }
}

TEST(TraceFile, ARecordOfAnotherSizeIsSplitIntoContiguousSlices) {
  WorkingSet set;
  set.memory_file_size = 64 * kTracePage;
  for (uint64_t p : {5, 6, 7, 30, 31, 2, 3}) set.offsets.push_back(p * kTracePage);
  const std::string path = temp_path("record");
  ASSERT_TRUE(write_working_set(path, set).has_value());
  auto t = read_trace(path, 2);
  ASSERT_TRUE(t.has_value()) << t.error().describe();
  EXPECT_EQ(t->guest_bytes, 64 * kTracePage);
  ASSERT_EQ(t->streams.size(), 2u);
  EXPECT_EQ(t->streams[0], (std::vector<uint64_t>{5 * kTracePage, 6 * kTracePage, 7 * kTracePage}));
  EXPECT_EQ(t->streams[1], (std::vector<uint64_t>{30 * kTracePage, 31 * kTracePage, 2 * kTracePage, 3 * kTracePage}));
  std::filesystem::remove(path);
}

TEST(TraceFile, RejectsARecordListingAPageTwiceAndOneOfHugePages) {
  WorkingSet twice;
  twice.memory_file_size = 64 * kTracePage;
  twice.offsets = {kTracePage, 2 * kTracePage, kTracePage};
  const std::string path = temp_path("twice");
  ASSERT_TRUE(write_working_set(path, twice).has_value());
  auto t = read_trace(path, 1);
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find("lists a page twice"), std::string::npos) << t.error().describe();

  WorkingSet huge;
  huge.page_size = 2 * 1024 * 1024;
  huge.memory_file_size = 4 * kMiB;
  huge.offsets = {0};
  ASSERT_TRUE(write_working_set(path, huge).has_value());
  t = read_trace(path, 1);
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().code, EINVAL);
  std::filesystem::remove(path);
}

TEST(TraceFile, ADamagedRecordIsRefusedWithTheReadersReason) {
  const std::string path = temp_path("damaged");
  ASSERT_TRUE(write_trace(path, generated(32 * kMiB, 1)).has_value());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 1);
  auto t = read_trace(path, 1);
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find("truncated"), std::string::npos) << t.error().describe();
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace faultline::bench
