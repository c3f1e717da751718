// FrameCache and ImageSource: the pieces an image is served through.
#include "image/frame_cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "common/deadline.h"
#include "image/frame.h"
#include "image/image_source.h"
#include "image/local_store.h"
#include "image/manifest.h"
#include "image/operations.h"
#include "tests/delegating_store.h"
#include "tests/no_free_fd.h"
#include "tests/temp_dir.h"

namespace faultline::image {
namespace {

// Under ThreadSanitizer the two tests that fill a cache of many MiB use a
// quarter of the bytes (frames a quarter the size, or a quarter as many of
// the same sizes in a quarter of the chunks): the first
// touch of each fresh MiB of shadow memory, not the cache, took their time
// there (16-26 s each in CI).
#if defined(__SANITIZE_THREAD__)
constexpr size_t kMiBUnit = 256 << 10;
#else
constexpr size_t kMiBUnit = 1 << 20;
#endif

FrameKey id_of(const std::string& s) { return FrameKey{BlobId::of(s)}; }

Result<FrameBuffer> bytes_of(size_t n, char c) { return FrameBuffer::copy_of(std::string(n, c)); }

// Runs `f` when the scope ends, however it ends (a failed ASSERT returns).
struct OnExit {
  std::function<void()> f;
  ~OnExit() { f(); }
};

// Polls a condition another thread makes true (a bound, not an ordering).
bool eventually(const std::function<bool()>& cond) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

// A loader held inside its load (a load stuck on a store) until open(),
// counting its calls; open() may be called more than once.
struct HeldLoader {
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  std::once_flag once;
  std::atomic<int> loads{0};
  // A loader that, once opened, returns what `result` gives.
  std::function<Result<FrameBuffer>()> returning(std::function<Result<FrameBuffer>()> result) {
    return [this, result = std::move(result)] {
      loads.fetch_add(1);
      opened.wait();
      return result();
    };
  }
  void open() {
    std::call_once(once, [this] { gate.set_value(); });
  }
};

TEST(FrameCache, ConcurrentMissesOfOneFrameRunOneLoad) {
  FrameCache cache(64 << 20);
  HeldLoader held;  // held until the second get() is waiting on this load
  auto loader = held.returning([] { return bytes_of(4096, 'a'); });
  std::atomic<int>& loads = held.loads;
  auto first = std::async(std::launch::async, [&] { return cache.get(id_of("x"), loader); });
  ASSERT_TRUE(eventually([&] { return loads.load() == 1; }));
  auto second = std::async(std::launch::async, [&] { return cache.get(id_of("x"), loader); });
  ASSERT_TRUE(eventually([&] { return cache.stats().waits == 1; }));
  held.open();
  auto a = first.get();
  auto b = second.get();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->get(), b->get()) << "both callers get the one decompressed frame";
  EXPECT_EQ(loads.load(), 1);
  EXPECT_EQ(cache.stats().misses, 1u);
}

// A get() that waits for another thread's load waits no longer than its
// thread's deadline (common/deadline.h), and stops waiting as soon as its
// scope is cancelled (its session stopping), though nothing notifies the
// wait of that: the load itself goes on for whoever else wants it.
TEST(FrameCache, AWaitForAnotherThreadsLoadEndsAtTheDeadlineAndWhenCancelled) {
  FrameCache cache(64 << 20);
  HeldLoader held;  // a load stuck on a store, until the end of the test
  auto loader = held.returning([] { return bytes_of(4096, 'w'); });
  std::atomic<int>& loads = held.loads;
  const auto open_gate = [&] { held.open(); };
  auto loading = std::async(std::launch::async, [&] { return cache.get(id_of("stuck"), loader); });
  const OnExit release_loader{open_gate};  // after `loading`: a failed ASSERT opens the gate before waiting for it
  ASSERT_TRUE(eventually([&] { return loads.load() == 1; }));
  {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
    auto r = cache.get(id_of("stuck"), loader);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ETIMEDOUT);
    EXPECT_TRUE(r.error().retryable);
    EXPECT_NE(r.error().message.find("until the deadline"), std::string::npos) << r.error().message;
  }
  std::atomic<bool> stop{false};
  auto waiting = std::async(std::launch::async, [&] {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::seconds(60), &stop);
    return cache.get(id_of("stuck"), loader);
  });
  ASSERT_TRUE(eventually([&] { return cache.stats().waits == 2; }));
  stop.store(true);
  // Bounded, not timed: without the cancellation this waits for the deadline.
  const bool ended = waiting.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  open_gate();  // lets a failed test end
  ASSERT_TRUE(ended) << "the wait did not end when its scope was cancelled";
  auto r = waiting.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ECANCELED);
  EXPECT_TRUE(r.error().retryable);
  EXPECT_NE(r.error().message.find("until asked to stop"), std::string::npos) << r.error().message;
  auto a = loading.get();
  ASSERT_TRUE(a) << "the load itself was not given up";
  EXPECT_EQ(loads.load(), 1);
}

