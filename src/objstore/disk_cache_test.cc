// DiskCache and CachedStore over a local store standing in for the bucket
// (the cache does not care where misses go; tests/s3_test.cc runs it in
// front of a real gateway): bounded LRU with every byte checked, a restart
// over a warm cache, damaged and half-written files, concurrent use, a full
// disk, and blob files kept out of the page cache (O_DIRECT) where the file
// system allows it and written through it where it does not.
#include "objstore/disk_cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "common/atomic_file.h"
#include "image/frame.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "tests/capability.h"
#include "tests/delegating_store.h"
#include "tests/no_free_fd.h"
#include "tests/temp_dir.h"

namespace faultline::objstore {
namespace {

using image::BlobId;

using faultline::testing::TempDir;

std::string blob(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  std::mt19937_64 rng(seed);
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// Counts the inner store's blob reads; with `damage` set, flips a byte of
// every blob it returns (a body damaged on the way).
class CountingStore final : public faultline::testing::DelegatingStore {
 public:
  using DelegatingStore::DelegatingStore;
  std::atomic<int> gets{0};
  std::atomic<bool> damage{false};
  Result<std::string> get(const BlobId& id) override {
    gets.fetch_add(1);
    auto bytes = DelegatingStore::get(id);
    if (bytes && damage.load() && !bytes->empty()) (*bytes)[bytes->size() / 2] ^= 0x20;
    return bytes;
  }
};

TEST(DiskCache, KeepsTheMostRecentlyUsedBlobsWithinItsBoundAndReturnsTheirExactBytes) {
  TempDir dir;
  constexpr size_t kBlob = 64 * 1024;
  auto cache = DiskCache::open(dir.path() + "/cache", 3 * kBlob);
  ASSERT_TRUE(cache) << cache.error().describe();
  std::vector<std::string> blobs;
  std::vector<BlobId> ids;
  for (int i = 0; i < 5; ++i) {
    blobs.push_back(blob(kBlob, i));
    ids.push_back(BlobId::of(blobs.back()));
  }
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*cache)->put(ids[i], blobs[i]));
  ASSERT_TRUE((*cache)->get(ids[0]));  // 0 is now the most recently used: 1 goes first
  ASSERT_TRUE((*cache)->put(ids[3], blobs[3]));
  ASSERT_TRUE((*cache)->put(ids[4], blobs[4]));
  EXPECT_FALSE((*cache)->get(ids[1]));
  EXPECT_FALSE((*cache)->get(ids[2]));
  for (int i : {0, 3, 4}) {
    auto got = (*cache)->get(ids[i]);
    ASSERT_TRUE(got) << "blob " << i;
    EXPECT_TRUE(*got == blobs[i]) << "blob " << i;
  }
  const auto s = (*cache)->stats();
  EXPECT_EQ(s.blobs, 3u);
  EXPECT_EQ(s.bytes, 3 * kBlob);
  EXPECT_EQ(s.evictions, 2u);
  // The directory holds exactly what the index says.
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path() + "/cache")) files += e.is_regular_file();
  EXPECT_EQ(files, 3u);
  // A blob larger than the whole cache is not kept (and evicts nothing).
  const std::string huge = blob(4 * kBlob, 9);
  auto skipped = (*cache)->put(BlobId::of(huge), huge);
  ASSERT_TRUE(skipped);
  EXPECT_FALSE(*skipped) << "put says it wrote nothing";
  EXPECT_FALSE((*cache)->get(BlobId::of(huge)));
  EXPECT_EQ((*cache)->stats().blobs, 3u);
  auto again = (*cache)->put(ids[0], blobs[0]);  // held already
  ASSERT_TRUE(again);
  EXPECT_FALSE(*again);
}

