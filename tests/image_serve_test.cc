// `faultline serve --image`: VMs restored from an image and its chain of
// parents get exactly the bytes of the memory files the layers were made
// from; a damaged image is refused or kills the VM, never serves a wrong page.
// (Reads, writes, REMOVEs, WP bits and prefaults from an image against a
// model: stress_test's Image* cases, 4 KiB and 2 MiB.)
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "common/mapping.h"
#include "harness.h"
#include "image/frame_buffer.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "image/operations.h"

namespace faultline::testing {
namespace {

// Small guests: these tests run under ThreadSanitizer too, where every byte
// the client verifies costs ~50x; 16 MiB is still 32 frames of 128 pages.
constexpr uint64_t kGuestBytes = 16 * kMiB;

// One copy, from a mapping of the file (a file that cannot be mapped fails
// the test): an element-wise char-to-uint8_t copy is a store per byte, which
// ThreadSanitizer checks one by one (seconds per 64 MiB).
std::vector<uint8_t> read_bytes(const std::string& path) {
  auto file = Mapping::map_file(path);
  if (!file) {
    ADD_FAILURE() << file.error().describe();
    return {};
  }
  return std::vector<uint8_t>(file->bytes(), file->bytes() + file->size());
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A copy of `from` with about `fraction` of its 4 KiB pages rewritten with
// new bytes and some set to zero: the memory of the next generation.
void write_generation(const std::string& from, const std::string& to, double fraction, uint64_t seed) {
  std::vector<uint8_t> bytes = read_bytes(from);
  std::mt19937_64 rng(seed);
  const uint64_t pages = bytes.size() / 4096;
  for (uint64_t p = 0; p < pages; ++p) {
    if (std::uniform_real_distribution<double>(0, 1)(rng) >= fraction) continue;
    uint8_t* page = bytes.data() + p * 4096;
    if (p % 5 == 0) {
      std::memset(page, 0, 4096);
    } else {
      for (int i = 0; i < 4096; i += 8) {
        const uint64_t v = rng();
        std::memcpy(page + i, &v, 8);
      }
    }
  }
  write_bytes(to, bytes);
}

image::CreateReport create(const std::string& store_dir, const std::string& name, const std::string& memory,
                           std::optional<std::string> parent = std::nullopt) {
  auto store = image::LocalStore::open(store_dir, true);
  EXPECT_TRUE(store);
  image::CreateOptions o;
  o.memory_path = memory;
  o.name = name;
  o.parent = std::move(parent);
  auto r = image::create_image(**store, o);
  EXPECT_TRUE(r) << r.error().describe();
  return r ? *r : image::CreateReport{};
}

client::RestoreOptions restore_options(const std::string& socket, const std::string& model) {
  client::RestoreOptions o;
  o.socket_path = socket;
  o.memory_path = model;
  o.threads = 2;
  o.touch_fraction = 1.0;
  return o;
}

// A guest restored through `h` reads every page and finds the file's bytes;
// then its session ends. Use with ASSERT_NO_FATAL_FAILURE.
void restore_every_page(ServerHarness& h) {
  auto r = client::run_restore(restore_options(h.socket(), h.memory()));
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_GT(r->pages_verified, 0u);
  ASSERT_TRUE(h.wait_ended(1));
}

TEST(ImageServe, GuestReadsEveryByteOfTheFileTheImageWasMadeFromAndEachFrameIsDecompressedOnce) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  ho.zero_fraction = 0.2;
  ServerHarness h(ho);
  ASSERT_NO_FATAL_FAILURE(restore_every_page(h));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  // Zero pages of the image are known from its manifest: installed without a
  // read.
  EXPECT_GT(s.counters.snapshot_zero_pages, 0u);
  EXPECT_GT(s.counters.pages_snapshot, s.counters.snapshot_zero_pages);
  // Every frame was touched; the cache (256 MiB) holds them all: one load each,
  // and the event reader served pages of frames already in memory.
  const auto snap = h.server().metrics().snapshot();
  ASSERT_TRUE(snap.frame_cache.has_value());
  EXPECT_EQ(snap.frame_cache->misses, frames_in_chain(h.dir().file("store"), "base"));
  EXPECT_EQ(snap.frame_cache->load_failures, 0u);
  EXPECT_GT(s.counters.reader_served, 0u);
  const std::string metrics = h.server().metrics().render();
  EXPECT_NE(metrics.find("faultline_frame_cache_misses_total "), std::string::npos);
  // The frames live in frame memory (huge-page chunks), counted apart.
  EXPECT_GT(snap.frame_cache->memory_bytes, 0u);
  EXPECT_GE(snap.frame_cache->memory_fresh_bytes, snap.frame_cache->memory_bytes);
  for (const char* name : {"faultline_frame_memory_bytes ", "faultline_frame_memory_fresh_bytes_total ",
                           "faultline_frame_memory_slot_reuses_total ", "faultline_frame_memory_free_slot_bytes "}) {
    EXPECT_NE(metrics.find(name), std::string::npos) << name;
  }
  // Nothing allocates frames between the scrape and this recount.
  EXPECT_EQ(snap.frame_cache->memory_free_slot_bytes, image::FrameBuffer::count_free_slot_bytes());
  EXPECT_LT(snap.frame_cache->memory_free_slot_bytes, snap.frame_cache->memory_bytes);
}

// A daemon faults its frame memory in once: a server started after another
// one stopped decompresses into the chunks the first one left (kept up to the
// frame cache's capacity), not into fresh memory.
TEST(ImageServe, AServerAfterAnotherDecompressesIntoTheFrameMemoryTheFirstLeft) {
  image::FrameBuffer::release_empty_chunks();
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  uint64_t fresh_after_first = 0;
  {
    ServerHarness h(ho);
    ASSERT_NO_FATAL_FAILURE(restore_every_page(h));
    fresh_after_first = image::FrameBuffer::totals().fresh_bytes;
  }
  // The first server's frames were freed with its cache: their chunks are kept.
  EXPECT_GT(image::FrameBuffer::totals().chunks_empty, 0u);
  const uint64_t reuses_before = image::FrameBuffer::totals().slot_reuses;
  ServerHarness h(ho);
  ASSERT_NO_FATAL_FAILURE(restore_every_page(h));
  const image::FrameBuffer::Totals after = image::FrameBuffer::totals();
  EXPECT_EQ(after.fresh_bytes, fresh_after_first);  // no new frame memory
  EXPECT_GT(after.slot_reuses, reuses_before);
  const auto snap = h.server().metrics().snapshot();
  ASSERT_TRUE(snap.frame_cache.has_value());
  EXPECT_GT(snap.frame_cache->misses, 0u);  // the frames were loaded again, into reused memory
  EXPECT_EQ(snap.frame_cache->memory_slot_reuses, after.slot_reuses);
}

TEST(ImageServe, AChainOfThreeServesEachPageFromItsNewestLayer) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.configure = [](ServerConfig& c, const TempDir& d) {
    const std::string store = d.file("store");
    write_generation(c.memory_path, d.file("gen1"), 0.05, 1);
    write_generation(d.file("gen1"), d.file("gen2"), 0.05, 2);
    create(store, "gen0", c.memory_path);
    const auto r1 = create(store, "gen1", d.file("gen1"), "gen0");
    const auto r2 = create(store, "gen2", d.file("gen2"), "gen1");
    // Diffs store only what changed (about 5 % of the pages each).
    EXPECT_LT(r1.stored_pages, r1.guest_pages / 10);
    EXPECT_LT(r2.stored_pages, r2.guest_pages / 10);
    c.memory_path.clear();
    c.image_path = store + "/gen2";
  };
  ServerHarness h(ho);
  auto r = client::run_restore(restore_options(h.socket(), h.dir().file("gen2")));
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_NE(h.log().find("image_layers=3"), std::string::npos);
}

TEST(ImageServe, PrefetchOfARecordedWorkingSetAndEagerFillWorkFromAnImage) {
  TempDir shared;
  const std::string ws = shared.file("ws");
  {
    ServerHarness::Options ho;
    ho.memory_bytes = kGuestBytes;
    ho.serve_image = true;
    ho.configure = [&](ServerConfig& c, const TempDir&) { c.record_path = ws; };
    ServerHarness h(ho);
    auto o = restore_options(h.socket(), h.memory());
    o.touch_fraction = 0.3;
    auto r = client::run_restore(o);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u);
    ASSERT_TRUE(h.wait_ended(1));
  }
  for (const bool all : {false, true}) {
    ServerHarness::Options ho;
    ho.memory_bytes = kGuestBytes;
    ho.serve_image = true;
    ho.configure = [&](ServerConfig& c, const TempDir&) {
      if (all) {
        c.prefetch_all = true;
      } else {
        c.prefetch_path = ws;
      }
    };
    ServerHarness h(ho);
    auto o = restore_options(h.socket(), h.memory());
    o.touch_fraction = 0.3;
    auto r = client::run_restore(o);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u) << (all ? "prefetch all" : "prefetch working set");
    ASSERT_TRUE(h.wait_ended(1));
    const SessionSummary s = h.server().finished_sessions().at(0);
    EXPECT_GT(s.counters.prefaulted_pages, 0u) << (all ? "prefetch all" : "prefetch working set");
  }
}