TEST(FrameCache, AFailedLoadReachesEveryWaiterAndIsNotCached) {
  FrameCache cache(64 << 20);
  HeldLoader held;
  auto failing = held.returning([]() -> Result<FrameBuffer> { return fail("blob damaged", EIO); });
  auto first = std::async(std::launch::async, [&] { return cache.get(id_of("y"), failing); });
  ASSERT_TRUE(eventually([&] { return held.loads.load() == 1; }));
  auto second = std::async(std::launch::async, [&] { return cache.get(id_of("y"), failing); });
  ASSERT_TRUE(eventually([&] { return cache.stats().waits == 1; }));
  held.open();
  auto a = first.get();
  auto b = second.get();
  ASSERT_FALSE(a);
  ASSERT_FALSE(b);
  EXPECT_EQ(a.error().message, "blob damaged");
  EXPECT_EQ(b.error().message, "blob damaged");
  EXPECT_EQ(cache.find(id_of("y")), nullptr);
  // The next get() tries again.
  auto c = cache.get(id_of("y"), [] { return bytes_of(4096, 'c'); });
  ASSERT_TRUE(c);
  EXPECT_EQ((**c)[0], 'c');
  EXPECT_EQ(cache.stats().load_failures, 1u);
}

TEST(FrameCache, EvictsTheLeastRecentlyUsedFrameToStayWithinCapacity) {
  constexpr size_t kFrame = 1 << 20;
  FrameCache cache(3 * kFrame);  // small: one shard
  ASSERT_TRUE(cache.get(id_of("a"), [] { return bytes_of(kFrame, 'a'); }));
  ASSERT_TRUE(cache.get(id_of("b"), [] { return bytes_of(kFrame, 'b'); }));
  ASSERT_TRUE(cache.get(id_of("c"), [] { return bytes_of(kFrame, 'c'); }));
  ASSERT_NE(cache.find(id_of("a")),
            nullptr);  // a is now the most recent, b the least
  ASSERT_TRUE(cache.get(id_of("d"), [] { return bytes_of(kFrame, 'd'); }));
  EXPECT_EQ(cache.find(id_of("b")), nullptr);
  EXPECT_NE(cache.find(id_of("a")), nullptr);
  EXPECT_NE(cache.find(id_of("c")), nullptr);
  EXPECT_NE(cache.find(id_of("d")), nullptr);
  const FrameCache::Stats st = cache.stats();
  EXPECT_EQ(st.evictions, 1u);
  EXPECT_EQ(st.frames, 3u);
  EXPECT_LE(st.bytes, 3 * kFrame);
}

// `n` blob ids that all fall into the same shard whatever the shard count
// (the count is at most 16 and divides 16 for the capacities used here).
std::vector<FrameKey> ids_of_one_shard(size_t n) {
  std::vector<FrameKey> out;
  for (uint64_t i = 0; out.size() < n; ++i) {
    const FrameKey id = id_of("frame " + std::to_string(i));
    if (BlobIdHash{}(id.id) % 16 == 0) out.push_back(id);
  }
  return out;
}

// The capacity is one budget: frames that all hash to one shard fill the
// whole cache, and the frame evicted is the least recently used of all, even
// when it is in another shard than the frame coming in.
TEST(FrameCache, ACacheOfNBytesHoldsNBytesOfFramesHoweverTheyHashAndEvictsTheOldestOfAll) {
  constexpr size_t kFrame = kMiBUnit;
  constexpr size_t kFrames = 64;
  FrameCache cache(kFrames * kFrame);  // several shards
  const std::vector<FrameKey> same_shard = ids_of_one_shard(kFrames);
  for (size_t i = 0; i < kFrames; ++i) {
    ASSERT_TRUE(cache.get(same_shard[i], [] { return bytes_of(kFrame, 's'); }));
  }
  FrameCache::Stats st = cache.stats();
  EXPECT_EQ(st.frames, kFrames);
  EXPECT_EQ(st.bytes, kFrames * kFrame);
  EXPECT_EQ(st.evictions, 0u);

  // Frames in other shards push the oldest ones out, oldest first, wherever
  // they are; a frame used again stays.
  ASSERT_NE(cache.find(same_shard[0]), nullptr);  // now the most recent
  std::vector<FrameKey> others;
  for (uint64_t i = 0; others.size() < 3; ++i) {
    const FrameKey id = id_of("other " + std::to_string(i));
    if (BlobIdHash{}(id.id) % 16 != 0) others.push_back(id);
  }
  for (size_t k = 0; k < others.size(); ++k) {
    ASSERT_TRUE(cache.get(others[k], [] { return bytes_of(kFrame, 'o'); }));
    st = cache.stats();
    EXPECT_EQ(st.evictions, k + 1);
    EXPECT_EQ(st.bytes, kFrames * kFrame);
    EXPECT_EQ(cache.find(same_shard[k + 1]), nullptr) << "frame " << k + 1 << " was the least recently used";
  }
  EXPECT_NE(cache.find(same_shard[0]), nullptr);
  EXPECT_NE(cache.find(same_shard[4]), nullptr);
  for (const FrameKey& id : others) EXPECT_NE(cache.find(id), nullptr);
}

