// Diff export from a live VM (server/diff_export.h): a session serves a raw
// memory file, an image created from that file is the parent; the "VM" (this
// test thread, through the Firecracker-faithful client) reads, writes,
// writes back old bytes, writes zeros and has the balloon REMOVE pages, then
// stops (paused) and is exported. The new image, flattened, must be byte for
// byte the model of the VM's memory, and store only what changed. A VM that
// changes while it is exported is refused (ordered with the exporter's hook,
// never a sleep).
#include <sys/mman.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "client/firecracker_client.h"
#include "client/test_memory_file.h"
#include "harness.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "server/diff_export.h"

namespace faultline::testing {
namespace {

std::unique_ptr<image::LocalStore> open_store(const std::string& dir) {
  auto s = image::LocalStore::open(dir, true);
  EXPECT_TRUE(s) << s.error().describe();
  return s ? std::move(*s) : nullptr;
}

uint64_t blob_bytes(const std::string& store_dir) {
  uint64_t total = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(store_dir + "/blobs")) {
    if (e.is_regular_file()) total += e.file_size();
  }
  return total;
}

// One restored VM: the client, its session, and a model of its memory (what
// a read of each guest page returns now), with the pages present in it and
// the pages it wrote since restore.
class Vm {
 public:
  Vm(ServerHarness& h, const std::string& memory_path, std::vector<uint64_t> region_sizes, bool wp, bool huge) {
    auto c = client::FirecrackerClient::create(
        {.version = {1, 14}, .region_sizes = std::move(region_sizes), .huge_pages = huge, .wp_async = wp});
    EXPECT_TRUE(c) << c.error().describe();
    if (!c) return;
    client_ = std::make_unique<client::FirecrackerClient>(std::move(*c));
    page_size_ = client_->page_size();
    EXPECT_TRUE(client_->connect_and_send(h.socket()));
    for (int i = 0; i < 10000 && h.server().live_sessions().empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for the session to start
    }
    EXPECT_FALSE(h.server().live_sessions().empty());
    if (h.server().live_sessions().empty()) return;
    session_ = h.server().session(h.server().live_sessions().at(0).id);
    model_ = read_file(memory_path);
    EXPECT_EQ(model_.size(), client_->guest_size());
  }
  ~Vm() {
    if (client_) client_->close_socket();
  }
  bool ok() const { return session_ != nullptr; }

  uint64_t pages() const { return model_.size() / page_size_; }
  uint64_t page_size() const { return page_size_; }
  const std::string& model() const { return model_; }
  const Session& session() const { return *session_; }
  const std::set<uint64_t>& present() const { return present_; }
  const std::set<uint64_t>& written() const { return written_; }
  std::string page(uint64_t p) const { return model_.substr(p * page_size_, page_size_); }

  // A guest read: faults the page in if it is missing.
  void read(uint64_t p) {
    const volatile uint8_t* g = client_->guest_ptr(p * page_size_);
    uint8_t sum = 0;
    for (uint64_t i = 0; i < page_size_; i += 4096) sum ^= g[i];
    (void)sum;
    EXPECT_EQ(std::memcmp(client_->guest_ptr(p * page_size_), model_.data() + p * page_size_, page_size_), 0)
        << "page " << p;
    present_.insert(p);
  }
  // A guest write of the whole page.
  void write(uint64_t p, const std::string& bytes) {
    std::memcpy(client_->guest_ptr(p * page_size_), bytes.data(), page_size_);
    model_.replace(p * page_size_, page_size_, bytes);
    present_.insert(p);
    written_.insert(p);
  }
  void write_pattern(uint64_t p, uint64_t tag) {
    std::string bytes(page_size_, '\0');
    client::fill_write_pattern(tag, p * page_size_, {reinterpret_cast<uint8_t*>(bytes.data()), bytes.size()});
    write(p, bytes);
  }
  // The balloon: MADV_DONTNEED, which blocks until the server read the REMOVE.
  void remove(uint64_t first, uint64_t count) {
    auto r = client_->remove(first * page_size_, count * page_size_);
    ASSERT_TRUE(r) << r.error().describe();
    for (uint64_t p = first; p < first + count; ++p) {
      model_.replace(p * page_size_, page_size_, std::string(page_size_, '\0'));
      present_.erase(p);
      written_.erase(p);
    }
  }