TEST(ImageServe, ManySessionsOfOneImageShareOneLoadPerFrame) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  ServerHarness h(ho);
  constexpr int kVms = 4;
  std::vector<std::thread> vms;
  std::vector<Result<client::RestoreReport>> reports(kVms);
  for (int i = 0; i < kVms; ++i) {
    vms.emplace_back([&, i] {
      auto o = restore_options(h.socket(), h.memory());
      o.threads = 1;
      o.seed = static_cast<uint64_t>(i) + 1;
      reports[i] = client::run_restore(o);
    });
  }
  for (auto& t : vms) t.join();
  for (int i = 0; i < kVms; ++i) {
    ASSERT_TRUE(reports[i]) << reports[i].error().describe();
    EXPECT_EQ(reports[i]->mismatches, 0u) << "VM " << i;
  }
  ASSERT_TRUE(h.wait_ended(kVms));
  const auto snap = h.server().metrics().snapshot();
  ASSERT_TRUE(snap.frame_cache.has_value());
  EXPECT_EQ(snap.frame_cache->misses, frames_in_chain(h.dir().file("store"), "base"))
      << "each frame is decompressed once for all sessions";
}

TEST(ImageServe, TwoDaemonsServeOneStoreAtOnce) {
  ServerHarness::Options first;
  first.memory_bytes = kGuestBytes;
  first.serve_image = true;
  ServerHarness a(first);
  // A second daemon on the first one's store and image.
  ServerHarness::Options second;
  second.memory_bytes = kGuestBytes;
  second.configure = [&](ServerConfig& c, const TempDir&) {
    c.memory_path.clear();
    c.image_path = a.dir().file("store") + "/base";
  };
  ServerHarness b(second);
  Result<client::RestoreReport> ra, rb;
  std::thread ta([&] { ra = client::run_restore(restore_options(a.socket(), a.memory())); });
  std::thread tb([&] { rb = client::run_restore(restore_options(b.socket(), a.memory())); });
  ta.join();
  tb.join();
  ASSERT_TRUE(ra) << ra.error().describe();
  ASSERT_TRUE(rb) << rb.error().describe();
  EXPECT_EQ(ra->mismatches, 0u);
  EXPECT_EQ(rb->mismatches, 0u);
  ASSERT_TRUE(a.wait_ended(1));
  ASSERT_TRUE(b.wait_ended(1));
}