// Many threads loading distinct frames at once into a small cache: it ends
// at its capacity exactly, with every count adding up (also under TSan).
TEST(FrameCache, ConcurrentLoadsIntoAFullCacheEndWithinItsCapacity) {
  constexpr size_t kFrame = 256 << 10;
  constexpr size_t kKept = 96;  // 24 MiB: two shards
  FrameCache cache(kKept * kFrame);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 100;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const FrameKey id = id_of("t" + std::to_string(t) + " f" + std::to_string(i));
        auto f = cache.get(id, [&] { return bytes_of(kFrame, static_cast<char>('a' + t)); });
        if (!f || (**f)[kFrame - 1] != 'a' + t) failures.fetch_add(1);
        // Now and then a frame of another thread is used again.
        if (i % 7 == 0) (void)cache.find(id_of("t" + std::to_string((t + 1) % kThreads) + " f" + std::to_string(i / 2)));
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  const FrameCache::Stats st = cache.stats();
  EXPECT_EQ(st.misses, static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(st.frames, kKept);
  EXPECT_EQ(st.bytes, kKept * kFrame);
  EXPECT_EQ(st.evictions, kThreads * kPerThread - kKept);
}

TEST(FrameCache, AFrameHeldByACallerOutlivesItsEviction) {
  constexpr size_t kFrame = 1 << 20;
  FrameCache cache(kFrame);
  auto held = cache.get(id_of("a"), [] { return bytes_of(kFrame, 'a'); });
  ASSERT_TRUE(held);
  ASSERT_TRUE(cache.get(id_of("b"), [] { return bytes_of(kFrame, 'b'); }));
  EXPECT_EQ(cache.find(id_of("a")), nullptr);
  EXPECT_EQ((**held)[kFrame - 1], 'a');
}

// Frame memory comes in 2 MiB chunks of equal slots per size (frame_buffer.h):
// when a daemon's frames shift from one size to another, the old size's
// chunks empty only as its last frames go. Meanwhile their free slots count
// against the budget beyond an allowance of one chunk per slot size, so the
// oldest frames go sooner (without that: 98 MiB mapped for this 64 MiB
// cache); once the shift is done the memory mapped is the budget again, the
// emptied chunks not kept on top of the ones in use (they were: 100 MiB).
TEST(FrameCache, FrameMemoryStaysNearTheBudgetWhileTheFramesHeldShiftToAnotherSizeAndReturnsToIt) {
  constexpr uint64_t kCapacity = 64 * kMiBUnit;                     // 32 chunks (8 under ThreadSanitizer)
  constexpr uint64_t kFreeSlotAllowance = 6 * FrameBuffer::kChunk;  // FrameCache's: a chunk per slot size
  constexpr size_t kOld = 512 << 10, kNew = 1 << 20;
  FrameBuffer::release_empty_chunks();
  const uint64_t keep = FrameBuffer::keep_empty_bytes();
  FrameBuffer::set_keep_empty_bytes(kCapacity);  // what a Server does for its cache
  const FrameBuffer::Totals before = FrameBuffer::totals();
  {
    FrameCache cache(kCapacity);
    const auto load = [&](const std::string& name, size_t n, char c) {
      ASSERT_TRUE(cache.get(id_of(name), [&] { return bytes_of(n, c); }));
    };
    const int old_frames = static_cast<int>(kCapacity / kOld), new_frames = static_cast<int>(kCapacity / kNew);
    for (int i = 0; i < old_frames; ++i) load("old" + std::to_string(i), kOld, static_cast<char>(i));
    // Used in random order, so that evicting the oldest frees slots all over
    // the chunks rather than one chunk after another.
    std::mt19937 rng(7);
    for (int k = 0; k < 4 * old_frames; ++k) {
      const int i = static_cast<int>(rng() % old_frames);
      load("old" + std::to_string(i), kOld, static_cast<char>(i));
    }
    EXPECT_EQ(FrameBuffer::totals().mapped_bytes - before.mapped_bytes, kCapacity);
    uint64_t peak = 0;
    for (int i = 0; i < new_frames; ++i) {
      load("new" + std::to_string(i), kNew, static_cast<char>(100 + i));
      const FrameBuffer::Totals now = FrameBuffer::totals();
      peak = std::max(peak, now.mapped_bytes - before.mapped_bytes);
      EXPECT_EQ(now.free_slot_bytes, FrameBuffer::count_free_slot_bytes()) << "the pool's running count is off";
    }
    // Every old frame is gone, every new one is held with its bytes.
    for (int i = 0; i < old_frames; ++i) EXPECT_EQ(cache.find(id_of("old" + std::to_string(i))), nullptr) << i;
    for (int i = 0; i < new_frames; ++i) {
      auto f = cache.find(id_of("new" + std::to_string(i)));
      ASSERT_NE(f, nullptr) << i;
      EXPECT_EQ((*f)[0], static_cast<char>(100 + i));
      EXPECT_EQ((*f)[kNew - 1], static_cast<char>(100 + i));
    }
    EXPECT_EQ(cache.stats().bytes, kCapacity);
    // Memory mapped: the new frames' chunks, and nothing kept empty beside them.
    const FrameBuffer::Totals after = FrameBuffer::totals();
    EXPECT_EQ(after.mapped_bytes - before.mapped_bytes, kCapacity) << "peak during the shift: " << peak;
    EXPECT_EQ(after.chunks_empty, 0u);
    // While the sizes shifted: over the budget by at most the allowance.
    EXPECT_GT(peak, kCapacity);
    EXPECT_LE(peak, kCapacity + kFreeSlotAllowance);
  }
  // The cache dropped: its chunks are kept empty, up to the limit.
  EXPECT_EQ(FrameBuffer::totals().mapped_bytes - before.mapped_bytes, kCapacity);
  FrameBuffer::set_keep_empty_bytes(keep);
  FrameBuffer::release_empty_chunks();
}

TEST(FrameCache, FindNeverLoadsAndAFrameLargerThanTheCacheIsNotKept) {
  FrameCache cache(1 << 20);
  EXPECT_EQ(cache.find(id_of("z")), nullptr);
  EXPECT_EQ(cache.stats().misses, 0u);
  auto big = cache.get(id_of("big"), [] { return bytes_of(2 << 20, 'B'); });
  ASSERT_TRUE(big);
  EXPECT_EQ((*big)->size(), 2u << 20);
  EXPECT_EQ(cache.find(id_of("big")), nullptr);
  EXPECT_EQ(cache.stats().bytes, 0u);
}

TEST(FrameCache, LoadAheadNeverWaitsAndAGetDuringItSharesItsLoad) {
  FrameCache cache(64 << 20);
  HeldLoader held;
  auto held_loader = held.returning([] { return bytes_of(4096, 'a'); });
  std::atomic<int>& loads = held.loads;
  auto ahead = std::async(std::launch::async, [&] { return cache.load_ahead(id_of("x"), held_loader); });
  ASSERT_TRUE(eventually([&] { return loads.load() == 1; }));
  // Another load ahead of the same frame returns at once, having done nothing.
  auto again = cache.load_ahead(id_of("x"), held_loader);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, nullptr);
  auto wanted = std::async(std::launch::async, [&] { return cache.get(id_of("x"), held_loader); });
  ASSERT_TRUE(eventually([&] { return cache.stats().waits == 1; }));
  held.open();
  auto a = ahead.get();
  auto w = wanted.get();
  ASSERT_TRUE(a && w);
  ASSERT_NE(*a, nullptr);
  EXPECT_EQ(a->get(), w->get()) << "the get() had the frame of the load ahead";
  EXPECT_EQ(loads.load(), 1);
  // Held now: nothing to do.
  auto resident = cache.load_ahead(id_of("x"), held_loader);
  ASSERT_TRUE(resident);
  EXPECT_EQ(*resident, nullptr);
  EXPECT_EQ(loads.load(), 1);
}

