#include "bench/storage.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <zstd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <thread>

#include "bench/corpus.h"
#include "bench/load.h"
#include "bench/stats.h"
#include "client/test_memory_file.h"
#include "common/mapping.h"
#include "common/unique_fd.h"
#include "image/frame.h"
#include "image/frame_buffer.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "snapshot/working_set.h"

namespace faultline::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPage = 4096;
constexpr int kGenerations = 10;
constexpr double kWrittenShare = 0.05;
constexpr int kLevel = 3;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
double mb_per_s(uint64_t bytes, double s) { return static_cast<double>(bytes) / 1e6 / s; }

// CPU time of this process (every thread), user + system.
double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

double median_of(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

Result<uint64_t> zstd_size(const uint8_t* p, uint64_t n, double* seconds) {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  if (cctx == nullptr) return fail("cannot allocate a zstd context", ENOMEM);
  std::string out(ZSTD_compressBound(n), '\0');
  const auto t0 = Clock::now();
  const size_t z = ZSTD_compressCCtx(cctx, out.data(), out.size(), p, n, kLevel);
  if (seconds != nullptr) *seconds = seconds_since(t0);
  ZSTD_freeCCtx(cctx);
  if (ZSTD_isError(z)) return fail(std::string("zstd: ") + ZSTD_getErrorName(z));
  return z;
}

std::set<std::string> blob_names(image::Store& store, const std::string& name, uint64_t* manifest_bytes) {
  std::set<std::string> out;
  auto chain = image::ImageChain::open(store, name);
  if (!chain) return out;
  for (const auto& layer : chain->layers()) {
    for (const auto& f : layer.manifest.frames) out.insert(f.id.hex());
    if (manifest_bytes != nullptr) *manifest_bytes += layer.manifest_bytes;
  }
  return out;
}

// Everything measured on one memory file; fills `row` or returns why not.
// What a decompressed frame pays to be written into memory, apart from the
// decompression itself (docs/performance.md, "Frame memory"): for frames of
// 512 KiB and 2 MiB, 64 MiB of them held at once as a frame cache holds
// them, each written whole (memset) once, median per frame:
//  - heap: std::string memory, as frames were held before FrameBuffer
//    (malloc: 4 KiB pages, each first write a page fault);
//  - fresh chunk: FrameBuffer memory never used before (no chunk kept: a
//    daemon's first frames; transparent huge pages where the kernel has them);
//  - reused slot: a full cache's steady state, each new frame written into
//    the slot the frame it evicted freed.
void measure_frame_memory(Row& row) {
  for (const size_t frame : {size_t{512} << 10, size_t{2} << 20}) {
    const std::string suffix = frame == (size_t{2} << 20) ? "_2m" : "_512k";
    const size_t n = (size_t{64} << 20) / frame;
    std::vector<double> heap_us, fresh_us, reused_us;
    {
      std::vector<std::string> held;
      for (size_t i = 0; i < n; ++i) {
        const auto t0 = Clock::now();
        std::string s;
        s.resize_and_overwrite(frame, [](char* p, size_t size) {
          std::memset(p, 0x5a, size);
          return size;
        });
        heap_us.push_back(seconds_since(t0) * 1e6);
        held.push_back(std::move(s));
      }
    }
    image::FrameBuffer::release_empty_chunks();
    std::vector<image::FrameBuffer> held;
    for (size_t i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      image::FrameBuffer b = image::FrameBuffer::allocate(frame);
      std::memset(b.data(), 0x5a, frame);
      fresh_us.push_back(seconds_since(t0) * 1e6);
      held.push_back(std::move(b));
    }
    for (size_t i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      held[i] = image::FrameBuffer{};
      held[i] = image::FrameBuffer::allocate(frame);
      std::memset(held[i].data(), 0x5a, frame);
      reused_us.push_back(seconds_since(t0) * 1e6);
    }
    held.clear();
    image::FrameBuffer::release_empty_chunks();
    row.metrics.emplace_back("mem_heap_us" + suffix, median_of(heap_us));
    row.metrics.emplace_back("mem_fresh_chunk_us" + suffix, median_of(fresh_us));
    row.metrics.emplace_back("mem_reused_slot_us" + suffix, median_of(reused_us));
  }
}

Status measure_file(Context& ctx, const std::string& path, const std::string& ws_path, Row& row) {
  // Stores on the disk (beside the memory files) and in memory (tmpfs, where
  // syncfs has nothing to wait for): on this shared machine a syncfs also
  // waits for every other writer of the file system (other sessions' builds),
  // which says nothing about create itself.
  const std::string work = ctx.dir + "/storage-" + row.subject;
  std::string mem_work = work;
  {
    char tmpl[] = "/dev/shm/faultline-bench-storage-XXXXXX";
    struct statfs fs {};
    if (::statfs("/dev/shm", &fs) == 0 && fs.f_type == TMPFS_MAGIC && ::mkdtemp(tmpl) != nullptr) mem_work = tmpl;
  }
  std::filesystem::create_directories(work);
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } cleanup{work}, mem_cleanup{mem_work};
  const bool in_memory = mem_work != work;
  row.metrics.emplace_back("load1_before", load_average_1min());
  warm_page_cache(path);
  auto raw = Mapping::map_file(path);
  if (!raw) return std::unexpected(raw.error());
  const uint64_t size = raw->size();
  const uint64_t pages = size / kPage;
  row.guest_bytes = size;
  row.pages = pages;
  uint64_t zero_pages = 0;
  std::vector<uint64_t> data_pages;
  for (uint64_t p = 0; p < pages; ++p) {
    const uint8_t* b = raw->bytes() + p * kPage;
    if (b[0] == 0 && std::memcmp(b, b + 1, kPage - 1) == 0) {
      ++zero_pages;
    } else {
      data_pages.push_back(p);
    }
  }
  row.metrics.emplace_back("raw_bytes", static_cast<double>(size));
  row.metrics.emplace_back("zero_page_share", static_cast<double>(zero_pages) / static_cast<double>(pages));

  // zstd -3 of the whole file, one call, one thread: the reference.
  double zstd_s = 0;
  auto whole = zstd_size(raw->bytes(), size, &zstd_s);
  if (!whole) return std::unexpected(whole.error());
  row.metrics.emplace_back("zstd3_bytes", static_cast<double>(*whole));
  row.metrics.emplace_back("zstd3_mb_s", mb_per_s(size, zstd_s));

  // Two images created independently (two stores) from the same file, with
  // a thread per CPU into memory, interleaved with the same into a store on
  // the disk and on one thread into memory, so that the machine's noise falls
  // on all three alike.
  std::vector<std::unique_ptr<image::LocalStore>> stores;
  std::vector<double> create_s, create_disk_s, create_cpu_s, create_1t_s;
  image::CreateReport base;
  const int creates = std::max(2, ctx.sizes.reps);
  for (int i = 0; i < creates; ++i) {
    for (const char* kind : {"memory", "disk", "memory-1thread"}) {
      const std::string k = kind;
      if (k == "disk" && !in_memory) continue;
      auto store = image::LocalStore::open((k == "disk" ? work : mem_work) + "/store-" + k + "-" + std::to_string(i), true);
      if (!store) return std::unexpected(store.error());
      image::CreateOptions o;
      o.memory_path = path;
      o.name = "base";
      o.zstd_level = kLevel;
      o.threads = k == "memory-1thread" ? 1 : 0;
      const double cpu0 = cpu_seconds();
      const auto t0 = Clock::now();
      auto r = image::create_image(**store, o);
      const double wall = seconds_since(t0);
      if (!r) return fail("image create: " + r.error().describe(), r.error().code);
      if (k == "memory") {
        create_s.push_back(wall);
        create_cpu_s.push_back(cpu_seconds() - cpu0);
        base = *r;
        stores.push_back(std::move(*store));
      } else {
        (k == "disk" ? create_disk_s : create_1t_s).push_back(wall);
      }
    }
  }
  row.reps = creates;
  const double stored = static_cast<double>(base.stored_bytes + base.manifest_bytes);
  row.metrics.emplace_back("stored_bytes", static_cast<double>(base.stored_bytes));
  row.metrics.emplace_back("manifest_bytes", static_cast<double>(base.manifest_bytes));
  row.metrics.emplace_back("frames", static_cast<double>(base.frames));
  row.metrics.emplace_back("stored_over_zstd3", stored / static_cast<double>(*whole));
  row.metrics.emplace_back("create_mb_s", mb_per_s(size, median_of(create_s)));
  row.metrics.emplace_back("create_disk_mb_s", mb_per_s(size, median_of(create_disk_s)));
  row.metrics.emplace_back("stores_in_memory", in_memory ? 1 : 0);
  row.metrics.emplace_back("create_1thread_mb_s", mb_per_s(size, median_of(create_1t_s)));
  row.metrics.emplace_back("create_cpu_s", median_of(create_cpu_s));
  row.metrics.emplace_back("create_threads", static_cast<double>(std::max(1u, std::thread::hardware_concurrency())));
  {
    uint64_t ignored = 0;
    const auto a = blob_names(*stores[0], "base", &ignored);
    const auto b = blob_names(*stores[1], "base", &ignored);
    auto fa = image::ImageChain::open(*stores[1], "base");
    double shared = 0, total = 0;
    if (fa) {
      for (const auto& f : fa->layers()[0].manifest.frames) {
        total += static_cast<double>(f.compressed_bytes);
        if (a.contains(f.id.hex())) shared += static_cast<double>(f.compressed_bytes);
      }
    }
    row.metrics.emplace_back("two_images_shared_share", total > 0 ? shared / total : std::nan(""));
  }

  // flatten: back to a raw file, compared byte for byte.
  {
    const std::string out = mem_work + "/flat";
    const auto t0 = Clock::now();
    if (auto st = image::flatten_image(*stores[0], "base", out, {}); !st) return fail("flatten: " + st.error().describe());
    row.metrics.emplace_back("flatten_mb_s", mb_per_s(size, seconds_since(t0)));
    auto flat = Mapping::map_file(out);
    if (!flat) return std::unexpected(flat.error());
    if (flat->size() != size || std::memcmp(flat->bytes(), raw->bytes(), size) != 0) {
      ++ctx.results->data_mismatches;
      row.note = "error: the flattened image differs from the raw file";
    }
    std::filesystem::remove(out);
  }

  // A single-page fault: decompressing its frame (with and without the
  // SHA-256 check every served frame gets) against pread of one page; for
  // the default frames and for smaller ones (with their stored size).
  UniqueFd raw_fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<double> pread_us;
  {
    std::mt19937_64 rng(11);
    std::vector<uint8_t> page(kPage);
    for (int i = 0; i < 4096 && !data_pages.empty(); ++i) {
      const uint64_t p = data_pages[rng() % data_pages.size()];
      const auto t0 = Clock::now();
      const ssize_t n = ::pread(raw_fd.get(), page.data(), kPage, static_cast<off_t>(p * kPage));
      pread_us.push_back(seconds_since(t0) * 1e6);
      if (n != static_cast<ssize_t>(kPage)) return fail_errno("pread of " + path);
    }
  }
  const double copy = median_of(pread_us);
  row.metrics.emplace_back("pread_page_us", copy);
  measure_frame_memory(row);
  for (uint32_t frame_pages : {image::default_frame_pages(image::kSmallPage), 32u, 8u}) {
    image::LocalStore* store = stores[0].get();
    std::unique_ptr<image::LocalStore> small_store;
    const bool default_frames = frame_pages == image::default_frame_pages(image::kSmallPage);
    const std::string suffix = default_frames ? "" : "_" + std::to_string(frame_pages) + "p";
    if (!default_frames) {
      auto opened = image::LocalStore::open(mem_work + "/store-frames-" + std::to_string(frame_pages), true);
      if (!opened) return std::unexpected(opened.error());
      small_store = std::move(*opened);
      store = small_store.get();
      image::CreateOptions o;
      o.memory_path = path;
      o.name = "base";
      o.frame_pages = frame_pages;
      auto r = image::create_image(*store, o);
      if (!r) return fail("image create --frame-pages: " + r.error().describe(), r.error().code);
      row.metrics.emplace_back("stored_over_zstd3" + suffix,
                               static_cast<double>(r->stored_bytes + r->manifest_bytes) / static_cast<double>(*whole));
    }
    auto chain = image::ImageChain::open(*store, "base");
    if (!chain) return std::unexpected(chain.error());
    const auto& frames = chain->layers()[0].manifest.frames;
    std::vector<double> decode_us, decompress_us;
    const size_t samples = std::min<size_t>(64, frames.size());
    std::string scratch(frame_pages * kPage, '\0');
    for (size_t i = 0; i < samples; ++i) {
      const auto& f = frames[i * frames.size() / samples];
      if (f.pages != frame_pages) continue;  // the short last frame is not typical
      auto blob = store->get(f.id);
      if (!blob) return std::unexpected(blob.error());
      for (int k = 0; k < 3; ++k) {
        auto t0 = Clock::now();
        auto d = image::decode_frame(*blob, f.id, f.pages * kPage, "bench");
        decode_us.push_back(seconds_since(t0) * 1e6);
        if (!d) return std::unexpected(d.error());
        t0 = Clock::now();
        const size_t n = ZSTD_decompress(scratch.data(), scratch.size(), blob->data(), blob->size());
        decompress_us.push_back(seconds_since(t0) * 1e6);
        if (ZSTD_isError(n)) return fail("zstd decompress failed");
      }
    }
    const double decode = median_of(decode_us);
    row.metrics.emplace_back("frame_bytes" + suffix, static_cast<double>(frame_pages * kPage));
    row.metrics.emplace_back("decode_frame_us" + suffix, decode);
    row.metrics.emplace_back("decompress_frame_us" + suffix, median_of(decompress_us));
    row.metrics.emplace_back("decode_over_pread" + suffix, decode / copy);
  }

  // The working-set layout: frames a prefetch of the set reads, in guest
  // order and with `create --working-set`.
  if (!ws_path.empty()) {
    auto ws = read_working_set(ws_path, size);
    if (!ws) return std::unexpected(ws.error());
    auto frames_of_set = [&](image::Store& store, const std::string& name) -> double {
      auto chain = image::ImageChain::open(store, name);
      if (!chain) return std::nan("");
      std::set<uint64_t> frames;
      for (uint64_t off : ws->offsets) {
        const auto loc = chain->locate(off / kPage);
        if (!loc.zero) frames.insert(loc.frame);
      }
      return static_cast<double>(frames.size());
    };
    image::CreateOptions o;
    o.memory_path = path;
    o.name = "base-ws";
    o.working_set_path = ws_path;
    auto r = image::create_image(*stores[0], o);
    if (!r) return fail("image create --working-set: " + r.error().describe(), r.error().code);
    row.metrics.emplace_back("ws_pages", static_cast<double>(ws->offsets.size()));
    row.metrics.emplace_back("ws_frames_guest_order", frames_of_set(*stores[0], "base"));
    row.metrics.emplace_back("ws_frames_ws_layout", frames_of_set(*stores[0], "base-ws"));
    row.metrics.emplace_back("ws_layout_stored_bytes", static_cast<double>(r->stored_bytes));
  }

  // A chain of generations, each writing 5 % of the pages: every written
  // page gets another data page's bytes with 16 bytes changed at random, so
  // it is new but compresses like the file's own pages.
  {
    const std::string gen_path = mem_work + "/generation";
    std::filesystem::copy_file(path, gen_path);
    auto gen = Mapping::map_file(gen_path, Mapping::Access::kReadWrite);
    if (!gen) return std::unexpected(gen.error());
    auto store = image::LocalStore::open(mem_work + "/chain", true);
    if (!store) return std::unexpected(store.error());
    image::CreateOptions o;
    o.memory_path = gen_path;
    o.name = "gen-0";
    auto r0 = image::create_image(**store, o);
    if (!r0) return fail("chain base: " + r0.error().describe(), r0.error().code);
    double expected = static_cast<double>(r0->stored_bytes + r0->manifest_bytes);
    std::mt19937_64 rng(13);
    std::vector<uint64_t> all(pages);
    for (uint64_t p = 0; p < pages; ++p) all[p] = p;
    const uint64_t written = static_cast<uint64_t>(static_cast<double>(pages) * kWrittenShare);
    uint64_t changed_total = 0;
    double chain_create_s = 0;
    for (int g = 1; g <= kGenerations; ++g) {
      std::vector<uint64_t> chosen;
      std::sample(all.begin(), all.end(), std::back_inserter(chosen), written, rng);
      std::string changed;
      for (uint64_t p : chosen) {
        uint8_t* dst = gen->bytes() + p * kPage;
        const uint64_t src = data_pages.empty() ? p : data_pages[rng() % data_pages.size()];
        std::vector<uint8_t> before(dst, dst + kPage);
        std::memmove(dst, raw->bytes() + src * kPage, kPage);
        for (int k = 0; k < 16; ++k) dst[rng() % kPage] = static_cast<uint8_t>(rng());
        if (std::memcmp(before.data(), dst, kPage) == 0) dst[0] ^= 0xff;
        changed.append(reinterpret_cast<const char*>(dst), kPage);
      }
      changed_total += chosen.size();
      auto z = zstd_size(reinterpret_cast<const uint8_t*>(changed.data()), changed.size(), nullptr);
      if (!z) return std::unexpected(z.error());
      o.name = "gen-" + std::to_string(g);
      o.parent = "gen-" + std::to_string(g - 1);
      const auto t0 = Clock::now();
      auto r = image::create_image(**store, o);
      chain_create_s += seconds_since(t0);
      if (!r) return fail("chain generation " + std::to_string(g) + ": " + r.error().describe(), r.error().code);
      expected += static_cast<double>(*z + r->manifest_bytes);
    }
    auto info = image::inspect_image(**store, "gen-" + std::to_string(kGenerations));
    if (!info) return std::unexpected(info.error());
    double manifests = 0;
    for (const auto& l : info->layers) manifests += static_cast<double>(l.manifest_bytes);
    const double actual = static_cast<double>(info->unique_bytes) + manifests;
    row.metrics.emplace_back("chain_changed_pages", static_cast<double>(changed_total));
    row.metrics.emplace_back("chain_bytes", actual);
    row.metrics.emplace_back("chain_expected_bytes", expected);
    row.metrics.emplace_back("chain_over_expected", actual / expected);
    row.metrics.emplace_back("chain_diff_create_mb_s", mb_per_s(size * kGenerations, chain_create_s));
  }
  row.metrics.emplace_back("load1_after", load_average_1min());
  row.metrics.emplace_back("cores", static_cast<double>(core_count()));
  return {};
}

