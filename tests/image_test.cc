// Snapshot images end to end through the library: create, flatten, chains of
// diffs, Firecracker Diff files, dedup, corruption and gc against a real
// store directory. Every check compares bytes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <barrier>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "client/test_memory_file.h"
#include "common/atomic_file.h"
#include "common/unique_fd.h"
#include "image/image_chain.h"
#include "image/image_source.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "image/transfer.h"
#include "snapshot/working_set.h"
#include "tests/delegating_store.h"
#include "tests/temp_dir.h"

namespace faultline::image {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;
#if defined(__SANITIZE_THREAD__)
// Hashing, compressing and comparing every byte costs ~6-10x under
// ThreadSanitizer; the tests that scale with it run on fewer bytes there
// (each says what stays the same).
constexpr bool kUnderTsan = true;
#else
constexpr bool kUnderTsan = false;
#endif

using faultline::testing::TempDir;

// The whole file ("" when it cannot be read), in one read: a character-at-a-
// time istreambuf_iterator cost seconds per guest under ThreadSanitizer.
std::string read_all(const std::string& path) {
  auto bytes = read_whole_file(path);
  return bytes ? std::move(*bytes) : std::string();
}
void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A generated memory file (distinct random pages, a fraction zero) in which
// every third 4 KiB page is replaced by a compressible one (a short repeated
// phrase), as a guest's heaps and page cache are.
std::string make_memory(const std::string& path, uint64_t size, uint64_t seed, double zero_fraction) {
  EXPECT_TRUE(client::write_test_memory_file(path, size, seed, zero_fraction));
  std::string bytes = read_all(path);
  for (uint64_t p = 0; p * 4096 < size; p += 3) {
    if (bytes.compare(p * 4096, 4096, std::string(4096, '\0')) == 0) continue;
    const std::string phrase = "page " + std::to_string(p) + " of a compressible heap; ";
    for (uint64_t i = 0; i < 4096; ++i) bytes[p * 4096 + i] = phrase[i % phrase.size()];
  }
  write_all(path, bytes);
  return bytes;
}

std::unique_ptr<LocalStore> open_store(const std::string& dir) {
  auto s = LocalStore::open(dir, true);
  EXPECT_TRUE(s) << s.error().describe();
  return std::move(*s);
}

CreateReport create(Store& store, const std::string& mem, const std::string& name,
                    std::optional<std::string> parent = std::nullopt, uint32_t page_size = kSmallPage) {
  CreateOptions o;
  o.memory_path = mem;
  o.name = name;
  o.parent = std::move(parent);
  o.page_size = page_size;
  auto r = create_image(store, o);
  EXPECT_TRUE(r) << r.error().describe();
  return r ? *r : CreateReport{};
}

void expect_flattens_to(Store& store, const std::string& name, const std::string& out, const std::string& expected) {
  auto st = flatten_image(store, name, out, {});
  ASSERT_TRUE(st) << st.error().describe();
  const std::string got = read_all(out);
  ASSERT_EQ(got.size(), expected.size());
  for (uint64_t p = 0; p * 4096 < got.size(); ++p) {
    ASSERT_EQ(got.compare(p * 4096, 4096, expected, p * 4096, 4096), 0) << "page " << p << " of " << name;
  }
}

uint64_t nonzero_pages(const std::string& bytes, uint64_t page_size) {
  uint64_t n = 0;
  for (uint64_t p = 0; p * page_size < bytes.size(); ++p) {
    n += bytes.compare(p * page_size, page_size, std::string(page_size, '\0')) != 0;
  }
  return n;
}

uint64_t store_blob_bytes(const std::string& dir) {
  uint64_t total = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(dir + "/blobs")) {
    if (e.is_regular_file()) total += e.file_size();
  }
  return total;
}

TEST(Image, CreateThenFlattenIsByteIdenticalWith4KiBPages) {
  TempDir dir;
  const std::string mem = make_memory(dir.file("mem"), 16 * kMiB, 3, 0.25);
  auto store = open_store(dir.file("store"));
  const CreateReport r = create(*store, dir.file("mem"), "base");
  EXPECT_EQ(r.stored_pages, nonzero_pages(mem, 4096)) << "zero pages are never stored";
  EXPECT_EQ(r.zero_pages + r.stored_pages, 16 * kMiB / 4096);
  expect_flattens_to(*store, "base", dir.file("flat"), mem);
  auto info = inspect_image(*store, "base");
  ASSERT_TRUE(info);
  EXPECT_GT(info->compression_ratio, 1.2) << "a third of the pages are compressible";
  EXPECT_EQ(info->frames, r.frames);
}

TEST(Image, CreateThenFlattenIsByteIdenticalWith2MiBPages) {
  TempDir dir;
  std::string mem = make_memory(dir.file("mem"), 16 * kMiB, 4, 0.1);
  // Huge page 3 all zero, so one 2 MiB page is not stored.
  std::fill(mem.begin() + 3 * 2 * kMiB, mem.begin() + 4 * 2 * kMiB, '\0');
  write_all(dir.file("mem"), mem);
  auto store = open_store(dir.file("store"));
  const CreateReport r = create(*store, dir.file("mem"), "huge", std::nullopt, kHugePage);
  EXPECT_EQ(r.guest_pages, 8u);
  EXPECT_EQ(r.zero_pages, 1u);
  EXPECT_EQ(r.stored_pages, 7u);
  EXPECT_EQ(r.frames, 7u) << "a 2 MiB page is a frame by default";
  expect_flattens_to(*store, "huge", dir.file("flat"), mem);
}

TEST(Image, DiffStoresOnlyPagesWhoseBytesChanged) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 8 * kMiB, 5, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("base.mem"), "base");
  std::string next = base;
  std::set<uint64_t> changed;
  for (uint64_t p : {10, 11, 12, 500, 1000, 2047}) {
    client::fill_write_pattern(77, p * 4096, {reinterpret_cast<uint8_t*>(next.data() + p * 4096), 4096});
    changed.insert(p);
  }
  // Written back with its old content: not stored again.
  for (uint64_t p : {20, 21, 600}) next.replace(p * 4096, 4096, base, p * 4096, 4096);
  // A data page that became zero is "zero" in the diff, not stored.
  uint64_t zeroed = 0;
  for (uint64_t p = 100; zeroed == 0; ++p) {
    if (base.compare(p * 4096, 4096, std::string(4096, '\0')) != 0) {
      std::fill_n(next.begin() + static_cast<ptrdiff_t>(p * 4096), 4096, '\0');
      zeroed = p;
    }
  }
  write_all(dir.file("next.mem"), next);
  const CreateReport r = create(*store, dir.file("next.mem"), "next", "base");
  EXPECT_EQ(r.stored_pages, changed.size());
  EXPECT_EQ(r.zero_pages, 1u);
  EXPECT_EQ(r.parent_pages, 2048 - changed.size() - 1);
  expect_flattens_to(*store, "next", dir.file("flat"), next);
  expect_flattens_to(*store, "base", dir.file("flat-base"), base);
}