// --- damaged images ---------------------------------------------------------

std::string blob_path(const std::string& store_dir, const image::BlobId& id) {
  return store_dir + "/blobs/sha256/" + id.hex().substr(0, 2) + "/" + id.hex();
}

void flip_byte(const std::string& path, uint64_t at) {
  std::filesystem::permissions(path, std::filesystem::perms::owner_write, std::filesystem::perm_options::add);
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  const char c = static_cast<char>(f.get());
  f.seekp(static_cast<std::streamoff>(at));
  f.put(static_cast<char>(c ^ 0x40));
}

Result<std::unique_ptr<Server>> start_server(const std::string& image_path, const std::string& socket,
                                             const Logger& log) {
  ServerConfig c;
  c.socket_path = socket;
  c.image_path = image_path;
  return Server::create(c, log);
}

TEST(ImageServe, ADamagedChainIsRefusedAtStartNamingTheImage) {
  TempDir d;
  ASSERT_TRUE(client::write_test_memory_file(d.file("mem"), 8 * kMiB, 3, 0.1));
  write_generation(d.file("mem"), d.file("gen1"), 0.05, 4);
  const std::string store = d.file("store");
  create(store, "base", d.file("mem"));
  create(store, "child", d.file("gen1"), "base");
  Logger log(LogFormat::kText, LogLevel::kError, -1);

  // A missing parent.
  std::filesystem::rename(store + "/images/base", d.file("base.manifest"));
  auto missing = start_server(store + "/child", d.file("s1"), log);
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("base"), std::string::npos) << missing.error().message;
  std::filesystem::rename(d.file("base.manifest"), store + "/images/base");
  ASSERT_TRUE(start_server(store + "/child", d.file("s2"), log));

  // A flipped byte in a manifest.
  std::filesystem::copy_file(store + "/images/child", d.file("child.manifest"));
  flip_byte(store + "/images/child", 60);
  auto flipped = start_server(store + "/child", d.file("s3"), log);
  ASSERT_FALSE(flipped);
  EXPECT_NE(flipped.error().message.find("child"), std::string::npos) << flipped.error().message;

  // A truncated manifest.
  std::filesystem::remove(store + "/images/child");
  std::vector<uint8_t> bytes = read_bytes(d.file("child.manifest"));
  bytes.resize(bytes.size() / 2);
  write_bytes(store + "/images/child", bytes);
  auto truncated = start_server(store + "/child", d.file("s4"), log);
  ASSERT_FALSE(truncated);
  EXPECT_NE(truncated.error().message.find("child"), std::string::npos) << truncated.error().message;

  // Not STORE/NAME at all.
  EXPECT_FALSE(start_server("child", d.file("s5"), log));
  EXPECT_FALSE(start_server(store + "/nosuch", d.file("s6"), log));
}