std::string mib(double b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", b / (1 << 20));
  return buf;
}

std::string fixed(double v, int precision) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

const Row* storage_row(const Results& r, const std::string& subject) {
  for (const Row& row : r.rows) {
    if (row.scenario == kStorageScenario && row.subject == subject && !row.not_applicable) return &row;
  }
  return nullptr;
}

}  // namespace

void run_storage_scenario(Context& ctx) {
  const uint64_t size = ctx.sizes.storage_bytes;
  struct Input {
    std::string subject, path, ws_path;
  };
  std::vector<Input> inputs;
  // The generated file of the other scenarios, at the corpus's size.
  {
    const std::string path = ctx.dir + "/storage-generated.mem";
    std::fprintf(stderr, "storage: writing a %llu MiB generated memory file...\n",
                 static_cast<unsigned long long>(size / kMiB));
    if (auto st = client::write_test_memory_file(path, size, kFileSeed, kZeroFraction); !st) {
      Row row;
      row.scenario = kStorageScenario;
      row.subject = "generated";
      row.not_applicable = true;
      row.note = "error: " + st.error().describe();
      ctx.results->rows.push_back(row);
    } else {
      inputs.push_back({"generated", path, ""});
    }
  }
  if (!ctx.corpus_path.empty()) {
    inputs.push_back({"realistic", ctx.corpus_path, ctx.corpus_path + ".flws"});
    // Built by main() for this run (its description is there), or given with --corpus.
    if (ctx.results->corpus_description.empty()) {
      ctx.results->corpus_description.push_back("realistic corpus: " + ctx.corpus_path + " (given with --corpus)");
    }
  } else {
    const std::string path = ctx.dir + "/storage-realistic.mem";
    std::fprintf(stderr, "storage: building a %llu MiB realistic corpus (g++ and python3, see docs/performance.md)...\n",
                 static_cast<unsigned long long>(size / kMiB));
    CorpusOptions co;
    co.size = size;
    co.work_dir = ctx.dir;
    co.source_dir = ctx.source_dir;
    auto corpus = build_realistic_corpus(co, path, path + ".flws");
    if (!corpus) {
      Row row;
      row.scenario = kStorageScenario;
      row.subject = "realistic";
      row.not_applicable = true;
      row.note = "error: cannot build the realistic corpus: " + corpus.error().describe();
      ctx.results->rows.push_back(row);
    } else {
      ctx.results->corpus_description = describe_corpus(*corpus);
      inputs.push_back({"realistic", path, path + ".flws"});
    }
  }
  for (const Input& in : inputs) {
    std::fprintf(stderr, "storage: measuring the %s file...\n", in.subject.c_str());
    Row row;
    row.scenario = kStorageScenario;
    row.subject = in.subject;
    row.backend = Backend::kFaultline;
    if (auto st = measure_file(ctx, in.path, in.ws_path, row); !st) {
      row.not_applicable = true;
      row.note = "error: " + st.error().describe();
    }
    ctx.results->rows.push_back(std::move(row));
    if (in.path.rfind(ctx.dir + "/", 0) == 0) {
      std::filesystem::remove(in.path);
      std::filesystem::remove(in.ws_path);
    }
  }
}