TEST(Image, FirecrackerDiffFileHolesAreAsInTheParentAndDataIsNewEvenWhenZero) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 8 * kMiB, 6, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("base.mem"), "base");
  // A sparse file the guest's size with data only at the dirtied pages.
  std::string expected = base;
  {
    UniqueFd fd(::open(dir.file("diff").c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644));
    ASSERT_TRUE(fd);
    ASSERT_EQ(::ftruncate(fd.get(), 8 * kMiB), 0);
    std::string page(4096, '\0');
    for (uint64_t p : {0, 1, 700, 1500}) {
      client::fill_write_pattern(9, p * 4096, {reinterpret_cast<uint8_t*>(page.data()), 4096});
      ASSERT_EQ(::pwrite(fd.get(), page.data(), 4096, static_cast<off_t>(p * 4096)), 4096);
      expected.replace(p * 4096, 4096, page);
    }
    // A page the guest zeroed: data in the Diff file, zero in the result.
    uint64_t zeroed = 900;
    while (base.compare(zeroed * 4096, 4096, std::string(4096, '\0')) == 0) ++zeroed;
    const std::string zeros(4096, '\0');
    ASSERT_EQ(::pwrite(fd.get(), zeros.data(), 4096, static_cast<off_t>(zeroed * 4096)), 4096);
    expected.replace(zeroed * 4096, 4096, zeros);
    ASSERT_EQ(::fsync(fd.get()), 0);
  }
  CreateOptions o;
  o.memory_path = dir.file("diff");
  o.name = "diff";
  o.parent = "base";
  o.diff_file = true;
  auto r = create_image(*store, o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->stored_pages, 4u);
  EXPECT_EQ(r->zero_pages, 1u);
  expect_flattens_to(*store, "diff", dir.file("flat"), expected);
}

// With 2 MiB pages a Diff file's data extents may cover part of a page (a
// few 4 KiB blocks written). Its holes mean "as in the parent" but read as
// zeros: such a page is refused, never stored with zeros over the parent's
// bytes (found by review: 2 093 056 bytes of a page flattened to zero). A
// whole 2 MiB page of data is new, as with 4 KiB pages.
TEST(Image, ADiffFileWhose2MiBPageIsPartlyHoleIsRefusedAndAWholeOneIsNew) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 16 * kMiB, 8, 0.0);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("base.mem"), "base", std::nullopt, kHugePage);
  const auto diff_file = [&](const std::string& name, uint64_t offset, uint64_t length) {
    UniqueFd fd(::open(dir.file(name).c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644));
    EXPECT_TRUE(fd);
    EXPECT_EQ(::ftruncate(fd.get(), 16 * kMiB), 0);
    const std::string bytes(length, '\x77');
    EXPECT_EQ(::pwrite(fd.get(), bytes.data(), length, static_cast<off_t>(offset)), static_cast<ssize_t>(length));
    EXPECT_EQ(::fsync(fd.get()), 0);
  };
  CreateOptions o;
  o.parent = "base";
  o.diff_file = true;
  o.page_size = kHugePage;

  diff_file("part", 2 * kHugePage + 4096, 4096);
  o.memory_path = dir.file("part");
  o.name = "part";
  auto refused = create_image(*store, o);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EINVAL);
  EXPECT_NE(refused.error().message.find("page 2 (2097152 bytes at offset 4194304) is partly data and partly hole"),
            std::string::npos)
      << refused.error().message;
  EXPECT_FALSE(store->manifest_exists("part").value_or(true));

  diff_file("whole", 2 * kHugePage, kHugePage);
  o.memory_path = dir.file("whole");
  o.name = "whole";
  auto r = create_image(*store, o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->stored_pages, 1u);
  std::string expected = base;
  expected.replace(2 * kHugePage, kHugePage, std::string(kHugePage, '\x77'));
  expect_flattens_to(*store, "whole", dir.file("flat"), expected);
}

TEST(Image, TwoImagesOfOneFileCreatedIndependentlyShareTheirFrames) {
  TempDir dir;
  make_memory(dir.file("mem"), 16 * kMiB, 7, 0.2);
  auto store = open_store(dir.file("store"));
  const CreateReport a = create(*store, dir.file("mem"), "a");
  const uint64_t after_a = store_blob_bytes(dir.file("store"));
  const CreateReport b = create(*store, dir.file("mem"), "b");
  EXPECT_EQ(b.frames_written, 0u) << "every frame of b is already in the store";
  EXPECT_EQ(store_blob_bytes(dir.file("store")), after_a);
  // Independently, into another store: the same blobs by name.
  auto other = open_store(dir.file("other"));
  create(*other, dir.file("mem"), "c");
  auto ma = parse_manifest(*store->read_manifest("a"), "a");
  auto mc = parse_manifest(*other->read_manifest("c"), "c");
  ASSERT_TRUE(ma && mc);
  uint64_t shared = 0, total = 0;
  std::set<BlobId> in_a;
  for (const FrameRef& f : ma->frames) in_a.insert(f.id);
  for (const FrameRef& f : mc->frames) {
    total += f.compressed_bytes;
    if (in_a.contains(f.id)) shared += f.compressed_bytes;
  }
  EXPECT_GE(shared * 100, total * 95);
  EXPECT_EQ(a.stored_bytes, b.stored_bytes);
}

// create compresses frames (and, without a parent, classifies pages) on
// several threads: the image must be the one a single thread writes, byte
// for byte, for a base and for a diff, whatever the thread count.
TEST(Image, CreateWritesTheSameManifestAndBlobsOnOneThreadAndOnSeveral) {
  TempDir dir;
  // Under ThreadSanitizer 12 MiB: 24 frames of 512 KiB, still 3 for each of 8
  // threads, so every worker compresses, hashes and hands back several
  // frames out of order, as with 48 (51 s against 5 s in CI otherwise).
  const uint64_t bytes = kUnderTsan ? 12 * kMiB : 24 * kMiB;
  const std::string base_bytes = make_memory(dir.file("mem"), bytes, 5, 0.3);
  std::string child_bytes = base_bytes;
  for (uint64_t p = 1; p * 4096 < child_bytes.size(); p += 17) child_bytes[p * 4096 + 9] ^= 0x5a;
  write_all(dir.file("child"), child_bytes);
  std::vector<std::unique_ptr<LocalStore>> stores;
  for (unsigned threads : {1u, 2u, 3u, 8u}) {
    stores.push_back(open_store(dir.file("store-" + std::to_string(threads))));
    for (const char* name : {"base", "child"}) {
      CreateOptions o;
      o.memory_path = dir.file(name == std::string("base") ? "mem" : "child");
      o.name = name;
      if (name != std::string("base")) o.parent = "base";
      o.threads = threads;
      auto r = create_image(*stores.back(), o);
      ASSERT_TRUE(r) << r.error().describe();
      EXPECT_EQ(r->frames, r->frames_written) << threads << " threads, " << name;
    }
  }
  for (const char* name : {"base", "child"}) {
    const auto one = stores[0]->read_manifest(name);
    ASSERT_TRUE(one);
    auto blobs = stores[0]->list();
    ASSERT_TRUE(blobs);
    for (size_t i = 1; i < stores.size(); ++i) {
      const auto many = stores[i]->read_manifest(name);
      ASSERT_TRUE(many);
      EXPECT_EQ(*many, *one) << "manifest of " << name << " in store " << i;
      auto other = stores[i]->list();
      ASSERT_TRUE(other);
      EXPECT_EQ(std::set<BlobId>(other->begin(), other->end()), std::set<BlobId>(blobs->begin(), blobs->end()));
    }
  }
  expect_flattens_to(*stores.back(), "base", dir.file("flat-base"), base_bytes);
  expect_flattens_to(*stores.back(), "child", dir.file("flat-child"), child_bytes);
}