 private:
  std::unique_ptr<client::FirecrackerClient> client_;
  std::shared_ptr<Session> session_;
  uint64_t page_size_ = 0;
  std::string model_;
  std::set<uint64_t> present_, written_;
};

// How the new image must store each page, from the bytes alone: as in the
// parent when unchanged, zero when it became zero, stored otherwise.
struct ExpectedKinds {
  uint64_t parent = 0, zero = 0, stored = 0;
};
ExpectedKinds expected_kinds(const std::string& parent, const std::string& now, uint64_t page_size) {
  ExpectedKinds k;
  const std::string zero(page_size, '\0');
  for (uint64_t p = 0; p * page_size < now.size(); ++p) {
    if (now.compare(p * page_size, page_size, parent, p * page_size, page_size) == 0) {
      ++k.parent;
    } else if (now.compare(p * page_size, page_size, zero) == 0) {
      ++k.zero;
    } else {
      ++k.stored;
    }
  }
  return k;
}

void expect_flattens_to(image::Store& store, const std::string& name, const std::string& out,
                        const std::string& expected, uint64_t page_size) {
  auto st = image::flatten_image(store, name, out, {});
  ASSERT_TRUE(st) << st.error().describe();
  const std::string got = read_file(out);
  ASSERT_EQ(got.size(), expected.size());
  for (uint64_t p = 0; p * page_size < got.size(); ++p) {
    ASSERT_EQ(got.compare(p * page_size, page_size, expected, p * page_size, page_size), 0)
        << "page " << p << " of " << name;
  }
  std::filesystem::remove(out);
}

// The scenario every geometry runs: reads, writes (one run across the two
// regions' boundary and one long run), a page written back to its old bytes,
// a page written with zeros, REMOVEs of read and untouched pages, a page read
// again after its REMOVE (installed zero) and one written after it.
struct Scenario {
  uint64_t write_back = 4;
  uint64_t zeroed = 0;  // chosen: a page whose parent bytes are not zero
  uint64_t removed_first = 10, removed_count = 2;
  uint64_t remove_then_write = 12;
  uint64_t untouched = 13;
};

Scenario run_scenario(Vm& vm) {
  Scenario s;
  const uint64_t n = vm.pages();
  const uint64_t half = n / 2;
  for (uint64_t p : std::vector<uint64_t>{0, 1, 9, 10, half - 1}) vm.read(p);
  const std::string old_page = vm.page(s.write_back);
  vm.read(s.write_back);
  for (uint64_t p : std::vector<uint64_t>{2, 3, half - 1, half}) vm.write_pattern(p, 100 + p);
  // Written, then written back: the bytes are the parent's again.
  vm.write_pattern(s.write_back, 99);
  vm.write(s.write_back, old_page);
  for (uint64_t p = 5; p < n; ++p) {
    if (p != 9 && p != 10 && p != half - 1 && p != half && vm.page(p) != std::string(vm.page_size(), '\0')) {
      s.zeroed = p;
      break;
    }
  }
  vm.write(s.zeroed, std::string(vm.page_size(), '\0'));
  // A long run of writes (4 KiB guests: 102 pages, more than one frame).
  for (uint64_t p = n - n / 8; p < n - n / 8 + std::max<uint64_t>(1, n / 40); ++p) vm.write_pattern(p, 7);
  vm.remove(s.removed_first, s.removed_count);  // 10 was read, 11 never touched
  vm.read(s.removed_first);                     // installed zero
  vm.remove(s.remove_then_write, 1);
  vm.write_pattern(s.remove_then_write, 55);
  return s;
}

class DiffExport : public ::testing::Test {
 protected:
  // A server on a raw memory file of `bytes` and the parent image "base"
  // created from that file.
  void serve(uint64_t bytes, uint32_t page_size) {
    ServerHarness::Options ho;
    ho.memory_bytes = bytes;
    harness_ = std::make_unique<ServerHarness>(ho);
    store_dir_ = harness_->dir().file("store");
    store_ = open_store(store_dir_);
    image::CreateOptions o;
    o.memory_path = harness_->memory();
    o.name = "base";
    o.page_size = page_size;
    auto r = image::create_image(*store_, o);
    ASSERT_TRUE(r) << r.error().describe();
    base_ = read_file(harness_->memory());
  }
  Result<ExportReport> run_export(const std::string& name, bool force_fallback = false,
                                  std::function<void()> after_first_read = {}) {
    ExportOptions o;
    o.parent = "base";
    o.name = name;
    o.force_fallback = force_fallback;
    o.after_first_read = std::move(after_first_read);
    return export_session_diff(vm_->session(), *store_, o);
  }
  void TearDown() override {
    vm_.reset();
    if (harness_) harness_->wait_ended(1);
  }
  // The whole check of one geometry.
  void export_and_check(uint32_t page_size, bool wp) {
    const uint64_t bytes = page_size == kPageSize2M ? 32 * kMiB : 16 * kMiB;
    serve(bytes, page_size);
    vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{bytes / 2, bytes / 2}, wp,
                               page_size == kPageSize2M);
    ASSERT_TRUE(vm_->ok());
    const Scenario s = run_scenario(*vm_);
    // Paused: this thread touches the guest no more.
    auto r = run_export("gen1");
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->write_protect, wp);
    // With WP the dirty query names exactly the pages written; without it,
    // every page present in the VM (a write leaves no trace).
    EXPECT_EQ(r->dirty_pages, wp ? vm_->written().size() : vm_->present().size());
    // Page 10, read again after its REMOVE: installed zero and
    // write-protected; without WP it is present, hence "dirty" (and compared).
    EXPECT_EQ(r->zero_pages, wp ? 1u : 0u);
    EXPECT_EQ(r->removed_pages, 1u);  // 11: removed, never touched again
    const ExpectedKinds k = expected_kinds(base_, vm_->model(), page_size);
    EXPECT_EQ(r->image.stored_pages, k.stored);
    EXPECT_EQ(r->image.zero_pages, k.zero);
    EXPECT_EQ(r->image.parent_pages, k.parent);
    // Unchanged bytes are never stored: the written-back page and every page
    // only read are "as in the parent"; the zeroed page is zero, not stored.
    EXPECT_EQ(k.stored, vm_->written().size() - 2) << "all written pages but the written-back and the zeroed one";
    auto manifest = store_->read_manifest("gen1");
    ASSERT_TRUE(manifest);
    auto m = image::parse_manifest(*manifest, "gen1");
    ASSERT_TRUE(m);
    uint64_t at = 0;
    for (const image::PageRun& run : m->runs) {
      for (uint64_t p = at; p < at + run.pages; ++p) {
        if (p == s.write_back || p == s.untouched || p == 0) {
          EXPECT_EQ(run.kind, image::PageKind::kParent) << p;
        }
        if (p == s.zeroed) {
          EXPECT_EQ(run.kind, image::PageKind::kZero) << p;
        }
        // Removed: zero, or "as in the parent" where the parent's page is zero too.
        if (p == 11) {
          const bool parent_zero = base_.compare(p * page_size, page_size, std::string(page_size, '\0')) == 0;
          EXPECT_EQ(run.kind, parent_zero ? image::PageKind::kParent : image::PageKind::kZero) << p;
        }
        if (p == 2 || p == s.remove_then_write) {
          EXPECT_EQ(run.kind, image::PageKind::kStored) << p;
        }
      }
      at += run.pages;
    }
    expect_flattens_to(*store_, "gen1", harness_->dir().file("flat"), vm_->model(), page_size);
    // The /proc/PID/pagemap dirty query makes the same image (same frames).
    auto again = run_export("gen1-fallback", true);
    ASSERT_TRUE(again) << again.error().describe();
    EXPECT_EQ(again->method, kernel::ScanMethod::kPagemap);
    EXPECT_EQ(again->image.stored_pages, r->image.stored_pages);
    EXPECT_EQ(again->image.frames_written, 0u) << "every frame is shared with gen1";
    expect_flattens_to(*store_, "gen1-fallback", harness_->dir().file("flat2"), vm_->model(), page_size);
  }
  // Whether the image exists (a refused export must leave none).
  bool image_exists(const std::string& name) {
    auto e = store_->manifest_exists(name);
    EXPECT_TRUE(e);
    return e && *e;
  }
  // A refused export: EBUSY, says the VM is not paused, no image; and once
  // the VM is paused a retry under the same name succeeds and is exact.
  void expect_refused_then_retry_is_exact(const Result<ExportReport>& r, const std::string& name) {
    ASSERT_FALSE(r) << "an export of a VM that changed while it was read must be refused";
    EXPECT_EQ(r.error().code, EBUSY) << r.error().describe();
    EXPECT_NE(r.error().message.find("not paused"), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find(name), std::string::npos) << r.error().message;
    EXPECT_FALSE(image_exists(name));
    auto retry = run_export(name);
    ASSERT_TRUE(retry) << retry.error().describe();
    expect_flattens_to(*store_, name, harness_->dir().file("flat"), vm_->model(), vm_->page_size());
  }

  std::unique_ptr<ServerHarness> harness_;
  std::string store_dir_;
  std::unique_ptr<image::LocalStore> store_;
  std::string base_;
  std::unique_ptr<Vm> vm_;
};