// A VM restored by a separate faultline-client process (so that it can be
// killed), output to `out`.
pid_t spawn_vm(const ServerHarness& h, const std::string& out) {
  return spawn({built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", h.memory(),
                "--threads", "1", "--remove-fraction", "0"},
               out);
}

// A frame damaged (or lost) after the daemon started: the fault that needs it
// ends the session, the VM is killed under --on-fatal=kill, and the log names
// the image and the blob. The VM is a separate process (it is killed).
void expect_vm_killed_over_frame(const std::function<void(const std::string& store, const image::BlobId&)>& damage,
                                 const std::string& what) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  ho.on_fatal = OnFatal::kKill;
  ServerHarness h(ho);
  const std::string store = h.dir().file("store");
  image::BlobId id;
  {
    auto s = image::LocalStore::open(store, false);
    ASSERT_TRUE(s);
    auto chain = image::ImageChain::open(**s, "base");
    ASSERT_TRUE(chain);
    id = chain->layers()[0].manifest.frames.at(3).id;
  }
  damage(store, id);
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn_vm(h, out);
  ASSERT_GT(pid, 0);
  const int status = wait_child(pid, std::chrono::seconds(60));
  ASSERT_NE(status, -1) << "the VM hung: " << read_file(out);
  ASSERT_TRUE(WIFSIGNALED(status)) << what << ": the VM exited on its own: " << read_file(out);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  EXPECT_EQ(read_file(out).find("mismatch"), std::string::npos) << read_file(out);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kFatal);
  EXPECT_TRUE(s.peer_killed);
  EXPECT_NE(s.error.find(id.hex()), std::string::npos) << what << ": " << s.error;
  EXPECT_NE(s.error.find("image base"), std::string::npos) << what << ": " << s.error;
}

TEST(ImageServe, AFrameDamagedAfterStartKillsTheVmAndNamesTheBlob) {
  expect_vm_killed_over_frame(
      [](const std::string& store, const image::BlobId& id) { flip_byte(blob_path(store, id), 10); }, "flipped byte");
}

TEST(ImageServe, AFrameMissingAfterStartKillsTheVmAndNamesTheBlob) {
  expect_vm_killed_over_frame(
      [](const std::string& store, const image::BlobId& id) { std::filesystem::remove(blob_path(store, id)); },
      "missing blob");
}

#if defined(FAULTLINE_TEST_HOOKS)
TEST(ImageServe, ARetryableSourceErrorIsRetriedUntilTheReadSucceeds) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  ho.reader_serves_cached = false;  // every read goes through a worker's read_source()
  ServerHarness h(ho);
  std::atomic<int> failures{0};
  test_hooks::set(HookPoint::kSourceRead, [&](HookContext& c) {
    if (failures.fetch_add(1) < 5) c.inject_errno = EAGAIN;  // a store that timed out, five times
  });
  auto o = restore_options(h.socket(), h.memory());
  o.touch_fraction = 0.2;
  auto r = client::run_restore(o);
  test_hooks::clear_all();
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  EXPECT_EQ(s.counters.source_retries, 5u);
}

TEST(ImageServe, AFinalSourceErrorEndsTheSessionAndKillsTheVm) {
  ServerHarness::Options ho;
  ho.memory_bytes = kGuestBytes;
  ho.serve_image = true;
  ho.on_fatal = OnFatal::kKill;
  ServerHarness h(ho);
  test_hooks::set(HookPoint::kSourceRead, [](HookContext& c) { c.inject_errno = EIO; });
  const std::string out = h.dir().file("client.out");
  pid_t pid = spawn_vm(h, out);
  ASSERT_GT(pid, 0);
  const int status = wait_child(pid, std::chrono::seconds(60));
  test_hooks::clear_all();
  ASSERT_NE(status, -1) << "the VM hung";
  ASSERT_TRUE(WIFSIGNALED(status)) << read_file(out);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kFatal);
  EXPECT_EQ(s.counters.source_retries, 0u) << "EIO is final: no retry";
}
#endif

}  // namespace
}  // namespace faultline::testing