// --- ImageSource ----------------------------------------------------------

class ImageSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_.path();
    // 600 pages: data, zero runs, and a last frame that is not full.
    std::mt19937_64 rng(5);
    memory_.resize(600 * 4096);
    for (size_t p = 0; p < 600; ++p) {
      if (p % 7 == 3 || (p >= 200 && p < 260)) continue;  // zero pages
      for (size_t i = 0; i < 4096; i += 8) {
        const uint64_t v = rng();
        std::memcpy(&memory_[p * 4096 + i], &v, 8);
      }
    }
    std::ofstream(dir_ + "/mem", std::ios::binary)
        .write(reinterpret_cast<const char*>(memory_.data()), static_cast<std::streamsize>(memory_.size()));
    auto store = LocalStore::open(dir_ + "/store", true);
    ASSERT_TRUE(store);
    CreateOptions o;
    o.memory_path = dir_ + "/mem";
    o.name = "base";
    ASSERT_TRUE(create_image(**store, o));
  }

  std::shared_ptr<ImageSource> open(std::shared_ptr<FrameCache> cache) {
    auto store = LocalStore::open(dir_ + "/store", false);
    EXPECT_TRUE(store);
    auto src = ImageSource::open(std::move(*store), "base", std::move(cache));
    EXPECT_TRUE(src) << src.error().describe();
    return src ? *src : nullptr;
  }

  // Reads every entry of `plan` as a prefetch would, each page checked
  // against the file, reporting each to `ahead` once read.
  void read_plan(const ImageSource& src, ReadAhead& ahead, const std::vector<SourceRange>& plan) {
    std::vector<uint8_t> page(4096);
    for (size_t k = 0; k < plan.size(); ++k) {
      ASSERT_TRUE(src.read(plan[k].offset, page));
      ASSERT_EQ(std::memcmp(page.data(), memory_.data() + plan[k].offset, 4096), 0) << plan[k].offset;
      ahead.consumed(k, k + 1);
    }
  }

  faultline::testing::TempDir scratch_;
  std::string dir_;
  std::vector<uint8_t> memory_;
};

// Writes an image of one frame, `blob`, holding `frame_pages` pages (true
// or not) of a guest of 128 pages, the rest zero; with `checksum` as the
// frame's XXH3 (default: the blob's).
void write_one_frame_image(LocalStore& store, const std::string& name, const std::string& blob, uint32_t frame_pages,
                           std::optional<uint64_t> checksum = std::nullopt) {
  Manifest m;
  m.page_size = 4096;
  m.guest_bytes = 128 * 4096;
  m.frame_pages = 128;
  m.stored_pages = frame_pages;
  m.frames.push_back(FrameRef{BlobId::of(blob), blob.size(), frame_pages, checksum.value_or(frame_checksum(blob))});
  m.runs = {PageRun{PageKind::kStored, frame_pages, 0}};
  if (frame_pages < 128) m.runs.push_back(PageRun{PageKind::kZero, 128 - frame_pages, 0});
  auto bytes = serialize_manifest(m);
  ASSERT_TRUE(bytes) << bytes.error().describe();
  ASSERT_TRUE(store.write_manifest(name, *bytes));
}

std::shared_ptr<ImageSource> open_image(const std::string& store_dir, const std::string& name,
                                        std::shared_ptr<FrameCache> cache) {
  auto store = LocalStore::open(store_dir, false);
  EXPECT_TRUE(store);
  auto src = ImageSource::open(std::move(*store), name, std::move(cache));
  EXPECT_TRUE(src) << src.error().describe();
  return src ? *src : nullptr;
}