TEST(DiskCache, ARestartedCacheKnowsItsBlobsEvictsByLastUseAndDropsHalfWrittenFiles) {
  TempDir dir;
  const std::string cdir = dir.path() + "/cache";
  constexpr size_t kBlob = 4096;
  std::vector<std::string> blobs{blob(kBlob, 1), blob(kBlob, 2), blob(kBlob, 3)};
  {
    auto cache = DiskCache::open(cdir, 10 * kBlob);
    ASSERT_TRUE(cache);
    for (const auto& b : blobs) ASSERT_TRUE((*cache)->put(BlobId::of(b), b));
  }
  // Last uses, as a daemon would have left them: 1 oldest, then 2, then 0.
  auto set_mtime = [&](const std::string& b, time_t t) {
    const timespec times[2] = {{t, 0}, {t, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, (cdir + "/" + BlobId::of(b).hex()).c_str(), times, 0), 0);
  };
  set_mtime(blobs[1], 1000);
  set_mtime(blobs[2], 2000);
  set_mtime(blobs[0], 3000);
  std::ofstream(cdir + "/." + BlobId::of(blobs[0]).hex() + ".tmp-abcdef") << "half";  // a crash mid-write
  std::ofstream(cdir + "/.direct-io-probe.tmp-0123456789ab") << "probe";              // and mid-probe
  // Files that are not the cache's, dot-files too, stay where they are.
  for (const char* other : {".keep", ".bashrc", ".notes.tmp-1", "notes"}) std::ofstream(cdir + "/" + other) << other;
  auto cache = DiskCache::open(cdir, 2 * kBlob);  // a smaller bound: the oldest goes
  ASSERT_TRUE(cache);
  EXPECT_EQ((*cache)->stats().blobs, 2u);
  EXPECT_FALSE((*cache)->get(BlobId::of(blobs[1])));
  for (int i : {0, 2}) {
    auto got = (*cache)->get(BlobId::of(blobs[i]));
    ASSERT_TRUE(got);
    EXPECT_TRUE(*got == blobs[i]);
  }
  EXPECT_FALSE(std::filesystem::exists(cdir + "/." + BlobId::of(blobs[0]).hex() + ".tmp-abcdef"));
  EXPECT_FALSE(std::filesystem::exists(cdir + "/.direct-io-probe.tmp-0123456789ab"));
  for (const char* other : {".keep", ".bashrc", ".notes.tmp-1", "notes"}) {
    EXPECT_TRUE(std::filesystem::exists(cdir + "/" + other)) << other << " is not the cache's to remove";
  }
}

// A blob that cannot be read for the moment (no fd left) is a miss, and
// stays held: its file is still there, so the bound still counts it, and the
// next get reads it.
TEST(DiskCache, ABlobThatCannotBeReadForNowIsAMissAndStaysHeld) {
  TempDir dir;
  auto cache = DiskCache::open(dir.path() + "/cache", 1 << 20);
  ASSERT_TRUE(cache);
  const std::string b = blob(50000, 9);
  ASSERT_TRUE((*cache)->put(BlobId::of(b), b));
  auto missed = faultline::testing::with_no_free_fd([&] { return (*cache)->get(BlobId::of(b)); });
  EXPECT_FALSE(missed);
  EXPECT_EQ((*cache)->stats().blobs, 1u);
  EXPECT_EQ((*cache)->stats().bytes, b.size());
  auto hit = (*cache)->get(BlobId::of(b));
  ASSERT_TRUE(hit);
  EXPECT_TRUE(*hit == b);
}

// One blob `b` in a local store standing in for the bucket, read through a
// CountingStore (`inner`) and a 1 MiB disk cache.
class CachedStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto local = image::LocalStore::open(dir.path() + "/store", true);
    ASSERT_TRUE(local);
    ASSERT_TRUE((*local)->put(id, b));
    auto counting = std::make_unique<CountingStore>(std::move(*local));
    inner = counting.get();
    auto opened = DiskCache::open(dir.path() + "/cache", 1 << 20);
    ASSERT_TRUE(opened);
    cache = *opened;
    store = std::make_unique<CachedStore>(std::move(counting), cache);
  }

  TempDir dir;
  const std::string b = blob(100000, 5);
  const BlobId id = BlobId::of(b);
  CountingStore* inner = nullptr;
  std::shared_ptr<DiskCache> cache;
  std::unique_ptr<CachedStore> store;
};