TEST(Image, TenGenerationChainStoresOnlyTheBaseAndTheChangedPages) {
  TempDir dir;
  // Under ThreadSanitizer 8 MiB: still ten generations of 5 % of the pages
  // each, and the same checks (33 s against 3 s in CI otherwise).
  const uint64_t bytes = kUnderTsan ? 8 * kMiB : 16 * kMiB;
  std::string model = make_memory(dir.file("gen0"), bytes, 8, 0.2);
  auto store = open_store(dir.file("store"));
  const CreateReport base = create(*store, dir.file("gen0"), "gen0");
  std::mt19937_64 rng(99);
  const uint64_t pages = bytes / 4096;
  uint64_t changed_bytes_bound = 0;
  for (int g = 1; g <= 10; ++g) {
    std::set<uint64_t> written;
    while (written.size() < pages / 20) written.insert(rng() % pages);  // 5 % of the pages
    for (uint64_t p : written) {
      client::fill_write_pattern(1000 + g, p * 4096, {reinterpret_cast<uint8_t*>(model.data() + p * 4096), 4096});
    }
    const std::string mem = dir.file("gen" + std::to_string(g));
    write_all(mem, model);
    const CreateReport r = create(*store, mem, "gen" + std::to_string(g), "gen" + std::to_string(g - 1));
    EXPECT_EQ(r.stored_pages, written.size()) << "generation " << g;
    // Random pages do not compress: a changed page costs at most its size and zstd's framing.
    changed_bytes_bound += written.size() * 4096 + r.frames * 64;
    std::filesystem::remove(mem);
  }
  EXPECT_LE(store_blob_bytes(dir.file("store")), base.stored_bytes + changed_bytes_bound);
  expect_flattens_to(*store, "gen10", dir.file("flat"), model);
  auto info = inspect_image(*store, "gen10");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->layers.size(), 11u);
}

TEST(Image, WorkingSetPagesAreLaidOutFirstInFirstTouchOrder) {
  TempDir dir;
  const std::string mem = make_memory(dir.file("mem"), 8 * kMiB, 10, 0.0);
  WorkingSet ws;
  ws.page_size = 4096;
  ws.memory_file_size = 8 * kMiB;
  ws.offsets = {1500 * 4096, 7 * 4096, 2000 * 4096, 7 * 4096};
  ASSERT_TRUE(write_working_set(dir.file("ws"), ws));
  auto store = open_store(dir.file("store"));
  CreateOptions o;
  o.memory_path = dir.file("mem");
  o.name = "laid-out";
  o.working_set_path = dir.file("ws");
  ASSERT_TRUE(create_image(*store, o));
  auto chain = ImageChain::open(*store, "laid-out");
  ASSERT_TRUE(chain);
  EXPECT_EQ(chain->locate(1500).frame, 0u);
  EXPECT_EQ(chain->locate(1500).index_in_frame, 0u);
  EXPECT_EQ(chain->locate(7).index_in_frame, 1u);
  EXPECT_EQ(chain->locate(2000).index_in_frame, 2u);
  EXPECT_EQ(chain->locate(0).index_in_frame, 3u) << "then the rest in guest order";
  expect_flattens_to(*store, "laid-out", dir.file("flat"), mem);
}

TEST(Image, TwoConcurrentCreatesOfOneFileInOneStoreBothSucceedAndShareBlobs) {
  TempDir dir;
  const std::string mem = make_memory(dir.file("mem"), 8 * kMiB, 18, 0.2);
  auto first = open_store(dir.file("store"));
  auto second = open_store(dir.file("store"));  // as another process would
  std::barrier start(2);
  CreateReport reports[2];
  auto run = [&](LocalStore* store, const char* name, CreateReport* out) {
    CreateOptions o;
    o.memory_path = dir.file("mem");
    o.name = name;
    start.arrive_and_wait();  // start together, so they may write the same blobs at the same time
    auto r = create_image(*store, o);
    EXPECT_TRUE(r) << r.error().describe();
    if (r) *out = *r;
  };
  std::thread a(run, first.get(), "a", &reports[0]);
  std::thread b(run, second.get(), "b", &reports[1]);
  a.join();
  b.join();
  EXPECT_EQ(reports[0].frames, reports[1].frames);
  EXPECT_EQ(first->list()->size(), reports[0].frames) << "each frame stored once";
  expect_flattens_to(*first, "a", dir.file("flat-a"), mem);
  expect_flattens_to(*first, "b", dir.file("flat-b"), mem);
  for (auto& e : std::filesystem::recursive_directory_iterator(dir.file("store"))) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  }
}

// ----- corruption: every damage is an error naming the image (and blob), never bytes

struct CorruptionFixture {
  TempDir dir;
  std::unique_ptr<LocalStore> store;
  std::string base_mem;
  CorruptionFixture() {
    base_mem = make_memory(dir.file("mem"), 4 * kMiB, 11, 0.2);
    store = open_store(dir.file("store"));
    create(*store, dir.file("mem"), "base");
    std::string next = base_mem;
    client::fill_write_pattern(5, 0, {reinterpret_cast<uint8_t*>(next.data()), 4096});
    write_all(dir.file("next"), next);
    create(*store, dir.file("next"), "child", "base");
  }
  // Flips the bits `mask` of the byte at 1/`part` of blob `id`'s file,
  // rewritten as a new file as a damaged disk would show it.
  void damage(const BlobId& id, size_t part, uint8_t mask) {
    std::string blob = read_all(store->describe(id));
    blob[blob.size() / part] ^= static_cast<char>(mask);
    std::filesystem::remove(store->describe(id));
    write_all(store->describe(id), blob);
  }
  BlobId first_frame(const std::string& name) {
    return parse_manifest(*store->read_manifest(name), name)->frames.at(0).id;
  }
  // verify and flatten of "child" both fail, naming `expect_in_error`, and no output appears.
  void expect_refused(const std::string& expect_in_error) {
    auto v = verify_image(*store, "child", {});
    ASSERT_TRUE(v);
    ASSERT_FALSE(v->problems.empty()) << "verify found nothing";
    EXPECT_NE(v->problems[0].message.find(expect_in_error), std::string::npos) << v->problems[0].message;
    auto f = flatten_image(*store, "child", dir.file("out"), {});
    ASSERT_FALSE(f) << "flatten wrote an image from damaged input";
    EXPECT_NE(f.error().message.find(expect_in_error), std::string::npos) << f.error().message;
    EXPECT_FALSE(std::filesystem::exists(dir.file("out")));
    for (auto& e : std::filesystem::directory_iterator(dir.file(""))) {
      EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << "temporary left behind";
    }
  }
};