TEST_F(DiffExport, WpClientExportIsTheVmsMemoryAndStoresOnlyChangedPages4KiB) { export_and_check(kPageSize4K, true); }

TEST_F(DiffExport, NonWpClientExportComparesEveryPresentPageAndStoresOnlyChangedOnes4KiB) {
  export_and_check(kPageSize4K, false);
}

class DiffExportHugePages : public DiffExport {
 protected:
  void SetUp() override { FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation_.ok(), reservation_.reason()); }
  HugePageReservation reservation_{24};  // one 32 MiB guest, with room
};

TEST_F(DiffExportHugePages, WpClientExportIsTheVmsMemory2MiB) { export_and_check(kPageSize2M, true); }

TEST_F(DiffExportHugePages, NonWpClientExportIsTheVmsMemory2MiB) { export_and_check(kPageSize2M, false); }

// Prepares a paused 4 KiB VM after the scenario.
class DiffExportRefusal : public DiffExport, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    serve(16 * kMiB, kPageSize4K);
    vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{8 * kMiB, 8 * kMiB}, GetParam(),
                               false);
    ASSERT_TRUE(vm_->ok());
    scenario_ = run_scenario(*vm_);
  }
  Scenario scenario_;
};

TEST_P(DiffExportRefusal, AWriteToADirtyPageBetweenTwoReadsIsRefused) {
  auto r = run_export("moving", false, [&] { vm_->write_pattern(2, 4242); });
  expect_refused_then_retry_is_exact(r, "moving");
}