TEST_F(CachedStoreTest, AMissFetchesOnceAndAHitNeverReachesTheStoreAndADamagedFileIsFetchedAgain) {
  for (int i = 0; i < 3; ++i) {
    auto got = store->get(id);
    ASSERT_TRUE(got) << got.error().describe();
    EXPECT_TRUE(*got == b);
  }
  EXPECT_EQ(inner->gets.load(), 1);
  // Damage the cached file: the cache must notice, drop it and fetch again.
  {
    std::fstream f(dir.path() + "/cache/" + id.hex(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(500);
    f.put('\x42' ^ b[500]);
  }
  auto again = store->get(id);
  ASSERT_TRUE(again);
  EXPECT_TRUE(*again == b);
  EXPECT_EQ(inner->gets.load(), 2);
  EXPECT_EQ(cache->stats().damaged, 1u);
  auto third = store->get(id);
  ASSERT_TRUE(third);
  EXPECT_TRUE(*third == b);
  EXPECT_EQ(inner->gets.load(), 2) << "the refetched blob was cached again";
}

// Given the manifest's checksum, a hit is checked against it (XXH3, not
// SHA-256): a damaged file is dropped and fetched again as before, and a
// checksum that the file does not match is never trusted over it.
TEST_F(CachedStoreTest, AHitIsCheckedAgainstTheManifestsChecksumWhenGivenOne) {
  const uint64_t sum = image::frame_checksum(b);
  ASSERT_TRUE(store->get_checked(id, sum, 0));  // a miss: fetched, hashed by name, kept
  auto hit = store->get_checked(id, sum, 0);
  ASSERT_TRUE(hit) << hit.error().describe();
  EXPECT_TRUE(hit->checked);
  EXPECT_TRUE(hit->bytes == b);
  EXPECT_EQ(inner->gets.load(), 1);
  EXPECT_EQ(cache->stats().hits, 1u);
  {
    std::fstream f(dir.path() + "/cache/" + id.hex(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(700);
    f.put('\x11' ^ b[700]);
  }
  auto refetched = store->get_checked(id, sum, 0);
  ASSERT_TRUE(refetched);
  EXPECT_TRUE(refetched->checked);
  EXPECT_TRUE(refetched->bytes == b);
  EXPECT_EQ(inner->gets.load(), 2) << "the damaged file was caught by the checksum";
  EXPECT_EQ(cache->stats().damaged, 1u);
  // A sound file and a checksum it does not match (a wrong manifest, which
  // verify reports): the cache cannot tell which is wrong, so it drops the
  // file and fetches; the blob comes back checked by its name: right bytes.
  auto mismatched = store->get_checked(id, sum ^ 1, 0);
  ASSERT_TRUE(mismatched);
  EXPECT_TRUE(mismatched->bytes == b);
  EXPECT_EQ(inner->gets.load(), 3);
  EXPECT_EQ(cache->stats().damaged, 2u);
}

// A frame read through the cache is hashed once: get_checked() says
// `checked` for what it has hashed itself (a hit, a fetch that matched its
// name), and never for bytes that did not match, which the reader must check
// (and refuse) itself; those are not kept either.
TEST_F(CachedStoreTest, GetCheckedSaysCheckedOnlyForBytesItHashedAndFoundRight) {

  inner->damage = true;
  auto damaged = store->get_checked(id, std::nullopt, 0);
  ASSERT_TRUE(damaged) << damaged.error().describe();
  EXPECT_FALSE(damaged->checked);
  EXPECT_NE(BlobId::of(damaged->bytes), id);
  EXPECT_EQ(cache->stats().bytes, 0u) << "damaged bytes were kept";

  inner->damage = false;
  auto fetched = store->get_checked(id, std::nullopt, 0);
  ASSERT_TRUE(fetched) << fetched.error().describe();
  EXPECT_TRUE(fetched->checked);
  EXPECT_TRUE(fetched->bytes == b);
  EXPECT_EQ(inner->gets.load(), 2);

  auto hit = store->get_checked(id, std::nullopt, 0);
  ASSERT_TRUE(hit) << hit.error().describe();
  EXPECT_TRUE(hit->checked);
  EXPECT_TRUE(hit->bytes == b);
  EXPECT_EQ(inner->gets.load(), 2) << "a hit reached the store";

  // A store without a cache hashes nothing on the way: the reader must.
  auto plain = image::LocalStore::open(dir.path() + "/store", false);
  ASSERT_TRUE(plain);
  auto unchecked = (*plain)->get_checked(id, std::nullopt, 0);
  ASSERT_TRUE(unchecked);
  EXPECT_FALSE(unchecked->checked);
  EXPECT_TRUE(unchecked->bytes == b);
}

// What `verify` does with a frame (load_frame, FrameCheck::kEverything)
// through the cache, which checks the read against the blob's SHA-256 name
// (it is given no checksum to check instead) so that load_frame need not
// hash it again: the right bytes from a miss and from a hit, a hit damaged
// on disk caught by its name and fetched again, bytes damaged on the way
// twice an error, and a manifest checksum that a sound blob does not match
// still found although the cache vouched for the blob. (That the frame is
// hashed once is not visible from here.)
TEST(CachedStore, VerifyThroughTheCacheFindsDamageAndAWrongManifestChecksum) {
  TempDir dir;
  std::string pages = blob(8 * 4096, 9);
  pages.replace(4096, 4096, std::string(4096, 'z'));
  image::FrameCompressor compressor(3);
  auto compressed = compressor.compress(pages);
  ASSERT_TRUE(compressed) << compressed.error().describe();
  const image::FrameRef f{BlobId::of(*compressed), compressed->size(), 8, image::frame_checksum(*compressed)};
  auto local = image::LocalStore::open(dir.path() + "/store", true);
  ASSERT_TRUE(local);
  ASSERT_TRUE((*local)->put(f.id, *compressed));
  auto counting = std::make_unique<CountingStore>(std::move(*local));
  CountingStore* inner = counting.get();
  auto cache = DiskCache::open(dir.path() + "/cache", 1 << 20);
  ASSERT_TRUE(cache);
  CachedStore store(std::move(counting), *cache);
  const auto verify = [&](const image::FrameRef& ref) {
    return image::load_frame(store, ref, 4096, "image v", image::FrameCheck::kEverything);
  };

  // A miss (fetched, hashed once by name, kept), then a hit (read back, hashed once).
  for (int i = 0; i < 2; ++i) {
    auto frame = verify(f);
    ASSERT_TRUE(frame) << frame.error().describe();
    EXPECT_TRUE(frame->view() == pages);
  }
  EXPECT_EQ(inner->gets.load(), 1);
  EXPECT_EQ((*cache)->stats().hits, 1u);
  EXPECT_EQ((*cache)->stats().damaged, 0u) << "the hit was checked by its name, not by a checksum";

  // The cached file damaged on disk: caught by its name, fetched again.
  {
    std::fstream file(dir.path() + "/cache/" + f.id.hex(), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(compressed->size() / 2));
    file.put(static_cast<char>((*compressed)[compressed->size() / 2] ^ 0x40));
  }
  auto refetched = verify(f);
  ASSERT_TRUE(refetched) << refetched.error().describe();
  EXPECT_TRUE(refetched->view() == pages);
  EXPECT_EQ(inner->gets.load(), 2);
  EXPECT_EQ((*cache)->stats().damaged, 1u);

  // A sound blob (a hit) and a manifest checksum it does not match: the
  // manifest is wrong, whatever the cache checked.
  image::FrameRef wrong = f;
  wrong.checksum = *f.checksum ^ 1;
  auto mismatch = verify(wrong);
  ASSERT_FALSE(mismatch);
  EXPECT_NE(mismatch.error().message.find("checksum"), std::string::npos) << mismatch.error().message;
  EXPECT_EQ(inner->gets.load(), 2) << "fetching again cannot mend a wrong manifest";

  // Damaged on the way, twice (the cache dropped nothing sound: evict it
  // by damaging the file again, so the read goes to the store).
  {
    std::fstream file(dir.path() + "/cache/" + f.id.hex(), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(0);
    file.put(static_cast<char>((*compressed)[0] ^ 0x40));
  }
  inner->damage = true;
  auto damaged = verify(f);
  ASSERT_FALSE(damaged);
  EXPECT_NE(damaged.error().message.find("damaged both times"), std::string::npos) << damaged.error().message;
  EXPECT_EQ(inner->gets.load(), 4);
}

TEST(CachedStore, ThreadsSharingASmallCacheAlwaysGetTheRightBytes) {
  TempDir dir;
  auto local = image::LocalStore::open(dir.path() + "/store", true);
  ASSERT_TRUE(local);
  constexpr int kBlobs = 24;
  constexpr size_t kBlob = 16 * 1024;
  std::vector<std::string> blobs;
  for (int i = 0; i < kBlobs; ++i) {
    blobs.push_back(blob(kBlob, 100 + i));
    ASSERT_TRUE((*local)->put(BlobId::of(blobs.back()), blobs.back()));
  }
  auto cache = DiskCache::open(dir.path() + "/cache", 6 * kBlob);  // a quarter of them fit
  ASSERT_TRUE(cache);
  CachedStore store(std::move(*local), *cache);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int k = 0; k < 300; ++k) {
        const int i = static_cast<int>(rng() % kBlobs);
        auto got = store.get(BlobId::of(blobs[i]));
        if (!got || *got != blobs[i]) wrong.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  const auto s = (*cache)->stats();
  EXPECT_LE(s.bytes, 6 * kBlob);
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.evictions, 0u);
  uint64_t on_disk = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path() + "/cache")) on_disk += e.file_size();
  EXPECT_LE(on_disk, 6 * kBlob);
}

// How many of the file's pages are in the page cache (mincore of a shared
// mapping of it reports the page cache's pages, not the mapping's).
size_t pages_in_page_cache(const std::string& path) {
  const size_t size = std::filesystem::file_size(path);
  if (size == 0) return 0;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return SIZE_MAX;
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return SIZE_MAX;
  const size_t pages = (size + 4095) / 4096;
  std::vector<unsigned char> resident(pages);
  size_t in_cache = SIZE_MAX;
  if (::mincore(map, size, resident.data()) == 0) {
    in_cache = 0;
    for (unsigned char r : resident) in_cache += r & 1;
  }
  ::munmap(map, size);
  return in_cache;
}

// Sizes around the 4 KiB blocks direct I/O moves, and one above the buffer
// each thread keeps (4 MiB).
const std::vector<size_t> kDirectIoSizes = {1, 4095, 4096, 4097, 12288, 512 * 1024 + 123, (4 << 20) + 1};

TEST(DiskCache, BlobsOfEverySizeStayOutOfThePageCacheWhereTheFileSystemTakesODirect) {
  TempDir dir;
  struct statfs fs {};
  ASSERT_EQ(::statfs(dir.path().c_str(), &fs), 0);
  auto cache = DiskCache::open(dir.path() + "/cache", 64 << 20);
  ASSERT_TRUE(cache);
  // tmpfs keeps every file in the page cache, O_DIRECT or not.
  FAULTLINE_REQUIRE_CAPABILITY("direct-io", fs.f_type != 0x01021994 /* TMPFS_MAGIC */ && (*cache)->direct_io(),
                               dir.path() << " is on tmpfs or on a file system that refuses O_DIRECT");
  std::vector<std::string> blobs;
  for (size_t size : kDirectIoSizes) {
    blobs.push_back(blob(size, size));
    ASSERT_TRUE((*cache)->put(BlobId::of(blobs.back()), blobs.back()));
  }
  for (const auto& b : blobs) {
    SCOPED_TRACE(b.size());
    const std::string path = dir.path() + "/cache/" + BlobId::of(b).hex();
    EXPECT_EQ(std::filesystem::file_size(path), b.size()) << "the padding to whole blocks was cut off";
    EXPECT_EQ(pages_in_page_cache(path), 0u) << "a put filled the page cache";
    auto hit = (*cache)->get(BlobId::of(b));
    ASSERT_TRUE(hit);
    EXPECT_TRUE(*hit == b);
    EXPECT_EQ(pages_in_page_cache(path), 0u) << "a hit filled the page cache";
    auto plain = read_whole_file(path);  // what any reader of the file sees
    ASSERT_TRUE(plain);
    EXPECT_TRUE(*plain == b);
  }
  EXPECT_TRUE((*cache)->direct_io());
  EXPECT_EQ((*cache)->stats().damaged, 0u);
  // A file written through the page cache (by a daemon that cached that way,
  // or an edit) reads back right too: direct reads see it.
  const std::string written_plainly = blob(70000, 7);
  ASSERT_TRUE(write_file_atomically(dir.path() + "/cache/" + BlobId::of(written_plainly).hex(), written_plainly, 0600));
  EXPECT_GT(pages_in_page_cache(dir.path() + "/cache/" + BlobId::of(written_plainly).hex()), 0u)
      << "mincore does not see the page cache: the checks above prove nothing";
  auto reopened = DiskCache::open(dir.path() + "/cache", 64 << 20);
  ASSERT_TRUE(reopened);
  auto hit = (*reopened)->get(BlobId::of(written_plainly));
  ASSERT_TRUE(hit);
  EXPECT_TRUE(*hit == written_plainly);
}

TEST(DiskCache, AFileSystemWithoutODirectIsUsedThroughThePageCache) {
  TempDir dir;
  const std::string mnt = dir.path() + "/ramfs";
  std::filesystem::create_directories(mnt);
  // ramfs has no direct I/O: open(O_DIRECT) and fcntl(O_DIRECT) fail with EINVAL.
  const bool mounted = ::mount("ramfs", mnt.c_str(), "ramfs", 0, nullptr) == 0;
  FAULTLINE_REQUIRE_CAPABILITY("root", mounted, "cannot mount a ramfs: " << std::strerror(errno));
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  auto cache = DiskCache::open(mnt + "/cache", 64 << 20);
  ASSERT_TRUE(cache);
  EXPECT_FALSE((*cache)->direct_io());
  std::vector<std::string> blobs;
  for (size_t size : kDirectIoSizes) {
    blobs.push_back(blob(size, size + 1));
    ASSERT_TRUE((*cache)->put(BlobId::of(blobs.back()), blobs.back()));
  }
  for (const auto& b : blobs) {
    SCOPED_TRACE(b.size());
    EXPECT_EQ(std::filesystem::file_size(mnt + "/cache/" + BlobId::of(b).hex()), b.size());
    auto hit = (*cache)->get(BlobId::of(b));
    ASSERT_TRUE(hit);
    EXPECT_TRUE(*hit == b);
  }
  const auto s = (*cache)->stats();
  EXPECT_EQ(s.hits, blobs.size());
  EXPECT_EQ(s.put_failures, 0u);
  EXPECT_EQ(s.damaged, 0u);
}

TEST(CachedStore, AFullDiskIsReportedOnceAndServingGoesOnWithoutCaching) {
  TempDir dir;
  const std::string mnt = dir.path() + "/small";
  std::filesystem::create_directories(mnt);
  const bool mounted = ::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") == 0;
  FAULTLINE_REQUIRE_CAPABILITY("root", mounted, "cannot mount a 256 KiB tmpfs: " << std::strerror(errno));
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  auto local = image::LocalStore::open(dir.path() + "/store", true);
  ASSERT_TRUE(local);
  std::vector<std::string> blobs;
  for (int i = 0; i < 8; ++i) {
    blobs.push_back(blob(100 * 1024, 200 + i));
    ASSERT_TRUE((*local)->put(BlobId::of(blobs.back()), blobs.back()));
  }
  auto cache = DiskCache::open(mnt + "/cache", 64 << 20);  // the bound is not what stops it: the disk is
  ASSERT_TRUE(cache);
  std::vector<Error> reported;
  // Two images of one daemon read through the same disk cache: one report
  // for the episode, not one per image.
  auto second_view = image::LocalStore::open(dir.path() + "/store", false);
  ASSERT_TRUE(second_view);
  CachedStore store(std::move(*local), *cache, [&](const Error& e) { reported.push_back(e); });
  CachedStore other(std::move(*second_view), *cache, [&](const Error& e) { reported.push_back(e); });
  for (size_t i = 0; i < blobs.size(); ++i) {
    auto got = (i % 2 == 0 ? store : other).get(BlobId::of(blobs[i]));
    ASSERT_TRUE(got) << got.error().describe();
    EXPECT_TRUE(*got == blobs[i]);
  }
  ASSERT_EQ(reported.size(), 1u) << "one report for the whole episode";
  EXPECT_EQ(reported[0].code, ENOSPC) << reported[0].describe();
  EXPECT_GT((*cache)->stats().put_failures, 0u);
  // What it did keep is whole and right.
  for (const auto& b : blobs) {
    if (auto hit = (*cache)->get(BlobId::of(b))) {
      EXPECT_TRUE(*hit == b);
    }
  }
  EXPECT_EQ((*cache)->stats().damaged, 0u);
}

}  // namespace
}  // namespace faultline::objstore