// A manifest that names another image's blob with more pages than it holds
// is refused on its own; with the blob already in the shared cache (the
// other image loaded it), a hit must not hand it the smaller frame either,
// whose pages past the end a copy would read (found by review: ASan saw a
// heap-buffer-overflow there).
TEST(FrameCacheSharing, ABlobNamedWithAnotherSizeIsNeverTheFrameAnotherImageLoaded) {
  faultline::testing::TempDir dir;
  const std::string store_dir = dir.path() + "/store";
  auto store = LocalStore::open(store_dir, true);
  ASSERT_TRUE(store);
  FrameCompressor compressor(3);
  auto blob = compressor.compress(std::string(2 * 4096, '\x5a'));
  ASSERT_TRUE(blob);
  ASSERT_TRUE((*store)->put(BlobId::of(*blob), *blob));
  write_one_frame_image(**store, "honest", *blob, 2);
  write_one_frame_image(**store, "liar", *blob, 128);

  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto honest = open_image(store_dir, "honest", cache);
  auto liar = open_image(store_dir, "liar", cache);
  ASSERT_TRUE(honest && liar);
  std::vector<uint8_t> page(4096, 0xEE);
  for (int round = 0; round < 2; ++round) {  // before and after the honest image loads the blob
    if (round == 1) {
      ASSERT_TRUE(honest->read(4096, page));
      EXPECT_EQ(page, std::vector<uint8_t>(4096, 0x5a));
      std::fill(page.begin(), page.end(), 0xEE);
    }
    for (uint64_t p : {3u, 100u}) {
      auto r = liar->read(p * 4096, page);
      ASSERT_FALSE(r) << "round " << round << ", page " << p;
      EXPECT_FALSE(r.error().retryable);
      EXPECT_NE(r.error().message.find("liar"), std::string::npos) << r.error().message;
      EXPECT_NE(r.error().message.find("the manifest is wrong"), std::string::npos) << r.error().message;
      EXPECT_EQ(page, std::vector<uint8_t>(4096, 0xEE)) << "no byte handed out";
    }
  }
  EXPECT_EQ(cache->stats().frames, 1u) << "only the honest image's frame is held";
}

// Two stores that hold different bytes under one blob name (a damaged or a
// hostile store: a blob on local disk is checked against its manifest's XXH3
// checksum, which its own manifest can give for any bytes): an image of each
// reads its own store's bytes, whichever loads first into the shared cache.
// Images of one store still share the frame.
TEST(FrameCacheSharing, AFrameIsSharedOnlyBetweenImagesOfOneStore) {
  faultline::testing::TempDir dir;
  FrameCompressor compressor(3);
  auto good = compressor.compress(std::string(128 * 4096, '\x11'));
  auto other = compressor.compress(std::string(128 * 4096, '\x66'));
  ASSERT_TRUE(good && other);
  const BlobId id = BlobId::of(*good);
  auto honest_store = LocalStore::open(dir.path() + "/honest", true);
  auto hostile_store = LocalStore::open(dir.path() + "/hostile", true);
  ASSERT_TRUE(honest_store && hostile_store);
  ASSERT_TRUE((*honest_store)->put(id, *good));
  write_one_frame_image(**honest_store, "base", *good, 128);
  write_one_frame_image(**honest_store, "twin", *good, 128);
  // The hostile store's file of that name holds the other bytes, and its
  // manifest names the good id with the other bytes' checksum and size.
  {
    const std::string path = (*hostile_store)->describe(id);
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream(path, std::ios::binary).write(other->data(), static_cast<std::streamsize>(other->size()));
    Manifest m;
    m.page_size = 4096;
    m.guest_bytes = 128 * 4096;
    m.frame_pages = 128;
    m.stored_pages = 128;
    m.frames.push_back(FrameRef{id, other->size(), 128, frame_checksum(*other)});
    m.runs = {PageRun{PageKind::kStored, 128, 0}};
    auto bytes = serialize_manifest(m);
    ASSERT_TRUE(bytes);
    ASSERT_TRUE((*hostile_store)->write_manifest("base", *bytes));
  }
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto hostile = open_image(dir.path() + "/hostile", "base", cache);
  auto honest = open_image(dir.path() + "/honest", "base", cache);
  auto twin = open_image(dir.path() + "/honest", "twin", cache);
  ASSERT_TRUE(hostile && honest && twin);
  std::vector<uint8_t> page(4096);
  ASSERT_TRUE(hostile->read(5 * 4096, page));
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0x66)) << "the hostile store serves its own bytes to its own image";
  ASSERT_TRUE(honest->read(5 * 4096, page));
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0x11)) << "never the frame the other store put in the cache";
  const uint64_t misses = cache->stats().misses;
  ASSERT_TRUE(twin->read(7 * 4096, page));
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0x11));
  EXPECT_EQ(cache->stats().misses, misses) << "an image of the same store shares the frame held";
}