TEST_P(DiffExportRefusal, AWriteToAnUntouchedPageDuringTheExportIsRefused) {
  auto r = run_export("moving", false, [&] { vm_->write_pattern(scenario_.untouched, 4243); });
  expect_refused_then_retry_is_exact(r, "moving");
}

TEST_P(DiffExportRefusal, ARemoveDuringTheExportIsRefused) {
  auto r = run_export("moving", false, [&] { vm_->remove(3, 1); });
  expect_refused_then_retry_is_exact(r, "moving");
}

TEST_P(DiffExportRefusal, AWriteBackOfTheOldBytesDuringTheExportIsRefused) {
  // The written-back page is "as in the parent": read once to classify it,
  // never for a frame. Only the last read catches the change.
  auto r = run_export("moving", false, [&] { vm_->write_pattern(scenario_.write_back, 4244); });
  expect_refused_then_retry_is_exact(r, "moving");
}

INSTANTIATE_TEST_SUITE_P(WpAndNot, DiffExportRefusal, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "Wp" : "NoWp"; });

TEST_F(DiffExport, WithWpAWriteToAPageOnlyReadIsRefused) {
  serve(16 * kMiB, kPageSize4K);
  vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{16 * kMiB}, true, false);
  ASSERT_TRUE(vm_->ok());
  run_scenario(*vm_);
  // Page 0 is present and write-protected: the write makes it dirty, which
  // only the second page-map scan can see.
  auto r = run_export("moving", false, [&] { vm_->write_pattern(0, 4245); });
  expect_refused_then_retry_is_exact(r, "moving");
}