TEST(ImageCorruption, AFlippedByteInAFrameIsAnErrorNamingImageAndBlob) {
  CorruptionFixture fx;
  const BlobId id = fx.first_frame("base");
  fx.damage(id, 2, 1);
  fx.expect_refused("image base");
  fx.expect_refused(id.hex());
}

// Frames of a local store are checked against the manifest's XXH3 checksum
// when served or flattened, and against both it and their SHA-256 name by
// verify; either way a damaged frame is refused.
TEST(ImageCorruption, AFrameDamagedOnDiskIsRefusedByItsChecksumWhenServedAndByBothChecksWhenVerified) {
  CorruptionFixture fx;
  const BlobId id = fx.first_frame("base");
  fx.damage(id, 3, 0x40);
  auto f = flatten_image(*fx.store, "base", fx.dir.file("out"), {});
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message.find("its checksum does not match the manifest's"), std::string::npos)
      << f.error().message;
  auto v = verify_image(*fx.store, "base", {});
  ASSERT_TRUE(v);
  ASSERT_EQ(v->problems.size(), 1u);
  EXPECT_NE(v->problems[0].message.find("its SHA-256 does not match its name"), std::string::npos)
      << v->problems[0].message;
}

// A manifest whose checksum is wrong for a sound blob (a writer's bug, or a
// manifest edited by hand): verify says so, and serving refuses the frame
// rather than trusting either.
TEST(ImageCorruption, AManifestChecksumThatDoesNotMatchItsBlobIsFoundByVerifyAndRefusedWhenRead) {
  CorruptionFixture fx;
  auto m = parse_manifest(*fx.store->read_manifest("base"), "base");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->frames.at(2).checksum);
  *m->frames[2].checksum ^= 1;
  auto bytes = serialize_manifest(*m);
  ASSERT_TRUE(bytes);
  ASSERT_TRUE(fx.store->write_manifest("wrongsum", *bytes));
  auto v = verify_image(*fx.store, "wrongsum", {});
  ASSERT_TRUE(v);
  ASSERT_EQ(v->problems.size(), 1u);
  EXPECT_NE(v->problems[0].message.find("the manifest's checksum of blob " + m->frames[2].id.hex()), std::string::npos)
      << v->problems[0].message;
  auto f = flatten_image(*fx.store, "wrongsum", fx.dir.file("out"), {});
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message.find(m->frames[2].id.hex()), std::string::npos) << f.error().message;
}

// An image written before frames had checksums (manifest version 1) is
// served, flattened and verified as before: its frames are checked by SHA-256.
TEST(ImageCorruption, AVersion1ImageWithoutChecksumsIsReadAndItsFramesCheckedBySha256) {
  CorruptionFixture fx;
  auto m = parse_manifest(*fx.store->read_manifest("base"), "base");
  ASSERT_TRUE(m);
  for (FrameRef& f : m->frames) f.checksum.reset();
  auto bytes = serialize_manifest(*m);
  ASSERT_TRUE(bytes);
  ASSERT_EQ((*bytes)[8], 1) << "written as version 1";
  ASSERT_TRUE(fx.store->write_manifest("old", *bytes));
  auto inspected = inspect_image(*fx.store, "old");
  ASSERT_TRUE(inspected) << inspected.error().describe();
  EXPECT_EQ(inspected->layers.at(0).version, 1u);
  auto listed = list_images(*fx.store);
  ASSERT_TRUE(listed);
  for (const ImageListing& l : *listed) EXPECT_EQ(l.version, l.name == "old" ? 1u : 2u) << l.name;
  expect_flattens_to(*fx.store, "old", fx.dir.file("flat"), fx.base_mem);
  auto v = verify_image(*fx.store, "old", {});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->problems.empty());
  const BlobId id = m->frames.at(0).id;
  fx.damage(id, 2, 1);
  auto f = flatten_image(*fx.store, "old", fx.dir.file("out"), {});
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message.find("its SHA-256 does not match its name"), std::string::npos) << f.error().message;
}

TEST(ImageCorruption, AFlippedByteInAManifestIsAnErrorNamingTheImage) {
  CorruptionFixture fx;
  const std::string path = fx.store->describe_manifest("base");
  std::string m = read_all(path);
  m[60] ^= 1;
  std::filesystem::remove(path);
  write_all(path, m);
  fx.expect_refused("base");
  fx.expect_refused("checksum");
}

TEST(ImageCorruption, AMissingBlobIsAnErrorNamingImageAndBlob) {
  CorruptionFixture fx;
  const BlobId id = fx.first_frame("child");
  std::filesystem::remove(fx.store->describe(id));
  fx.expect_refused("image child");
  fx.expect_refused(id.hex());
}

TEST(ImageCorruption, ATruncatedManifestIsAnErrorNamingTheImage) {
  CorruptionFixture fx;
  const std::string path = fx.store->describe_manifest("child");
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 5);
  fx.expect_refused("image child");
  fx.expect_refused("truncated");
}

TEST(ImageCorruption, AMissingParentIsAnErrorNamingBoth) {
  CorruptionFixture fx;
  std::filesystem::remove(fx.store->describe_manifest("base"));
  fx.expect_refused("image child: its parent base is missing");
}

TEST(ImageCorruption, VerifyOfAnImageWithAMissingParentStillChecksItsOwnFrames) {
  CorruptionFixture fx;
  std::filesystem::remove(fx.store->describe_manifest("base"));
  const BlobId id = fx.first_frame("child");
  std::filesystem::remove(fx.store->describe(id));
  auto v = verify_image(*fx.store, "child", {});
  ASSERT_TRUE(v);
  ASSERT_EQ(v->problems.size(), 2u);
  EXPECT_NE(v->problems[0].message.find("its parent base is missing"), std::string::npos) << v->problems[0].message;
  EXPECT_NE(v->problems[1].message.find("image child"), std::string::npos) << v->problems[1].message;
  EXPECT_NE(v->problems[1].message.find(id.hex()), std::string::npos) << v->problems[1].message;
}

// ----- gc

TEST(ImageGc, RemovesOnlyBlobsNoImageReferences) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 4 * kMiB, 12, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("base.mem"), "base");
  std::string next = base;
  client::fill_write_pattern(3, 4096, {reinterpret_cast<uint8_t*>(next.data() + 4096), 4096});
  write_all(dir.file("next.mem"), next);
  create(*store, dir.file("next.mem"), "child", "base");
  make_memory(dir.file("other.mem"), 4 * kMiB, 13, 0.2);
  const CreateReport other = create(*store, dir.file("other.mem"), "other");
  auto before = store->list();
  ASSERT_TRUE(before);
  // "other" deleted: its frames are garbage; a crashed write left a temporary.
  std::filesystem::remove(store->describe_manifest("other"));
  write_all(dir.file("store/images/.child.tmp-123456789abc"), "half a manifest");
  auto r = gc_store(*store, {});
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->images, 2u);
  EXPECT_EQ(r->removed_blobs, other.frames);
  EXPECT_EQ(r->removed_temporaries, 1u);
  EXPECT_EQ(store->list()->size(), before->size() - other.frames);
  expect_flattens_to(*store, "child", dir.file("flat"), next);
  auto v = verify_image(*store, "child", {});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->problems.empty());
}

