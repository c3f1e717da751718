// FrameBuffer: where decompressed frames live (huge-page chunks, reused slots).
#include "image/frame_buffer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/capability.h"

namespace faultline::image {
namespace {

void fill(FrameBuffer& b, char seed) {
  for (size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<char>(seed + i * 31);
}
bool holds(const FrameBuffer& b, char seed) {
  for (size_t i = 0; i < b.size(); ++i) {
    if (b[i] != static_cast<char>(seed + i * 31)) return false;
  }
  return true;
}
uintptr_t addr(const FrameBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); }

// AnonHugePages (kB) of the mapping of /proc/self/smaps that holds `p`.
long anon_huge_kb_at(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= a && a < hi;
      continue;
    }
    long kb = 0;
    if (inside && std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) return kb;
  }
  return -1;
}

std::string thp_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string s;
  std::getline(f, s);
  return s;
}

TEST(FrameBuffer, EachSizeGetsItsKindOfMemoryAndKeepsEveryByte) {
  struct Case {
    size_t size, footprint;
  };
  // Below 64 KiB: the heap, exactly its size. 64 KiB to 2 MiB: a power-of-two
  // slot of a 2 MiB chunk. Larger: whole 2 MiB chunks of its own.
  for (const Case c : {Case{4096, 4096}, Case{(64 << 10) - 1, (64 << 10) - 1}, Case{64 << 10, 64 << 10},
                       Case{(64 << 10) + 1, 128 << 10}, Case{300 << 10, 512 << 10}, Case{512 << 10, 512 << 10},
                       Case{(1 << 20) + 4096, 2 << 20}, Case{2 << 20, 2 << 20}, Case{(2 << 20) + 1, 4 << 20},
                       Case{5 << 20, 6 << 20}}) {
    SCOPED_TRACE(c.size);
    FrameBuffer b = FrameBuffer::allocate(c.size);
    ASSERT_NE(b.data(), nullptr);
    EXPECT_EQ(b.size(), c.size);
    EXPECT_EQ(b.footprint(), c.footprint);
    if (c.size >= FrameBuffer::kSmallest) {
      // A slot starts at a multiple of its size inside a 2 MiB-aligned chunk.
      EXPECT_EQ(addr(b) % std::min<size_t>(c.footprint, FrameBuffer::kChunk), 0u);
    }
    fill(b, static_cast<char>(c.size));
    EXPECT_TRUE(holds(b, static_cast<char>(c.size)));
    FrameBuffer moved = std::move(b);
    EXPECT_EQ(b.data(),
              nullptr);       // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_EQ(b.size(), 0u);  // NOLINT(bugprone-use-after-move)
    EXPECT_TRUE(holds(moved, static_cast<char>(c.size)));
  }
  EXPECT_EQ(FrameBuffer::allocate(0).size(), 0u);
  EXPECT_EQ(FrameBuffer::copy_of("abc").view(), "abc");
}