TEST_F(DiffExport, AnImageNameThatExistsIsRefused) {
  serve(16 * kMiB, kPageSize4K);
  vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{16 * kMiB}, true, false);
  ASSERT_TRUE(vm_->ok());
  run_scenario(*vm_);
  ASSERT_TRUE(run_export("gen1"));
  const std::string manifest = *store_->read_manifest("gen1");
  for (const std::string name : {"base", "gen1"}) {
    auto r = run_export(name);
    ASSERT_FALSE(r) << name;
    EXPECT_EQ(r.error().code, EEXIST);
    EXPECT_NE(r.error().message.find("image " + name + " exists already"), std::string::npos) << r.error().message;
  }
  EXPECT_EQ(*store_->read_manifest("gen1"), manifest);
  auto bad = run_export("../escape");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, EINVAL);
}

TEST_F(DiffExport, AParentOfAnotherGeometryIsRefused) {
  serve(16 * kMiB, kPageSize4K);
  image::CreateOptions co;
  co.memory_path = harness_->memory();
  co.name = "huge-base";
  co.page_size = kPageSize2M;  // the same bytes, but 2 MiB pages: not what the VM maps
  ASSERT_TRUE(image::create_image(*store_, co));
  vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{16 * kMiB}, true, false);
  ASSERT_TRUE(vm_->ok());
  run_scenario(*vm_);
  ExportOptions o;
  o.parent = "huge-base";
  o.name = "gen1";
  auto r = export_session_diff(vm_->session(), *store_, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_NE(r.error().message.find("does not fit the parent image huge-base"), std::string::npos)
      << r.error().message;
  EXPECT_FALSE(image_exists("gen1"));
}

// The export holds the store's shared lock from before it reads the parent
// until its manifest is written: a gc that starts meanwhile waits, and then
// removes none of the export's blobs.
TEST_F(DiffExport, GcDuringAnExportWaitsAndLosesNothing) {
  serve(16 * kMiB, kPageSize4K);
  vm_ = std::make_unique<Vm>(*harness_, harness_->memory(), std::vector<uint64_t>{16 * kMiB}, true, false);
  ASSERT_TRUE(vm_->ok());
  run_scenario(*vm_);
  std::mutex mu;
  std::condition_variable cv;
  bool gc_waiting = false;
  Result<image::GcReport> gc = fail("gc did not run");
  std::thread collector;
  ExportOptions o;
  o.parent = "base";
  o.name = "gen1";
  // Every frame written, the manifest not yet: what a gc without the lock
  // would remove as garbage.
  o.before_manifest = [&] {
    collector = std::thread([&] {
      auto view = open_store(store_dir_);  // another process would have its own
      image::GcOptions g;
      g.on_lock_wait = [&] {
        std::lock_guard lk(mu);
        gc_waiting = true;
        cv.notify_all();
      };
      gc = image::gc_store(*view, g);
    });
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return gc_waiting; });
  };
  auto r = export_session_diff(vm_->session(), *store_, o);
  collector.join();
  ASSERT_TRUE(r) << r.error().describe();
  ASSERT_TRUE(gc) << gc.error().describe();
  EXPECT_EQ(gc->removed_blobs, 0u);
  auto v = image::verify_image(*store_, "gen1", {});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->problems.empty());
  expect_flattens_to(*store_, "gen1", harness_->dir().file("flat"), vm_->model(), 4096);
}

// The core behind both create paths, through its input interface.
class CreateFromPages : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = open_store(dir_.file("store"));
    ASSERT_TRUE(client::write_test_memory_file(dir_.file("mem"), 1 * kMiB, 5, 0.0));
    image::CreateOptions o;
    o.memory_path = dir_.file("mem");
    o.name = "base";
    ASSERT_TRUE(image::create_image(*store_, o));
    base_ = read_file(dir_.file("mem"));
  }
  image::PagesCreateOptions options(const std::string& name) {
    image::PagesCreateOptions o;
    o.name = name;
    o.parent = "base";
    o.source = "test input";
    o.guest_bytes = base_.size();
    o.pages.assign(base_.size() / 4096, image::PageInput::kAsParent);
    return o;
  }
  TempDir dir_;
  std::unique_ptr<image::LocalStore> store_;
  std::string base_;
};