TEST(ImageGc, RefusesToRemoveAnythingWhenAManifestIsUnreadable) {
  TempDir dir;
  make_memory(dir.file("mem"), 1 * kMiB, 14, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("mem"), "a");
  write_all(dir.file("store/images/broken"), "not a manifest");
  const size_t blobs = store->list()->size();
  auto r = gc_store(*store, {});
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("broken"), std::string::npos) << r.error().message;
  EXPECT_EQ(store->list()->size(), blobs);
}

// A parent manifest the store cannot read for a moment (a bucket timing out,
// or a daemon stopping mid-attach) is not "missing": the error says it
// cannot be read and stays retryable; a parent that is gone is missing.
TEST(Image, AParentThatCannotBeReadForAMomentIsNotCalledMissingAndStaysRetryable) {
  TempDir dir;
  make_memory(dir.file("mem"), 4 * kMiB, 12, 0.1);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("mem"), "base", std::nullopt, 4096);
  create(*store, dir.file("mem"), "child", std::string("base"), 4096);
  struct ParentTimesOut final : faultline::testing::DelegatingStore {
    using DelegatingStore::DelegatingStore;
    int code = ETIMEDOUT;
    Result<std::string> read_manifest(const std::string& n) override {
      if (n != "base") return DelegatingStore::read_manifest(n);
      return std::unexpected(Error{code, "GET s3://b/images/base: timed out", code != ENOENT});
    }
  };
  ParentTimesOut flaky(LocalStore::open(dir.file("store"), false).value());
  auto chain = ImageChain::open(flaky, "child");
  ASSERT_FALSE(chain);
  EXPECT_TRUE(chain.error().retryable) << chain.error().describe();
  EXPECT_EQ(chain.error().code, ETIMEDOUT);
  EXPECT_NE(chain.error().message.find("its parent base cannot be read"), std::string::npos) << chain.error().message;
  flaky.code = ENOENT;
  chain = ImageChain::open(flaky, "child");
  ASSERT_FALSE(chain);
  EXPECT_FALSE(chain.error().retryable);
  EXPECT_NE(chain.error().message.find("its parent base is missing"), std::string::npos) << chain.error().message;
}

// A store whose manifest writes fail (a full disk, a crash at the last step):
// everything else goes to a real LocalStore.
class ManifestWriteFails final : public faultline::testing::DelegatingStore {
 public:
  using DelegatingStore::DelegatingStore;
  Status write_manifest(const std::string&, std::string_view) override { return fail("no space left", ENOSPC); }
};

TEST(ImageGc, AnInterruptedCreateLeavesNoImageAndGcRemovesItsBlobs) {
  TempDir dir;
  make_memory(dir.file("mem"), 2 * kMiB, 16, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("mem"), "kept");
  const size_t kept_blobs = store->list()->size();
  make_memory(dir.file("other"), 2 * kMiB, 17, 0.2);
  ManifestWriteFails failing(*store);
  CreateOptions o;
  o.memory_path = dir.file("other");
  o.name = "lost";
  auto r = create_image(failing, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ENOSPC);
  EXPECT_FALSE(*store->manifest_exists("lost")) << "no image that looks whole";
  EXPECT_GT(store->list()->size(), kept_blobs) << "its blobs were written";
  auto g = gc_store(*store, {});
  ASSERT_TRUE(g) << g.error().describe();
  EXPECT_EQ(store->list()->size(), kept_blobs);
  auto v = verify_image(*store, "kept", {});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->problems.empty());
}

// A create parked after writing its blobs and before its manifest, holding
// the store's shared lock, until released: the moment a gc or a delete that
// did not wait for it would do harm. The thread is joined by finish().
class ParkedCreate {
 public:
  ParkedCreate(Store& store, CreateOptions options)
      : thread_([this, &store, options]() mutable {
          options.before_manifest = [this] {
            std::unique_lock lk(mu_);
            parked_ = true;
            cv_.notify_all();
            cv_.wait(lk, [this] { return released_; });
          };
          result_ = create_image(store, options);
          std::lock_guard lk(mu_);
          parked_ = true;  // a create that failed before parking must not hang the test
          cv_.notify_all();
        }) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [this] { return parked_; });
  }
  ~ParkedCreate() { finish(); }
  ParkedCreate(const ParkedCreate&) = delete;
  ParkedCreate& operator=(const ParkedCreate&) = delete;

  void release() {
    std::lock_guard lk(mu_);
    released_ = true;
    cv_.notify_all();
  }
  // Releases it (if nothing did) and waits for the create's result.
  const Result<CreateReport>& finish() {
    release();
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool parked_ = false, released_ = false;
  Result<CreateReport> result_ = std::unexpected(Error{0, "not finished"});
  std::thread thread_;  // last: it starts once everything above exists
};

TEST(ImageGc, GcDuringCreateWaitsAndLosesNothing) {
  TempDir dir;
  const std::string mem = make_memory(dir.file("mem"), 4 * kMiB, 15, 0.2);
  auto store = open_store(dir.file("store"));
  CreateOptions o;
  o.memory_path = dir.file("mem");
  o.name = "racing";
  ParkedCreate create(*store, o);
  // A second store object: another process would have its own descriptor.
  auto gc_view = open_store(dir.file("store"));
  bool waited = false;
  GcOptions g;
  g.on_lock_wait = [&] {
    waited = true;
    create.release();
  };
  auto r = gc_store(*gc_view, g);
  const auto& created = create.finish();  // released here if gc did not wait: the test then fails, not hangs
  ASSERT_TRUE(created) << created.error().describe();
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_TRUE(waited) << "gc must have waited for the create";
  EXPECT_EQ(r->removed_blobs, 0u);
  expect_flattens_to(*store, "racing", dir.file("flat"), mem);
}