void print_storage_report(const Results& r) {
  bool any = false;
  for (const Row& row : r.rows) any = any || row.scenario == kStorageScenario;
  if (!any) return;
  std::printf("\nStorage: snapshot images (faultline image create/flatten, zstd level %d, default frames of 128 pages)\n", kLevel);
  std::printf("========================================================================================\n");
  for (const std::string& line : r.corpus_description) std::printf("%s\n", line.c_str());
  std::printf("MB = 10^6 bytes, MiB = 2^20. Throughput is raw file bytes / wall time, warm page cache; create includes "
              "the store's syncfs; flatten one run.\n");
  int runs = 0;
  for (const Row& row : r.rows) runs = row.scenario == kStorageScenario ? std::max(runs, row.reps) : runs;
  std::printf("create: median of %d runs each, interleaved: a thread per CPU into a store in memory (tmpfs), the same "
              "into a store on the disk\n(its syncfs also waits for every other writer of that file system), one "
              "thread into memory; CPU s: CPU time of one create\nwith a thread per CPU; flatten: into tmpfs; zstd "
              "MB/s: zstd -3 of the whole file, one thread\n",
              runs);
  std::printf("%-10s %8s %6s %9s %10s %8s %8s %11s %8s %8s %6s %12s %9s\n", "file", "raw MiB", "zero%", "image MiB",
              "zstd-3 MiB", "img/zstd", "shared%", "create MB/s", "disk", "1 thread", "CPU s", "flatten MB/s", "zstd MB/s");
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario) continue;
    if (row.not_applicable) {
      std::printf("%-10s %s\n", row.subject.c_str(), row.note.c_str());
      continue;
    }
    std::printf("%-10s %8s %6s %9s %10s %8s %8s %11s %8s %8s %6s %12s %9s  %s\n", row.subject.c_str(),
                mib(row.metric("raw_bytes")).c_str(), fixed(100 * row.metric("zero_page_share"), 1).c_str(),
                mib(row.metric("stored_bytes") + row.metric("manifest_bytes")).c_str(),
                mib(row.metric("zstd3_bytes")).c_str(), fixed(row.metric("stored_over_zstd3"), 3).c_str(),
                fixed(100 * row.metric("two_images_shared_share"), 1).c_str(), fixed(row.metric("create_mb_s"), 0).c_str(),
                fixed(row.metric("create_disk_mb_s"), 0).c_str(), fixed(row.metric("create_1thread_mb_s"), 0).c_str(), fixed(row.metric("create_cpu_s"), 2).c_str(),
                fixed(row.metric("flatten_mb_s"), 0).c_str(), fixed(row.metric("zstd3_mb_s"), 0).c_str(),
                row.note.c_str());
  }
  std::printf("\nChain of %d generations, each writing %.0f %% of the pages (new bytes: another data page with 16 bytes "
              "changed)\nexpected = base image + zstd -3 of each generation's written pages + every manifest\n",
              kGenerations, 100 * kWrittenShare);
  std::printf("%-10s %14s %12s %12s %10s %16s\n", "file", "pages written", "chain MiB", "expected MiB", "chain/exp",
              "diff create MB/s");
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario || row.not_applicable) continue;
    std::printf("%-10s %14s %12s %12s %10s %16s\n", row.subject.c_str(), fixed(row.metric("chain_changed_pages"), 0).c_str(),
                mib(row.metric("chain_bytes")).c_str(), mib(row.metric("chain_expected_bytes")).c_str(),
                fixed(row.metric("chain_over_expected"), 3).c_str(), fixed(row.metric("chain_diff_create_mb_s"), 0).c_str());
  }
  std::printf("\nA single-page fault: verify (SHA-256) + decompress its frame, or decompress alone, against pread of one "
              "4 KiB page of the raw file\n(medians; img/zstd: the image made with frames of that size)\n");
  std::printf("%-10s %10s %13s %14s %10s %12s %9s\n", "file", "frame KiB", "verify+dec us", "decompress us", "pread us",
              "(v+d)/pread", "img/zstd");
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario || row.not_applicable) continue;
    for (const std::string suffix : {"", "_32p", "_8p"}) {
      if (std::isnan(row.metric("frame_bytes" + suffix))) continue;
      std::printf("%-10s %10s %13s %14s %10s %12s %9s\n", row.subject.c_str(),
                  fixed(row.metric("frame_bytes" + suffix) / 1024, 0).c_str(),
                  fixed(row.metric("decode_frame_us" + suffix), 1).c_str(),
                  fixed(row.metric("decompress_frame_us" + suffix), 1).c_str(), fixed(row.metric("pread_page_us"), 2).c_str(),
                  fixed(row.metric("decode_over_pread" + suffix), 1).c_str(),
                  fixed(row.metric("stored_over_zstd3" + suffix), 3).c_str());
    }
  }
  std::printf("\nFrame memory: writing a whole decompressed frame into memory once, 64 MiB of frames held (medians, us "
              "per frame; measured beside each file)\nheap: std::string (malloc, 4 KiB pages, how frames were held "
              "before FrameBuffer); fresh chunk: FrameBuffer, no memory kept (huge pages\nwhere the kernel has them); "
              "reused slot: FrameBuffer, into the slot an evicted frame freed (a full frame cache)\n");
  std::printf("%-10s %10s %10s %12s %12s %13s\n", "file", "frame KiB", "heap us", "fresh chunk", "reused slot",
              "heap/fresh");
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario || row.not_applicable) continue;
    for (const std::string suffix : {"_512k", "_2m"}) {
      if (std::isnan(row.metric("mem_heap_us" + suffix))) continue;
      std::printf("%-10s %10s %10s %12s %12s %13s\n", row.subject.c_str(), suffix == "_2m" ? "2048" : "512",
                  fixed(row.metric("mem_heap_us" + suffix), 1).c_str(),
                  fixed(row.metric("mem_fresh_chunk_us" + suffix), 1).c_str(),
                  fixed(row.metric("mem_reused_slot_us" + suffix), 1).c_str(),
                  fixed(row.metric("mem_heap_us" + suffix) / row.metric("mem_fresh_chunk_us" + suffix), 1).c_str());
    }
  }
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario || row.not_applicable || std::isnan(row.metric("ws_pages"))) continue;
    std::printf("\nworking set of the %s file: %s pages; frames a prefetch reads: %s in guest order, %s with create "
                "--working-set (image %s MiB)\n",
                row.subject.c_str(), fixed(row.metric("ws_pages"), 0).c_str(),
                fixed(row.metric("ws_frames_guest_order"), 0).c_str(), fixed(row.metric("ws_frames_ws_layout"), 0).c_str(),
                mib(row.metric("ws_layout_stored_bytes")).c_str());
  }
  for (const Row& row : r.rows) {
    if (row.scenario != kStorageScenario || row.not_applicable) continue;
    std::printf("load average (1 min) %s before / %s after the %s file, %s cores\n",
                fixed(row.metric("load1_before"), 2).c_str(), fixed(row.metric("load1_after"), 2).c_str(),
                row.subject.c_str(), fixed(row.metric("cores"), 0).c_str());
  }
}