TEST_F(CreateFromPages, CandidatesAreReadInRunsAndComparedWithTheParent) {
  image::PagesCreateOptions o = options("child");
  std::string now = base_;
  for (uint64_t p = 10; p < 40; ++p) o.pages[p] = image::PageInput::kCandidate;
  for (uint64_t p = 20; p < 30; ++p) {  // changed; 10-19 and 30-39 keep the parent's bytes
    client::fill_write_pattern(9, p * 4096, {reinterpret_cast<uint8_t*>(now.data() + p * 4096), 4096});
  }
  o.pages[50] = image::PageInput::kZero;
  now.replace(50 * 4096, 4096, std::string(4096, '\0'));
  std::vector<std::pair<uint64_t, uint64_t>> reads;
  o.max_read_bytes = 16 * 4096;
  o.read = [&](uint64_t first, uint64_t count, std::span<uint8_t> buffer) -> Result<const uint8_t*> {
    reads.emplace_back(first, count);
    std::memcpy(buffer.data(), now.data() + first * 4096, count * 4096);
    return buffer.data();
  };
  auto r = image::create_image_from_pages(*store_, o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->stored_pages, 10u);
  EXPECT_EQ(r->zero_pages, 1u);
  EXPECT_EQ(r->parent_pages, base_.size() / 4096 - 11);
  // Pass 1: runs of at most 16 pages; pass 2: the stored pages, one run.
  const std::vector<std::pair<uint64_t, uint64_t>> expected{{10, 16}, {26, 14}, {20, 10}};
  EXPECT_EQ(reads, expected);
  expect_flattens_to(*store_, "child", dir_.file("flat"), now, 4096);
}

TEST_F(CreateFromPages, AReadErrorOrARefusalBeforeTheManifestLeavesNoImage) {
  image::PagesCreateOptions o = options("failed");
  o.pages[3] = image::PageInput::kCandidate;
  o.read = [&](uint64_t, uint64_t, std::span<uint8_t>) -> Result<const uint8_t*> {
    return fail("the input is gone", EIO);
  };
  auto r = image::create_image_from_pages(*store_, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EIO);
  o.read = [&](uint64_t first, uint64_t count, std::span<uint8_t> buffer) -> Result<const uint8_t*> {
    std::memset(buffer.data(), 0x5a, count * 4096);
    (void)first;
    return buffer.data();
  };
  o.check_before_manifest = [] { return Status(fail("changed under us", EBUSY)); };
  r = image::create_image_from_pages(*store_, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EBUSY);
  auto e = store_->manifest_exists("failed");
  ASSERT_TRUE(e);
  EXPECT_FALSE(*e);
}