TEST_F(ImageSourceTest, ReadsMatchTheFileAcrossPageAndFrameBoundaries) {
  auto src = open(std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(src);
  ASSERT_EQ(src->size(), memory_.size());
  // Unaligned starts and lengths, spans over zero runs and frame edges (128
  // pages per frame).
  const std::pair<uint64_t, uint64_t> reads[] = {
      {0, 4096}, {127 * 4096 + 100, 8192}, {190 * 4096, 80 * 4096}, {599 * 4096, 4096}, {1, memory_.size() - 1}};
  for (auto [offset, length] : reads) {
    std::vector<uint8_t> out(length, 0xEE);
    ASSERT_TRUE(src->read(offset, out)) << offset;
    EXPECT_EQ(std::memcmp(out.data(), memory_.data() + offset, length), 0) << "offset " << offset;
  }
  std::vector<uint8_t> past(8192);
  EXPECT_FALSE(src->read(memory_.size() - 4096, past));
}

TEST_F(ImageSourceTest, ReadIfCachedNeverLoadsAFrame) {
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto src = open(cache);
  ASSERT_TRUE(src);
  std::vector<uint8_t> page(4096);
  auto cold = src->read_if_cached(0, page);
  ASSERT_TRUE(cold);
  EXPECT_FALSE(*cold);
  EXPECT_EQ(cache->stats().misses, 0u);
  // A zero page needs no frame.
  auto zero = src->read_if_cached(3 * 4096, page);
  ASSERT_TRUE(zero);
  EXPECT_TRUE(*zero);
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0));
  ASSERT_TRUE(src->read(0, page));                  // loads frame 0
  auto warm = src->read_if_cached(5 * 4096, page);  // same frame
  ASSERT_TRUE(warm);
  EXPECT_TRUE(*warm);
  EXPECT_EQ(std::memcmp(page.data(), memory_.data() + 5 * 4096, 4096), 0);
  EXPECT_EQ(cache->stats().misses, 1u);
}

// A demand fault's window (PageSource::read_window) loads at most the frame
// of its first page; after it, pages are read while they are zero, in that
// frame or in a frame already in memory.
TEST_F(ImageSourceTest, AWindowLoadsOnlyItsFirstPagesFrameAndReadsOnOverFramesInMemory) {
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto src = open(cache);
  ASSERT_TRUE(src);
  const ImageChain& chain = src->chain();
  // The first stored page of frame 1 (frame 0 holds 128 stored pages) and a
  // window that starts 8 guest pages before it, in frame 0.
  uint64_t boundary = 0;
  while (chain.locate(boundary).zero || chain.locate(boundary).frame != 1) ++boundary;
  uint64_t start = boundary - 8;
  while (chain.locate(start).zero) --start;
  ASSERT_EQ(chain.locate(start).frame, 0u);
  const uint64_t window_pages = 32;
  std::vector<uint8_t> out(window_pages * 4096, 0xEE);
  auto expect_bytes = [&](uint64_t pages) {
    EXPECT_EQ(std::memcmp(out.data(), memory_.data() + start * 4096, pages * 4096), 0);
  };

  // From memory only, with frame 0 not loaded: nothing, and nothing loaded.
  auto none = src->read_window(start * 4096, out, 4096, /*cached_only=*/true);
  ASSERT_TRUE(none) << none.error().describe();
  EXPECT_EQ(*none, 0u);
  EXPECT_EQ(cache->stats().misses, 0u);

  // Loading allowed: frame 0 is loaded, frame 1 is not, and the window ends
  // where frame 1 begins.
  auto first = src->read_window(start * 4096, out, 4096, /*cached_only=*/false);
  ASSERT_TRUE(first) << first.error().describe();
  EXPECT_EQ(*first, (boundary - start) * 4096);
  expect_bytes(boundary - start);
  EXPECT_EQ(cache->stats().misses, 1u);

  // With frame 1 in memory, the whole window is read, even from memory only.
  std::vector<uint8_t> page(4096);
  ASSERT_TRUE(src->read(boundary * 4096, page));
  EXPECT_EQ(cache->stats().misses, 2u);
  auto whole = src->read_window(start * 4096, out, 4096, /*cached_only=*/true);
  ASSERT_TRUE(whole) << whole.error().describe();
  EXPECT_EQ(*whole, window_pages * 4096);
  expect_bytes(window_pages);

  // A window that starts on a zero page (the run 200-259) loads nothing: it
  // ends before the first stored page of a frame not in memory.
  auto fresh_cache = std::make_shared<FrameCache>(64 << 20);
  auto fresh = open(fresh_cache);
  ASSERT_TRUE(fresh);
  auto zeros = fresh->read_window(230 * 4096, out, 4096, /*cached_only=*/false);
  ASSERT_TRUE(zeros) << zeros.error().describe();
  EXPECT_EQ(*zeros, 30u * 4096);
  EXPECT_EQ(std::vector<uint8_t>(out.begin(), out.begin() + 30 * 4096), std::vector<uint8_t>(30 * 4096, 0));
  EXPECT_EQ(fresh_cache->stats().misses, 0u);
}

TEST_F(ImageSourceTest, ExtentsAndZeroRangesComeFromTheManifest) {
  auto src = open(std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(src);
  EXPECT_TRUE(src->known_zero(3 * 4096, 4096));
  EXPECT_TRUE(src->known_zero(200 * 4096, 60 * 4096));
  EXPECT_FALSE(src->known_zero(198 * 4096, 3 * 4096));  // 198 holds data, 199 and 200 are zero
  EXPECT_FALSE(src->known_zero(0, 4096));
  const SourceExtent z = src->extent(200 * 4096);
  EXPECT_EQ(z.kind, SourceExtent::Kind::kZero);
  EXPECT_EQ(z.length, 60u * 4096);
  const SourceExtent d = src->extent(0);
  EXPECT_EQ(d.kind, SourceExtent::Kind::kData);
  EXPECT_EQ(d.length, 3u * 4096);  // page 3 is zero
}

TEST_F(ImageSourceTest, ADamagedFrameIsAFinalErrorNamingTheImageAndBlob) {
  auto src = open(std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(src);
  const BlobId id = src->chain().layers()[0].manifest.frames[1].id;
  std::string path;
  for (auto& e : std::filesystem::recursive_directory_iterator(dir_ + "/store/blobs")) {
    if (e.path().filename() == id.hex()) path = e.path();
  }
  ASSERT_FALSE(path.empty());
  std::filesystem::permissions(path, std::filesystem::perms::owner_write, std::filesystem::perm_options::add);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(20);
    f.put('\x5a');
  }
  uint64_t in_frame1 = 0;
  while (src->chain().locate(in_frame1).zero || src->chain().locate(in_frame1).frame != 1) ++in_frame1;
  std::vector<uint8_t> page(4096, 0xEE);
  auto r = src->read(in_frame1 * 4096, page);
  ASSERT_FALSE(r);
  EXPECT_FALSE(r.error().retryable);
  EXPECT_NE(r.error().message.find(id.hex()), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("base"), std::string::npos) << r.error().message;
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0xEE)) << "no byte of a damaged frame is handed out";
  // Frame 0 is intact.
  ASSERT_TRUE(src->read(0, page));
}