TEST(FrameBuffer, SlotsOfAChunkNeverOverlapAndAFreedSlotIsTheNextOneHandedOut) {
  FrameBuffer::release_empty_chunks();
  std::vector<FrameBuffer> quarter;
  for (int i = 0; i < 4; ++i) {
    quarter.push_back(FrameBuffer::allocate(512 << 10));
    fill(quarter.back(), static_cast<char>(i));
  }
  std::set<uintptr_t> starts;
  for (const FrameBuffer& b : quarter) starts.insert(addr(b));
  EXPECT_EQ(starts.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(holds(quarter[i], static_cast<char>(i))) << i;  // no slot overlaps another

  const uintptr_t freed = addr(quarter[2]);
  const uint64_t reuses = FrameBuffer::totals().slot_reuses;
  const uint64_t maps = FrameBuffer::totals().chunk_maps;
  EXPECT_EQ(FrameBuffer::free_slot_bytes(), 0u);  // the chunk is full
  quarter[2] = FrameBuffer{};
  EXPECT_EQ(FrameBuffer::free_slot_bytes(), 512u << 10);  // one slot only a 512 KiB frame can take
  EXPECT_EQ(FrameBuffer::count_free_slot_bytes(), 512u << 10);
  FrameBuffer again = FrameBuffer::allocate(400 << 10);  // the same class: 512 KiB slots
  EXPECT_EQ(addr(again), freed);
  EXPECT_EQ(FrameBuffer::totals().slot_reuses, reuses + 1);
  EXPECT_EQ(FrameBuffer::totals().chunk_maps, maps);  // no fresh memory
  for (int i : {0, 1, 3}) EXPECT_TRUE(holds(quarter[i], static_cast<char>(i))) << i;
  EXPECT_EQ(FrameBuffer::free_slot_bytes(), 0u);
  quarter.clear();
  again = FrameBuffer{};
  EXPECT_EQ(FrameBuffer::free_slot_bytes(), 0u);  // an empty chunk serves any size: not counted
  EXPECT_EQ(FrameBuffer::count_free_slot_bytes(), 0u);
}

TEST(FrameBuffer, EmptyChunksAreKeptUpToTheLimitForAnySizeAndTheRestUnmapped) {
  FrameBuffer::release_empty_chunks();
  EXPECT_EQ(FrameBuffer::keep_empty_bytes(), FrameBuffer::kDefaultKeepEmpty);
  constexpr size_t kKept = 8;
  FrameBuffer::set_keep_empty_bytes(kKept * FrameBuffer::kChunk + 4096);  // whole chunks: 8
  const FrameBuffer::Totals before = FrameBuffer::totals();
  const size_t n = kKept + 4;
  std::vector<FrameBuffer> whole;
  for (size_t i = 0; i < n; ++i) whole.push_back(FrameBuffer::allocate(2 << 20));
  EXPECT_EQ(FrameBuffer::totals().chunks_mapped, before.chunks_mapped + n);
  EXPECT_EQ(FrameBuffer::totals().chunk_maps, before.chunk_maps + n);
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, before.mapped_bytes + n * FrameBuffer::kChunk);
  EXPECT_EQ(FrameBuffer::totals().fresh_bytes, before.fresh_bytes + n * FrameBuffer::kChunk);
  {
    FrameBuffer own = FrameBuffer::allocate(5 << 20);  // a mapping of its own, 6 MiB
    EXPECT_EQ(FrameBuffer::totals().mapped_bytes, before.mapped_bytes + n * FrameBuffer::kChunk + (6 << 20));
    EXPECT_EQ(FrameBuffer::totals().fresh_bytes, before.fresh_bytes + n * FrameBuffer::kChunk + (6 << 20));
  }
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, before.mapped_bytes + n * FrameBuffer::kChunk);
  std::set<uintptr_t> kept_candidates;
  for (const FrameBuffer& b : whole) kept_candidates.insert(addr(b));
  whole.clear();
  FrameBuffer::Totals after = FrameBuffer::totals();
  EXPECT_EQ(after.chunks_empty, kKept);
  EXPECT_EQ(after.chunks_mapped, before.chunks_mapped + kKept);

  // A kept chunk serves another size: 64 KiB slots, memory used before.
  FrameBuffer small = FrameBuffer::allocate(64 << 10);
  EXPECT_TRUE(kept_candidates.contains(addr(small) & ~(FrameBuffer::kChunk - 1)));
  EXPECT_EQ(FrameBuffer::totals().chunk_maps, after.chunk_maps);
  EXPECT_EQ(FrameBuffer::totals().slot_reuses, after.slot_reuses + 1);
  small = FrameBuffer{};
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, kKept);
  FrameBuffer::set_keep_empty_bytes(3 * FrameBuffer::kChunk);  // lowering the limit unmaps the excess
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 3u);
  EXPECT_EQ(FrameBuffer::totals().chunks_mapped, before.chunks_mapped + 3);
  FrameBuffer::release_empty_chunks();
  EXPECT_EQ(FrameBuffer::keep_empty_bytes(), 3 * FrameBuffer::kChunk);  // the limit stays
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 0u);
  EXPECT_EQ(FrameBuffer::totals().chunks_mapped, before.chunks_mapped);
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, before.mapped_bytes);
}