// copy_image (image pull into a directory store) holds the destination's
// shared lock as create does: a gc that starts while it copies waits for its
// manifest (it used to remove the blobs copied so far, leaving an image that
// looked whole with frames missing), and a copy that starts while a gc runs
// waits for it.
TEST(ImageGc, GcInTheDestinationOfACopyWaitsForItAndACopyWaitsForAGc) {
  TempDir dir;
  const std::string mem = make_memory(dir.file("mem"), 4 * kMiB, 17, 0.2);
  auto from = open_store(dir.file("from"));
  create(*from, dir.file("mem"), "base");
  auto to = open_store(dir.file("to"));
  auto gc_view = open_store(dir.file("to"));  // another process's descriptor

  std::promise<void> gc_waits;
  std::future<Result<GcReport>> gc;
  CopyOptions c;
  c.threads = 1;
  c.progress = [&](uint64_t, uint64_t) {
    if (gc.valid()) return;
    GcOptions g;
    g.on_lock_wait = [&] { gc_waits.set_value(); };
    gc = std::async(std::launch::async, [&, g] { return gc_store(*gc_view, g); });
    // Until the gc waits for the lock, or (without it) has run: the checks
    // below then fail.
    auto waits = gc_waits.get_future();
    while (waits.wait_for(std::chrono::milliseconds(5)) != std::future_status::ready &&
           gc.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    }
  };
  auto copied = copy_image(*from, *to, "base", c);
  ASSERT_TRUE(copied) << copied.error().describe();
  ASSERT_TRUE(gc.valid()) << "the copy reported progress";
  auto r = gc.get();
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->removed_blobs, 0u);
  auto v = verify_image(*to, "base", {});
  ASSERT_TRUE(v) << v.error().describe();
  EXPECT_TRUE(v->problems.empty()) << v->problems.front().message;
  expect_flattens_to(*to, "base", dir.file("flat"), mem);

  // The other order: a gc holds the lock; the copy (of a new image) waits.
  const std::string next = make_memory(dir.file("next"), 4 * kMiB, 18, 0.2);
  create(*from, dir.file("next"), "next");
  auto held = gc_view->lock_exclusive({});
  ASSERT_TRUE(held) << held.error().describe();
  std::promise<void> copy_waits;
  CopyOptions waiting;
  waiting.on_lock_wait = [&] { copy_waits.set_value(); };
  auto second = std::async(std::launch::async, [&] { return copy_image(*from, *to, "next", waiting); });
  auto waits = copy_waits.get_future();
  while (waits.wait_for(std::chrono::milliseconds(5)) != std::future_status::ready &&
         second.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
  }
  EXPECT_EQ(waits.wait_for(std::chrono::seconds(0)), std::future_status::ready) << "the copy waited for the gc";
  EXPECT_FALSE(to->manifest_exists("next").value_or(true)) << "nothing written while the gc holds the lock";
  held->reset();
  auto done = second.get();
  ASSERT_TRUE(done) << done.error().describe();
  expect_flattens_to(*to, "next", dir.file("flat2"), next);
}

// A create that fails after writing some of its blobs (here: its input
// changed between two reads, as a snapshot export of a VM that was not
// paused is refused) leaves no temporary, and a later create through the
// same LocalStore object (a daemon keeps one per image) is not handed the
// failed one's blobs: its sync used to rename them too, and failed on the
// first one a gc had removed in between.
TEST(ImageCreate, AFailedCreateLeavesNoTemporaryAndTheNextCreateOfTheSameStoreObjectSucceeds) {
  TempDir dir;
  auto store = open_store(dir.file("store"));
  std::string mem(4 * kMiB, '\0');
  for (size_t i = 0; i < mem.size(); ++i) mem[i] = static_cast<char>((i * 2654435761u) >> 11);
  int calls = 0;
  const auto make = [&](const std::string& name, int fail_at) {
    PagesCreateOptions o;
    o.name = name;
    o.source = "vm";
    o.guest_bytes = mem.size();
    o.threads = 1;
    o.pages.assign(mem.size() / 4096, PageInput::kCandidate);
    o.max_read_bytes = mem.size();
    calls = 0;
    o.read = [&, fail_at](uint64_t first, uint64_t, std::span<uint8_t>) -> Result<const uint8_t*> {
      if (++calls == fail_at) return fail("page changed between two reads", EBUSY);
      return reinterpret_cast<const uint8_t*>(mem.data()) + first * 4096;
    };
    return create_image_from_pages(*store, o);
  };
  const auto temporaries = [&] {
    size_t n = 0;
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir.file("store/blobs"))) {
      if (e.path().filename().string().front() == '.') ++n;
    }
    return n;
  };
  auto failed = make("a", 3);  // refused in its second pass, after frame 0 was written
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, EBUSY);
  EXPECT_EQ(temporaries(), 0u) << "the failed create's blobs were left behind";
  auto g = gc_store(*open_store(dir.file("store")), {});
  ASSERT_TRUE(g) << g.error().describe();
  mem[0] ^= 1;  // the next snapshot
  auto next = make("b", -1);
  ASSERT_TRUE(next) << next.error().describe();
  EXPECT_EQ(temporaries(), 0u);
  write_all(dir.file("mem-b"), mem);
  expect_flattens_to(*store, "b", dir.file("flat"), mem);
}

// list_images: every image with what its own manifest holds; an unreadable
// one listed with its problem rather than hidden.
TEST(ImageDelete, ListShowsEachImagesOwnManifestAndAnUnreadableOneWithItsProblem) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 4 * kMiB, 16, 0.2);
  auto store = open_store(dir.file("store"));
  const CreateReport b = create(*store, dir.file("base.mem"), "base");
  std::string next = base;
  client::fill_write_pattern(7, 3 * 4096, {reinterpret_cast<uint8_t*>(next.data() + 3 * 4096), 4096});
  write_all(dir.file("next.mem"), next);
  const CreateReport c = create(*store, dir.file("next.mem"), "child", "base");
  write_all(dir.file("store/images/broken"), "not a manifest");
  auto l = list_images(*store);
  ASSERT_TRUE(l) << l.error().describe();
  ASSERT_EQ(l->size(), 3u);
  EXPECT_EQ((*l)[0].name, "base");
  EXPECT_FALSE((*l)[0].parent);
  EXPECT_EQ((*l)[0].guest_bytes, 4 * kMiB);
  EXPECT_EQ((*l)[0].page_size, 4096u);
  EXPECT_EQ((*l)[0].stored_pages, b.stored_pages);
  EXPECT_EQ((*l)[0].frames, b.frames);
  EXPECT_EQ((*l)[0].stored_bytes, b.stored_bytes);
  EXPECT_EQ((*l)[0].manifest_bytes, b.manifest_bytes);
  EXPECT_EQ((*l)[1].name, "broken");
  ASSERT_TRUE((*l)[1].problem);
  EXPECT_NE((*l)[1].problem->message.find("broken"), std::string::npos) << (*l)[1].problem->message;
  EXPECT_EQ((*l)[2].name, "child");
  EXPECT_EQ((*l)[2].parent, std::optional<std::string>("base"));
  EXPECT_EQ((*l)[2].stored_pages, 1u);
  EXPECT_EQ((*l)[2].frames, c.frames);
  EXPECT_FALSE((*l)[2].problem);
}