TEST_F(CreateFromPages, AsInTheParentWithoutAParentIsRefused) {
  image::PagesCreateOptions o = options("orphan");
  o.parent.reset();
  auto r = image::create_image_from_pages(*store_, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_NE(r.error().message.find("no parent"), std::string::npos) << r.error().message;
}

// Generation 0 of a chain: image "gen0" of a generated memory file
// (DIR/gen0.mem, seed `seed`), whose bytes become `model`.
Result<image::CreateReport> create_base_generation(image::Store& store, const TempDir& dir, uint64_t bytes,
                                                   uint64_t seed, std::string& model) {
  if (auto st = client::write_test_memory_file(dir.file("gen0.mem"), bytes, seed, 0.2); !st) {
    return std::unexpected(st.error());
  }
  image::CreateOptions co;
  co.memory_path = dir.file("gen0.mem");
  co.name = "gen0";
  auto base = image::create_image(store, co);
  model = read_file(dir.file("gen0.mem"));
  return base;
}

// Ten generations, each restored from the previous image (its flatten: the
// daemon serving images directly is another part of this issue), written (5 %
// of the pages), REMOVEd and exported on top of it; WP and not alternate.
TEST(DiffExportChain, TenGenerationsRestoreExactlyAndStoreOnlyTheBaseAndChangedPages) {
#if defined(__SANITIZE_THREAD__)
  // Every byte costs ~6x under ThreadSanitizer (88 s against 13 s for 16 MiB
  // in CI). Half the guest keeps all ten generations, the WP/non-WP
  // alternation, the REMOVEs, the reads and 5 % of the pages written (102
  // instead of 204 each, in 16 frames instead of 32), so the same code runs
  // and every assertion holds as it stands.
  constexpr uint64_t kBytes = 8 * kMiB;
#else
  constexpr uint64_t kBytes = 16 * kMiB;
#endif
  constexpr uint64_t kPages = kBytes / 4096;
  TempDir dir;
  const std::string store_dir = dir.file("store");
  auto store = open_store(store_dir);
  std::string model;
  auto base = create_base_generation(*store, dir, kBytes, 21, model);
  ASSERT_TRUE(base) << base.error().describe();
  std::filesystem::remove(dir.file("gen0.mem"));
  std::mt19937_64 rng(2026);
  uint64_t changed_bound = 0, manifests = base->manifest_bytes;
  for (int g = 1; g <= 10; ++g) {
    const std::string mem = dir.file("restore.mem");
    ASSERT_TRUE(image::flatten_image(*store, "gen" + std::to_string(g - 1), mem, {}));
    ASSERT_TRUE(read_file(mem) == model) << "generation " << g << " restores what generation " << g - 1 << " had";
    ServerHarness::Options ho;
    ho.memory_bytes = 4 * 4096;  // the harness's own file is not served
    ho.configure = [&](ServerConfig& c, const TempDir&) { c.memory_path = mem; };
    const bool wp = g % 2 == 0;
    {
      ServerHarness h(ho);
      auto vm = std::make_unique<Vm>(h, mem, std::vector<uint64_t>{kBytes}, wp, false);
      ASSERT_TRUE(vm->ok());
      // REMOVEs first (some pages then written again), then 5 % written.
      std::set<uint64_t> removed;
      while (removed.size() < 40) removed.insert(rng() % kPages);
      for (uint64_t p : removed) vm->remove(p, 1);
      std::set<uint64_t> written;
      while (written.size() < kPages / 20) written.insert(rng() % kPages);
      for (uint64_t p : written) vm->write_pattern(p, 1000 * g + p);
      for (uint64_t p = 0; p < kPages; p += 97) vm->read(p);  // some pages only read
      ExportOptions o;
      o.parent = "gen" + std::to_string(g - 1);
      o.name = "gen" + std::to_string(g);
      auto r = export_session_diff(vm->session(), *store, o);
      ASSERT_TRUE(r) << "generation " << g << ": " << r.error().describe();
      EXPECT_EQ(r->write_protect, wp);
      // Every written page differs from before (a new tag); nothing else is stored.
      EXPECT_EQ(r->image.stored_pages, written.size()) << "generation " << g;
      const ExpectedKinds k = expected_kinds(model, vm->model(), 4096);
      EXPECT_EQ(r->image.zero_pages, k.zero) << "generation " << g;
      // A diff's manifest is proportional to what it changes, not to the guest.
      EXPECT_LT(r->image.manifest_bytes, 4096u) << "generation " << g;
      // Written pages are random bytes: a stored page costs at most its size
      // and zstd's framing.
      changed_bound += r->image.stored_pages * 4096 + r->image.frames * 64;
      manifests += r->image.manifest_bytes;
      model = vm->model();
      vm.reset();  // closes the socket: the session ends
      h.wait_ended(1);
    }
    // Only once its server is gone: a served file that vanishes is logged by
    // the server's file watch.
    std::filesystem::remove(mem);
  }
  EXPECT_LE(blob_bytes(store_dir), base->stored_bytes + changed_bound);
  uint64_t manifest_files = 0;
  for (auto& e : std::filesystem::directory_iterator(store_dir + "/images")) manifest_files += e.file_size();
  EXPECT_EQ(manifest_files, manifests);
  expect_flattens_to(*store, "gen10", dir.file("last.mem"), model, 4096);
  auto info = image::inspect_image(*store, "gen10");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->layers.size(), 11u);
}