void add_storage_targets(const Results& r, std::vector<Target>& out) {
  const Row* real = storage_row(r, "realistic");
  {
    Target t;
    t.name = "storage: stored bytes of the realistic corpus <= 1.15x zstd -3 of the whole file";
    t.ratio = real ? real->metric("stored_over_zstd3") : std::nan("");
    if (std::isnan(t.ratio)) {
      t.measured = "storage scenario not run on the realistic corpus";
    } else {
      t.measured = "image " + mib(real->metric("stored_bytes") + real->metric("manifest_bytes")) + " MiB / zstd -3 " +
                   mib(real->metric("zstd3_bytes")) + " MiB = " + fixed(t.ratio, 3) + "x";
      t.met = t.ratio <= 1.15;
    }
    out.push_back(std::move(t));
  }
  {
    Target t;
    t.name = "storage: image create of the realistic corpus >= 500 MB/s";
    const double v = real ? real->metric("create_mb_s") : std::nan("");
    t.ratio = v / 500.0;
    if (std::isnan(v)) {
      t.measured = "storage scenario not run on the realistic corpus";
    } else {
      t.measured = "create " + fixed(v, 0) + " MB/s / 500 MB/s = " + fixed(t.ratio, 2) + "x (load average " +
                   fixed(real->metric("load1_before"), 2) + ", " + fixed(real->metric("cores"), 0) + " cores)";
      t.met = v >= 500.0;
    }
    out.push_back(std::move(t));
  }
}

}  // namespace faultline::bench