// A parent is never deleted under its children, nor while an image that
// could be a child cannot be read; deleting the leaves first works, and gc
// then frees exactly the frames no remaining image uses.
TEST(ImageDelete, AParentIsRefusedUntilItsChildrenAreGoneAndGcThenFreesOnlyItsFrames) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 4 * kMiB, 17, 0.2);
  auto store = open_store(dir.file("store"));
  const CreateReport b = create(*store, dir.file("base.mem"), "base");
  std::string next = base;
  client::fill_write_pattern(9, 5 * 4096, {reinterpret_cast<uint8_t*>(next.data() + 5 * 4096), 4096});
  write_all(dir.file("next.mem"), next);
  const CreateReport c = create(*store, dir.file("next.mem"), "child", "base");
  const std::string other = make_memory(dir.file("other.mem"), 2 * kMiB, 18, 0.2);
  create(*store, dir.file("other.mem"), "other");

  auto refused = delete_image(*store, "base");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EBUSY);
  EXPECT_NE(refused.error().message.find("parent of child"), std::string::npos) << refused.error().message;
  EXPECT_TRUE(*store->manifest_exists("base"));
  expect_flattens_to(*store, "child", dir.file("flat"), next);

  auto missing = delete_image(*store, "nope");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ENOENT);

  write_all(dir.file("store/images/broken"), "not a manifest");
  auto unreadable = delete_image(*store, "child");
  ASSERT_FALSE(unreadable);
  EXPECT_NE(unreadable.error().message.find("broken"), std::string::npos) << unreadable.error().message;
  EXPECT_TRUE(*store->manifest_exists("child"));
  ASSERT_TRUE(delete_image(*store, "broken")) << "an unreadable image can be deleted itself";
  EXPECT_FALSE(std::filesystem::exists(dir.file("store/images/broken")));

  const size_t blobs = store->list()->size();
  ASSERT_TRUE(delete_image(*store, "child"));
  EXPECT_FALSE(*store->manifest_exists("child"));
  auto g = gc_store(*store, {});
  ASSERT_TRUE(g) << g.error().describe();
  EXPECT_EQ(g->removed_blobs, c.frames_written) << "the child's own frames";
  ASSERT_TRUE(delete_image(*store, "base"));
  g = gc_store(*store, {});
  ASSERT_TRUE(g) << g.error().describe();
  EXPECT_EQ(g->removed_blobs, b.frames_written);
  EXPECT_EQ(store->list()->size(), blobs - c.frames_written - b.frames_written);
  expect_flattens_to(*store, "other", dir.file("flat-other"), other);
  auto l = list_images(*store);
  ASSERT_TRUE(l);
  ASSERT_EQ(l->size(), 1u);
  EXPECT_EQ((*l)[0].name, "other");
}

// A delete waits for a create that holds the image as its parent, then sees
// the new child and refuses: a create never finishes on a deleted parent.
TEST(ImageDelete, DeleteDuringACreateOnTopOfTheImageWaitsAndThenRefuses) {
  TempDir dir;
  const std::string base = make_memory(dir.file("base.mem"), 2 * kMiB, 19, 0.2);
  auto store = open_store(dir.file("store"));
  create(*store, dir.file("base.mem"), "base");
  std::string next = base;
  client::fill_write_pattern(11, 0, {reinterpret_cast<uint8_t*>(next.data()), 4096});
  write_all(dir.file("next.mem"), next);
  CreateOptions o;
  o.memory_path = dir.file("next.mem");
  o.name = "child";
  o.parent = "base";
  ParkedCreate creating(*store, o);
  auto other_process = open_store(dir.file("store"));
  bool waited = false;
  DeleteOptions d;
  d.on_lock_wait = [&] {
    waited = true;
    creating.release();
  };
  auto r = delete_image(*other_process, "base", d);
  const auto& created = creating.finish();  // released here if delete did not wait: the test then fails, not hangs
  ASSERT_TRUE(created) << created.error().describe();
  EXPECT_TRUE(waited) << "delete must have waited for the create";
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EBUSY) << r.error().describe();
  expect_flattens_to(*store, "child", dir.file("flat"), next);
}

// Leases: an image a process serves (an ImageSource, as the daemon holds
// one per served image) is refused by delete, so gc can never take frames
// from under a running VM; the lease goes with the source or the process.

std::shared_ptr<ImageSource> serve(const std::string& store_dir, const std::string& name,
                                   const ImageOpenOptions& options = {}) {
  auto src = ImageSource::open(open_store(store_dir), name, std::make_shared<FrameCache>(16 * kMiB), options);
  EXPECT_TRUE(src) << src.error().describe();
  return src ? *src : nullptr;
}

// Every byte the source serves is the memory file's.
void expect_serves(const ImageSource& src, const std::string& mem) {
  std::string read(mem.size(), '\0');
  ASSERT_TRUE(src.read(0, {reinterpret_cast<uint8_t*>(read.data()), read.size()}));
  EXPECT_TRUE(read == mem);
}

std::vector<std::string> lease_files(const std::string& store_dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(store_dir + "/leases", ec)) {
    names.push_back(e.path().filename());
  }
  return names;
}

// A child process leases `names` and exits without releasing them: no
// destructor runs, so the files stay; the flocks go with the process.
bool lease_in_a_process_that_dies(Store& store, const std::vector<std::string>& names) {
  const pid_t child = ::fork();
  if (child < 0) return false;
  if (child == 0) {
    std::vector<std::unique_ptr<StoreLock>> held;
    for (const std::string& n : names) {
      auto l = store.lease(n, "served");
      if (!l) ::_exit(1);
      held.push_back(std::move(*l));
    }
    ::_exit(0);
  }
  int status = 0;
  return ::waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Each test starts with a store holding "base", an image of `mem`.
class ImageLeases : public ::testing::Test {
 protected:
  void SetUp() override {
    mem = make_memory(dir.file("mem"), 2 * kMiB, 21, 0.2);
    store = open_store(dir.file("store"));
    create(*store, dir.file("mem"), "base");
  }

  TempDir dir;
  std::string mem;
  std::unique_ptr<LocalStore> store;
};

TEST_F(ImageLeases, AServedImageIsNotDeletedUntilItsSourceIsGone) {
  auto src = serve(dir.file("store"), "base");
  ASSERT_TRUE(src);
  ASSERT_EQ(lease_files(dir.file("store")).size(), 1u);

  auto listed = list_images(*store);
  ASSERT_TRUE(listed) << listed.error().describe();
  ASSERT_EQ(listed->size(), 1u);
  ASSERT_EQ((*listed)[0].leases.size(), 1u);
  const ImageLease& lease = (*listed)[0].leases[0];
  EXPECT_EQ(lease.image, "base");
  EXPECT_EQ(lease.pid, ::getpid());
  EXPECT_FALSE(lease.since.empty());

  auto refused = delete_image(*store, "base");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EBUSY);
  EXPECT_NE(refused.error().message.find("being served by pid " + std::to_string(::getpid())), std::string::npos)
      << refused.error().message;
  EXPECT_TRUE(*store->manifest_exists("base"));
  auto g = gc_store(*store, {});
  ASSERT_TRUE(g) << g.error().describe();
  EXPECT_EQ(g->removed_blobs, 0u);
  EXPECT_EQ(g->removed_stale_leases, 0u) << "a live lease is not stale";
  // The source still serves every byte.
  expect_serves(*src, mem);

  src.reset();
  EXPECT_TRUE(lease_files(dir.file("store")).empty()) << "released with the source";
  ASSERT_TRUE(delete_image(*store, "base"));
  EXPECT_FALSE(*store->manifest_exists("base"));
}