TEST(FrameBuffer, ChunksInUseCountAgainstTheLimitOfTheOnesKeptEmpty) {
  FrameBuffer::release_empty_chunks();
  const uint64_t keep = FrameBuffer::keep_empty_bytes();
  const FrameBuffer::Totals before = FrameBuffer::totals();
  ASSERT_EQ(before.chunks_mapped, 0u) << "another test left frame memory in use";
  FrameBuffer::set_keep_empty_bytes(8 * FrameBuffer::kChunk);
  std::vector<FrameBuffer> in_use, freed;
  for (int i = 0; i < 6; ++i) in_use.push_back(FrameBuffer::allocate(2 << 20));
  for (int i = 0; i < 4; ++i) freed.push_back(FrameBuffer::allocate(2 << 20));
  freed.clear();
  // 6 in use: of the 4 emptied, only 2 fit under the limit of 8.
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 2u);
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, 8 * FrameBuffer::kChunk);
  in_use.resize(2);  // 4 more emptied: 8 mapped, all kept
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 6u);
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, 8 * FrameBuffer::kChunk);
  // A frame of its own mapping counts too: lowering the limit to 5 chunks
  // with 2 chunks in use and a 4 MiB mapping leaves 1 kept empty.
  FrameBuffer own = FrameBuffer::allocate(3 << 20);
  FrameBuffer::set_keep_empty_bytes(5 * FrameBuffer::kChunk);
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 1u);
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, 5 * FrameBuffer::kChunk);
  own = FrameBuffer{};
  in_use.clear();
  EXPECT_EQ(FrameBuffer::totals().chunks_empty, 3u);  // 1 kept + the 2 emptied now
  FrameBuffer::set_keep_empty_bytes(keep);
  FrameBuffer::release_empty_chunks();
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes, 0u);
}

// The point of the chunks: a 2 MiB frame written once is one transparent
// huge page, not 512 page faults of fresh memory.
TEST(FrameBuffer, AWholeChunkIsBackedByATransparentHugePage) {
  const std::string mode = thp_mode();
  FAULTLINE_REQUIRE_CAPABILITY("thp", mode.find("[never]") == std::string::npos && !mode.empty(),
                               "transparent huge pages are off (" + mode + ")");
  FrameBuffer b = FrameBuffer::allocate(2 << 20);
  fill(b, 7);
  EXPECT_GE(anon_huge_kb_at(b.data()), 2048) << "THP mode: " << mode;
  EXPECT_TRUE(holds(b, 7));
}

TEST(FrameBuffer, ThreadsAllocatingAndFreeingEverySizeNeverShareMemory) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 300;
  std::atomic<int> corrupt{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::pair<FrameBuffer, char>> held;
      for (int r = 0; r < kRounds; ++r) {
        const size_t sizes[] = {64 << 10, 100 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 3 << 20};
        const size_t size = sizes[(r * 3 + t) % 7];
        const char seed = static_cast<char>(t * 50 + r);
        held.emplace_back(FrameBuffer::allocate(size), seed);
        // Only the first and last bytes of each 4 KiB: enough to see sharing.
        FrameBuffer& b = held.back().first;
        for (size_t i = 0; i < size; i += 4096) b.data()[i] = seed;
        b.data()[size - 1] = seed;
        if (held.size() > 6) {
          const size_t victim = (r * 13) % held.size();
          const FrameBuffer& v = held[victim].first;
          for (size_t i = 0; i < v.size(); i += 4096) {
            if (v[i] != held[victim].second) corrupt.fetch_add(1);
          }
          if (v[v.size() - 1] != held[victim].second) corrupt.fetch_add(1);
          held.erase(held.begin() + static_cast<long>(victim));
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(corrupt.load(), 0);
}

}  // namespace
}  // namespace faultline::image