TEST_F(ImageSourceTest, AStoreOutOfFileDescriptorsIsARetryableError) {
  auto src = open(std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(src);
  // The store cannot open the blob (EMFILE), as a busy daemon may for a moment.
  std::vector<uint8_t> page(4096);
  auto r = faultline::testing::with_no_free_fd([&] { return src->read(0, page); });
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EMFILE) << r.error().describe();
  EXPECT_TRUE(r.error().retryable);
  ASSERT_TRUE(src->read(0, page));
  EXPECT_EQ(std::memcmp(page.data(), memory_.data(), 4096), 0);
}

// Every page of the image in order, as a plan of 4 KiB reads.
std::vector<SourceRange> every_page(uint64_t bytes) {
  std::vector<SourceRange> plan;
  for (uint64_t off = 0; off < bytes; off += 4096) plan.push_back({off, 4096});
  return plan;
}

TEST_F(ImageSourceTest, ReadAheadLoadsEveryFrameOfThePlanOnceAndEachIsUsed) {
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto src = open(cache);
  ASSERT_TRUE(src);
  const std::vector<SourceRange> plan = every_page(memory_.size());
  auto ahead = src->read_ahead(plan, {.fetches = 4});
  ASSERT_NE(ahead, nullptr);
  const uint64_t frames = src->chain().layers()[0].manifest.frames.size();
  ASSERT_GT(frames, 2u);
  // The window (a quarter of 64 MiB) holds them all: every frame loads
  // before the reader reads anything.
  ASSERT_TRUE(eventually([&] { return ahead->stats().loaded == frames; }));
  ASSERT_NO_FATAL_FAILURE(read_plan(*src, *ahead, plan));
  ahead->stop();
  const ReadAheadStats st = ahead->stats();
  EXPECT_EQ(st.loaded, frames);
  EXPECT_EQ(st.used, frames);
  EXPECT_EQ(st.evicted_unused, 0u);
  EXPECT_EQ(st.failed, 0u);
  EXPECT_EQ(cache->stats().misses, frames) << "each frame loaded once, ahead";
}

// A cache of 3 frames (one shard) and 4 in the plan: read-ahead stays
// within a quarter of the cache (one frame) ahead of the reader, so nothing
// it loads is pushed out before it is read, and no frame loads twice.
TEST_F(ImageSourceTest, ReadAheadStaysWithinItsWindowSoNothingItLoadsIsEvictedUnused) {
  auto cache = std::make_shared<FrameCache>(3 * 128 * 4096);
  auto src = open(cache);
  ASSERT_TRUE(src);
  const uint64_t frames = src->chain().layers()[0].manifest.frames.size();
  ASSERT_GT(frames, 3u) << "more frames than the cache holds";
  const std::vector<SourceRange> plan = every_page(memory_.size());
  auto ahead = src->read_ahead(plan, {.fetches = 4});
  ASSERT_NE(ahead, nullptr);
  ASSERT_NO_FATAL_FAILURE(read_plan(*src, *ahead, plan));
  ahead->stop();
  const ReadAheadStats st = ahead->stats();
  EXPECT_EQ(st.evicted_unused, 0u);
  EXPECT_EQ(st.used, st.loaded);
  EXPECT_EQ(cache->stats().misses, frames) << "a frame was loaded twice";
}