TEST_F(ImageLeases, ALeaseWhoseProcessDiedIsStaleAndDeleteAndGcRemoveIt) {
  create(*store, dir.file("mem"), "copy");
  ASSERT_TRUE(lease_in_a_process_that_dies(*store, {"base", "copy"}));
  ASSERT_EQ(lease_files(dir.file("store")).size(), 2u);

  auto live = store->live_leases(false, nullptr);
  ASSERT_TRUE(live) << live.error().describe();
  EXPECT_TRUE(live->empty());
  auto listed = list_images(*store);
  ASSERT_TRUE(listed);
  for (const ImageListing& l : *listed) EXPECT_TRUE(l.leases.empty()) << l.name;
  EXPECT_EQ(lease_files(dir.file("store")).size(), 2u) << "listing removes nothing";

  ASSERT_TRUE(delete_image(*store, "base")) << "a dead process's lease does not hold an image";
  EXPECT_TRUE(lease_files(dir.file("store")).empty()) << "delete removed the stale leases it saw";
  ASSERT_TRUE(lease_in_a_process_that_dies(*store, {"copy"}));
  ASSERT_EQ(lease_files(dir.file("store")).size(), 1u);
  auto g = gc_store(*store, {});
  ASSERT_TRUE(g) << g.error().describe();
  EXPECT_EQ(g->removed_stale_leases, 1u);
  EXPECT_TRUE(lease_files(dir.file("store")).empty());
}

// The order between a server opening an image and a delete, both ways: a
// delete that comes while an open holds its lease waits and refuses; an open
// that comes while a delete holds the lock finds no image, and leaves no lease.
TEST_F(ImageLeases, DeleteWaitsForAnOpeningServerAndRefuses) {
  std::mutex mu;
  std::condition_variable cv;
  bool leased = false, released = false;
  ImageOpenOptions o;
  o.after_lease = [&] {
    std::unique_lock lk(mu);
    leased = true;
    cv.notify_all();
    cv.wait(lk, [&] { return released; });
  };
  std::shared_ptr<ImageSource> src;
  std::thread opener([&] { src = serve(dir.file("store"), "base", o); });
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return leased; });
  }
  bool waited = false;
  DeleteOptions d;
  d.on_lock_wait = [&] {
    waited = true;
    std::lock_guard lk(mu);
    released = true;
    cv.notify_all();
  };
  auto r = delete_image(*open_store(dir.file("store")), "base", d);
  {
    std::lock_guard lk(mu);  // released here if delete did not wait: the test then fails, not hangs
    released = true;
    cv.notify_all();
  }
  opener.join();
  EXPECT_TRUE(waited) << "delete must have waited for the open";
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EBUSY) << r.error().describe();
  ASSERT_TRUE(src);
  expect_serves(*src, mem);
}

TEST_F(ImageLeases, AnOpenThatWaitsForADeleteFindsNoImageAndLeavesNoLease) {
  auto deleting = store->lock_exclusive({});  // what delete_image holds while it removes the manifest
  ASSERT_TRUE(deleting);
  std::mutex mu;
  std::condition_variable cv;
  bool waiting = false, waited = false;
  ImageOpenOptions o;
  o.on_lock_wait = [&] {
    std::lock_guard lk(mu);
    waiting = waited = true;
    cv.notify_all();
  };
  Result<std::shared_ptr<ImageSource>> opened = fail("not run");
  std::thread opener([&] {
    opened = ImageSource::open(open_store(dir.file("store")), "base", std::make_shared<FrameCache>(16 * kMiB), o);
    std::lock_guard lk(mu);
    waiting = true;  // an open that did not wait must not hang the test
    cv.notify_all();
  });
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return waiting; });
  }
  ASSERT_TRUE(store->remove_manifest("base"));
  deleting->reset();
  opener.join();
  EXPECT_TRUE(waited) << "the open must have waited for the delete's lock";
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, ENOENT) << opened.error().describe();
  EXPECT_TRUE(lease_files(dir.file("store")).empty());
}

// The commands that read an image for a while (flatten, verify, and push,
// pull or copy reading it: copy_image) lease it too: a delete meanwhile is
// refused with what they do, and the image is deletable once they are done.
TEST_F(ImageLeases, AFlattenAVerifyAndACopyAreNotDeletedFromUnderThem) {
  auto other = open_store(dir.file("other"));
  const std::string me = "by pid " + std::to_string(::getpid());
  int tries = 0;
  // Tried from inside each operation's progress callback, while it works.
  const auto refused_while = [&](const std::string& use) {
    return [this, use, me, &tries, tried = false](uint64_t, uint64_t) mutable {
      if (tried) return;
      tried = true;
      ++tries;
      auto live = store->live_leases(false, nullptr);
      ASSERT_TRUE(live) << live.error().describe();
      ASSERT_EQ(live->size(), 1u);
      EXPECT_EQ((*live)[0].use, use);
      auto r = delete_image(*open_store(dir.file("store")), "base");
      ASSERT_FALSE(r) << use << ": deleted from under it";
      EXPECT_EQ(r.error().code, EBUSY);
      EXPECT_NE(r.error().message.find("it is being " + use + " " + me), std::string::npos) << r.error().message;
    };
  };
  ASSERT_TRUE(flatten_image(*store, "base", dir.file("flat"), refused_while("flattened")));
  EXPECT_TRUE(read_all(dir.file("flat")) == mem);
  auto v = verify_image(*store, "base", refused_while("verified"));
  ASSERT_TRUE(v) << v.error().describe();
  EXPECT_TRUE(v->problems.empty());
  CopyOptions c;
  c.progress = refused_while("copied");
  ASSERT_TRUE(copy_image(*store, *other, "base", c));
  EXPECT_EQ(tries, 3) << "each operation reported progress while it held its lease";
  EXPECT_TRUE(lease_files(dir.file("store")).empty()) << "each released its lease when done";
  EXPECT_TRUE(lease_files(dir.file("other")).empty()) << "the destination of a copy is not leased";
  ASSERT_TRUE(delete_image(*store, "base"));
}

// A lease file written before leases said what they are for is a server's.
TEST_F(ImageLeases, ALeaseWithoutAUseIsAServers) {
  auto lease = store->lease("base", "flattened");
  ASSERT_TRUE(lease) << lease.error().describe();
  const std::string path = dir.file("store/leases/") + lease_files(dir.file("store")).at(0);
  std::string text = read_all(path);
  const size_t use = text.find("use flattened\n");
  ASSERT_NE(use, std::string::npos) << text;
  text.erase(use);
  {
    std::ofstream out(path, std::ios::trunc);  // the same file: its flock stays held
    out << text;
  }
  auto live = store->live_leases(false, nullptr);
  ASSERT_TRUE(live) << live.error().describe();
  ASSERT_EQ(live->size(), 1u);
  EXPECT_EQ((*live)[0].use, "served");
}

// A store where no lease can be written still serves the image, and says so.
TEST_F(ImageLeases, AnImageThatCannotBeLeasedIsServedAndTheFailureReported) {
  std::filesystem::remove(dir.file("store/leases"));
  write_all(dir.file("store/leases"), "a file where the directory should be");
  std::vector<Error> reported;
  ImageOpenOptions o;
  o.on_unleased = [&](const Error& e) { reported.push_back(e); };
  auto src = serve(dir.file("store"), "base", o);
  ASSERT_TRUE(src);
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_NE(reported[0].message.find("leases"), std::string::npos) << reported[0].describe();
  expect_serves(*src, mem);
}

}  // namespace
}  // namespace faultline::image