// The chain as a user runs it: every generation is restored straight
// from the previous image (serve --image, its whole chain of parents), written,
// REMOVEd, and exported with the daemon's snapshot (the last one through
// `faultline snapshot` and the control socket, a separate process); the last
// image is then restored, again from the image, and every page is checked
// against a model of what every generation wrote.
TEST(DiffExportChain, TenGenerationsEachRestoredFromThePreviousImageThroughTheDaemon) {
  constexpr uint64_t kBytes = 8 * kMiB;
  constexpr uint64_t kPages = kBytes / 4096;
  TempDir dir;
  const std::string store_dir = dir.file("store");
  auto store = open_store(store_dir);
  std::string model;
  auto base = create_base_generation(*store, dir, kBytes, 33, model);
  ASSERT_TRUE(base) << base.error().describe();
  std::mt19937_64 rng(77);
  // Serves image `name`; the Vm's model starts as `model`.
  auto serve = [&](const std::string& name) {
    ServerHarness::Options ho;
    ho.memory_bytes = 4 * 4096;  // the harness's own file is not served
    ho.configure = [&, name](ServerConfig& c, const TempDir& d) {
      c.memory_path.clear();
      c.image_path = store_dir + "/" + name;
      c.control_path = d.file("ctl");
    };
    return std::make_unique<ServerHarness>(ho);
  };
  const std::string model_file = dir.file("model.mem");
  for (int g = 1; g <= 10; ++g) {
    std::ofstream(model_file, std::ios::binary | std::ios::trunc).write(model.data(), static_cast<std::streamsize>(model.size()));
    auto h = serve("gen" + std::to_string(g - 1));
    const bool wp = g % 2 == 1;
    auto vm = std::make_unique<Vm>(*h, model_file, std::vector<uint64_t>{kBytes}, wp, false);
    ASSERT_TRUE(vm->ok());
    for (uint64_t p = g; p < kPages; p += 61) vm->read(p);  // read back what earlier generations wrote
    std::set<uint64_t> removed;
    while (removed.size() < 20) removed.insert(rng() % kPages);
    for (uint64_t p : removed) vm->remove(p, 1);
    std::set<uint64_t> written;
    while (written.size() < kPages / 20) written.insert(rng() % kPages);
    for (uint64_t p : written) vm->write_pattern(p, 7000 * g + p);
    const std::string name = "gen" + std::to_string(g);
    const uint64_t id = h->server().live_sessions().at(0).id;
    if (g < 10) {
      auto r = h->server().snapshot(id, store_dir, name);
      ASSERT_TRUE(r) << "generation " << g << ": " << r.error().describe();
      EXPECT_EQ(r->report.write_protect, wp);
      EXPECT_EQ(r->report.image.stored_pages, written.size()) << "generation " << g;
      EXPECT_NE(h->log().find("event=snapshot_written session=" + std::to_string(id) + " image=" + name),
                std::string::npos);
    } else {
      // The VM stays paused (this thread touches nothing) while the command runs.
      const std::string out = dir.file("snapshot.out");
      const pid_t pid = spawn({built_binary("faultline"), "snapshot", "--control", h->dir().file("ctl"), "--session",
                               std::to_string(id), "--store", store_dir, "--name", name},
                              out);
      const int status = wait_child(pid, std::chrono::seconds(120));
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(out);
      auto reply = nlohmann::json::parse(read_file(out), nullptr, false);
      ASSERT_FALSE(reply.is_discarded()) << read_file(out);
      EXPECT_EQ(reply["image"], name);
      EXPECT_EQ(reply["parent"], "gen9");
      EXPECT_EQ(reply["stored_pages"], written.size());
      // Another store is refused: the daemon writes only where it serves from.
      const pid_t other = spawn({built_binary("faultline"), "snapshot", "--control", h->dir().file("ctl"),
                                 "--session", std::to_string(id), "--store", dir.path(), "--name", "elsewhere"},
                                out);
      const int refused = wait_child(other, std::chrono::seconds(60));
      EXPECT_TRUE(WIFEXITED(refused) && WEXITSTATUS(refused) == 1) << read_file(out);
      EXPECT_NE(read_file(out).find("writes only into the store"), std::string::npos) << read_file(out);
    }
    model = vm->model();
    vm.reset();
    ASSERT_TRUE(h->wait_ended(1));
  }
  // The last image, restored from the store: every page is the model's.
  std::ofstream(model_file, std::ios::binary | std::ios::trunc).write(model.data(), static_cast<std::streamsize>(model.size()));
  auto h = serve("gen10");
  EXPECT_TRUE(eventually_true([&] { return h->log().find("image_layers=11") != std::string::npos; })) << h->log();
  {
    Vm vm(*h, model_file, std::vector<uint64_t>{kBytes}, false, false);
    ASSERT_TRUE(vm.ok());
    for (uint64_t p = 0; p < kPages; ++p) vm.read(p);
  }
  ASSERT_TRUE(h->wait_ended(1));
  auto info = image::inspect_image(*store, "gen10");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->layers.size(), 11u);
}

}  // namespace
}  // namespace faultline::testing