// A local store's loads are bound by the CPU that reads, hashes and
// decompresses them: a read-ahead over one runs at most one load per CPU
// this process may use, however many were asked for, and never more than
// were asked for; every frame still loads once and reads right.
TEST_F(ImageSourceTest, ReadAheadFromALocalStoreRunsAtMostOneLoadPerCpu) {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  ASSERT_EQ(::sched_getaffinity(0, sizeof(cpus), &cpus), 0);
  const int cpu_count = CPU_COUNT(&cpus);
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto src = open(cache);
  ASSERT_TRUE(src);
  const std::vector<SourceRange> plan = every_page(memory_.size());
  auto many = src->read_ahead(plan, {.fetches = cpu_count + 30});
  ASSERT_NE(many, nullptr);
  EXPECT_EQ(many->stats().fetches, cpu_count);
  const uint64_t frames = src->chain().layers()[0].manifest.frames.size();
  ASSERT_TRUE(eventually([&] { return many->stats().loaded == frames; }));
  ASSERT_NO_FATAL_FAILURE(read_plan(*src, *many, plan));
  many->stop();
  EXPECT_EQ(cache->stats().misses, frames) << "each frame loaded once, ahead";
  auto other = open(std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(other);
  auto one = other->read_ahead(plan, {.fetches = 1});
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(one->stats().fetches, 1);
}

TEST_F(ImageSourceTest, ReadAheadStopsWhenCancelledAndOnStopWithLoadsLeft) {
  auto cache = std::make_shared<FrameCache>(64 << 20);
  auto src = open(cache);
  ASSERT_TRUE(src);
  const std::atomic<bool> cancelled{true};
  auto none = src->read_ahead(every_page(memory_.size()), {.fetches = 4, .cancelled = &cancelled});
  ASSERT_NE(none, nullptr);
  none->stop();
  EXPECT_EQ(none->stats().loaded, 0u) << "a cancelled read-ahead starts no load";
  EXPECT_EQ(cache->stats().misses, 0u);
  // Destroyed mid-plan, never consumed: its threads are joined.
  auto ahead = src->read_ahead(every_page(memory_.size()), {.fetches = 2});
  ASSERT_NE(ahead, nullptr);
  ahead.reset();
}

// A store whose blob reads never answer by themselves (a bucket that takes
// requests and never replies): each read waits until its thread's deadline
// passes or its scope is cancelled (common/deadline.h; the S3 client does
// the same, tests/s3_test.cc), or until the test releases it.
class StallingStore final : public faultline::testing::DelegatingStore {
 public:
  using DelegatingStore::DelegatingStore;
  std::atomic<int> waiting{0};           // reads stalled now
  std::atomic<int> without_deadline{0};  // reads made with no ScopedDeadline
  std::atomic<bool> released{false};
  Result<std::string> get(const BlobId& id) override {
    const std::optional<ThreadDeadline> deadline = current_deadline();
    if (!deadline) without_deadline.fetch_add(1);
    waiting.fetch_add(1);
    while (!released.load() && !(deadline && deadline->passed())) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a store's wait, not an ordering
    }
    waiting.fetch_sub(1);
    if (released.load()) return DelegatingStore::get(id);
    return std::unexpected(Error{deadline->cancelled() ? ECANCELED : ETIMEDOUT, "stalled read given up", true});
  }
};

// A read-ahead whose loads wait on a store that never answers: stop()
// cancels the loads in flight instead of waiting for the store (a session's
// teardown waited for every GET's timeouts and retries, ~50 s), and so does
// the reader's flag (its session stopping) without a stop(). Every load ran
// under a deadline.
TEST_F(ImageSourceTest, ReadAheadLoadsInFlightAreCancelledByStopAndByTheReadersFlag) {
  for (const bool by_flag : {false, true}) {
    SCOPED_TRACE(by_flag ? "the reader's flag" : "stop()");
    auto local = LocalStore::open(dir_ + "/store", false);
    ASSERT_TRUE(local);
    auto stalling = std::make_unique<StallingStore>(std::move(*local));
    StallingStore& store = *stalling;
    auto src = ImageSource::open(std::move(stalling), "base", std::make_shared<FrameCache>(64 << 20));
    ASSERT_TRUE(src) << src.error().describe();
    std::atomic<bool> cancelled{false};
    auto ahead = (*src)->read_ahead(every_page(memory_.size()), {.fetches = 2, .cancelled = &cancelled});
    ASSERT_NE(ahead, nullptr);
    const OnExit release{[&] { store.released.store(true); }};  // after `ahead`: a failed ASSERT lets it be joined
    ASSERT_TRUE(eventually([&] { return store.waiting.load() == 2; }));
    std::future<void> stopped = std::async(std::launch::async, [&] {
      if (by_flag) {
        cancelled.store(true);
        ASSERT_TRUE(eventually([&] { return ahead->stats().failed == 2; }));
      }
      ahead->stop();
    });
    // Bounded, not timed: without the cancellation this waits forever.
    const bool done = stopped.wait_for(std::chrono::seconds(30)) == std::future_status::ready;
    store.released.store(true);  // lets a failed test end
    stopped.get();
    ASSERT_TRUE(done) << "the read-ahead waited for its stalled loads";
    const ReadAheadStats st = ahead->stats();
    EXPECT_EQ(st.failed, 2u);
    EXPECT_EQ(st.loaded, 0u);
    EXPECT_EQ(store.without_deadline.load(), 0);
  }
}

// With a load deadline (a session's store deadline), each load of a
// read-ahead gives up by itself when the store does not answer in time; the
// read-ahead goes on with the next frames.
TEST_F(ImageSourceTest, ReadAheadLoadsGiveUpAtTheirDeadline) {
  auto local = LocalStore::open(dir_ + "/store", false);
  ASSERT_TRUE(local);
  auto stalling = std::make_unique<StallingStore>(std::move(*local));
  StallingStore& store = *stalling;
  auto src = ImageSource::open(std::move(stalling), "base", std::make_shared<FrameCache>(64 << 20));
  ASSERT_TRUE(src) << src.error().describe();
  auto ahead =
      (*src)->read_ahead(every_page(memory_.size()), {.fetches = 1, .load_deadline = std::chrono::milliseconds(50)});
  ASSERT_NE(ahead, nullptr);
  const OnExit release{[&] { store.released.store(true); }};  // after `ahead`: a failed ASSERT lets it be joined
  ASSERT_TRUE(eventually([&] { return ahead->stats().failed >= 2; })) << "the loads did not give up by themselves";
  store.released.store(true);
  ahead->stop();
  EXPECT_EQ(store.without_deadline.load(), 0);
}

}  // namespace
}  // namespace faultline::image
