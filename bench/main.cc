// faultline-bench: runs the scenarios of issue 4 with faultline and with the
// baselines in one invocation and prints a table, a JSON file and a chart.
// A program that prints figures, not a test: nothing here asserts a timing.
//
//   faultline-bench [--quick] [--scenario N|storage|image|trace|store]... [--trace FILE]... [--json FILE] [--chart FILE.png]
//   faultline-bench --make-corpus FILE [--quick]   (the realistic corpus and FILE.flws, then exit)
//
// Needs root (userfaultfd of KVM faults, /proc/sys/vm/nr_hugepages). Memory
// files go to a temporary directory under /tmp, removed at exit; 2 MiB huge
// pages are reserved for the run and the old vm.nr_hugepages is restored at
// exit, also on error or SIGINT/SIGTERM/SIGHUP/SIGPIPE.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>

#include <CLI/CLI.hpp>

#include "bench/corpus.h"
#include "bench/guests.h"
#include "bench/load.h"
#include "bench/report.h"
#include "bench/scenarios.h"
#include "bench/storage.h"
#include "bench/trace_replay.h"
#include "client/firecracker_client.h"
#include "client/test_memory_file.h"
#include "common/log.h"
#if FAULTLINE_BENCH_HAVE_KVM
#include "client/kvm/kvm_guest.h"
#endif

namespace fb = faultline::bench;

namespace {

// --- cleanup that also runs from a signal handler ---------------------------
// Fixed buffers written before the handler is installed; the handler only uses
// async-signal-safe calls (open, write, close, unlink, rmdir, _exit).
char g_hugepages_old[32];  // "" when nothing to restore
char g_dir[128];
constexpr int kMaxFiles = 64;
char g_files[kMaxFiles][192];
int g_file_count = 0;

void restore_hugepages() {
  if (g_hugepages_old[0] == '\0') return;
  int fd = ::open("/proc/sys/vm/nr_hugepages", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    (void)!::write(fd, g_hugepages_old, std::strlen(g_hugepages_old));
    ::close(fd);
  }
  g_hugepages_old[0] = '\0';
}

void on_signal(int sig) {
  restore_hugepages();
  for (int i = 0; i < g_file_count; ++i) ::unlink(g_files[i]);
  if (g_dir[0] != '\0') ::rmdir(g_dir);
  ::_exit(128 + sig);
}

void track_file(const std::string& path) {
  if (g_file_count < kMaxFiles && path.size() < sizeof g_files[0]) {
    std::memcpy(g_files[g_file_count], path.c_str(), path.size() + 1);
    ++g_file_count;
  }
}

long read_nr_hugepages() {
  FILE* f = std::fopen("/proc/sys/vm/nr_hugepages", "r");
  if (!f) return -1;
  long v = -1;
  if (std::fscanf(f, "%ld", &v) != 1) v = -1;
  std::fclose(f);
  return v;
}

bool write_nr_hugepages(long v) {
  FILE* f = std::fopen("/proc/sys/vm/nr_hugepages", "w");
  if (!f) return false;
  const bool ok = std::fprintf(f, "%ld", v) > 0;
  return std::fclose(f) == 0 && ok;
}

// Writes every free 2 MiB page of the pool once. On this machine (a nested
// VM) the first write to a freshly reserved huge page costs 3-9 ms, paid to
// the outer hypervisor that backs it, against ~0.2 ms for later ones: left
// alone, whichever backend first touches a page pays it (the kernel
// baseline's first 2 MiB faults took 3 ms each, and an install that holds
// the uffd's REMOVE lock that long shows up as a madvise tail). The page
// cache of the memory files is warmed for the same reason.
void warm_huge_page_pool(long pages) {
  const size_t bytes = static_cast<size_t>(pages) * faultline::kPageSize2M;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "could not map the huge page pool to warm it: %s\n", std::strerror(errno));
    return;
  }
  for (size_t off = 0; off < bytes; off += faultline::kPageSize2M) std::memset(static_cast<char*>(p) + off, 1, faultline::kPageSize2M);
  ::munmap(p, bytes);
}

// Restores vm.nr_hugepages and removes the temp dir on every normal exit path.
struct Cleanup {
  ~Cleanup() {
    restore_hugepages();
    if (g_dir[0] != '\0') {
      std::error_code ec;
      std::filesystem::remove_all(g_dir, ec);
      g_dir[0] = '\0';
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faultline-bench: faultline against the kernel, a file mapping and naive and busy-polling uffd servers"};
  bool quick = false;
  std::vector<int> scenarios;
  std::string json_path, chart_path;
  int reps = 0;
  bool no_vcpu = false, no_huge = false;
  int workers = 2;
  app.add_flag("--quick", quick, "small sizes, one repetition (CI smoke)");
  app.add_option("--scenario", scenarios, "run only this scenario (1-4, 5 = storage, 6 = image, 7 = trace, 8 = store: images "
                 "in a local Ceph RADOS Gateway); repeatable")
      ->transform(CLI::Transformer(
          std::map<std::string, std::string>{{"storage", "5"}, {"image", "6"}, {"trace", "7"}, {"store", "8"}}))
      ->check(CLI::Range(1, 8));
  fb::TraceScenarioOptions trace_options;
  app.add_option("--trace", trace_options.trace_paths,
                 "trace scenario: also replay this first-touch record (a working-set file, e.g. serve --record of a "
                 "real guest) over a generated memory file of its size; repeatable")
      ->check(CLI::ExistingFile);
  app.add_option("--trace-streams", trace_options.trace_streams,
                 "trace scenario: split each --trace FILE into this many streams (vCPUs), contiguous slices of the "
                 "record (default 1)")
      ->check(CLI::Range(1, 64));
  std::string corpus_path, make_corpus_path;
  app.add_option("--corpus", corpus_path,
                 "storage: use this realistic corpus (and its working set FILE.flws) instead of building one");
  app.add_option("--make-corpus", make_corpus_path,
                 "build the realistic corpus (256 MiB, 32 MiB with --quick) into FILE and its working set into "
                 "FILE.flws, print what is in it, and exit");
  app.add_option("--json", json_path, "write the results as JSON to FILE");
  app.add_option("--chart", chart_path, "draw a PNG chart with gnuplot to FILE.png");
  app.add_option("--reps", reps, "repetitions per configuration (default 2, quick 1)")->check(CLI::Range(1, 50));
  app.add_flag("--no-vcpu", no_vcpu, "skip the KVM vCPU configurations");
  app.add_flag("--no-huge", no_huge, "skip the 2 MiB page configurations");
  app.add_option("--workers", workers, "faultline install workers per session (ServerConfig default 2)")
      ->check(CLI::Range(1, 64));
  bool reader_serves_cached = true;
  int prefetch_threads = 2;
  app.add_option("--prefetch-threads", prefetch_threads, "ServerConfig::prefetch_threads (default 2)")->check(CLI::Range(1, 64));
  int prefetch_fetches = 12;
  app.add_option("--prefetch-fetches", prefetch_fetches,
                 "ServerConfig::prefetch_fetches: frame loads in flight ahead of a prefetch from an image (default 12, "
                 "as serve; 0: none, the installing threads load)")
      ->check(CLI::Range(0, 256));
  uint32_t fault_around_pages = 64;
  app.add_option("--fault-around-pages", fault_around_pages,
                 "ServerConfig::fault_around_pages of the faultline rows (default 64, as serve; 1: off)")
      ->check(CLI::Range(1, 4096));
  std::string fault_around_readahead = "off";
  app.add_option("--fault-around-readahead", fault_around_readahead,
                 "ServerConfig::fault_around_readahead of the faultline rows (default off, as serve)")
      ->check(CLI::IsMember({"on", "off"}));
  int64_t busy_poll_us = 100;
  app.add_option("--busy-poll-us", busy_poll_us, "ServerConfig::busy_poll in microseconds (default 100; 0: the reader always sleeps)")
      ->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  app.add_option("--reader-serves-cached", reader_serves_cached,
                 "ServerConfig::reader_serves_cached: the event reader serves 4 KiB faults needing no I/O (default true)");
  uint32_t image_frame_pages = 0;
  std::string image_rows;
  app.add_option("--image-rows", image_rows,
                 "image scenario: run only the rows whose subject contains TEXT (e.g. \"working-set restore\", "
                 "\"realistic\"), to profile one of them");
  app.add_option("--image-frame-pages", image_frame_pages,
                 "image scenario: create its 4 KiB images with frames of this many pages (default: image create's "
                 "default)")
      ->check(CLI::Range(1, 4096));
  bool metrics_cost = false;
  app.add_flag("--metrics-cost", metrics_cost,
               "scenarios 1 and 3 also run faultline timing every fault for the latency histograms (serve "
               "--metrics), interleaved with it off, and print the on/off ratios");
  CLI11_PARSE(app, argc, argv);
  const std::set<int> want = scenarios.empty() ? std::set<int>{1, 2, 3, 4, fb::kStorageScenario, fb::kImageScenario,
                                                               fb::kTraceScenario, fb::kStoreScenario}
                                               : std::set<int>(scenarios.begin(), scenarios.end());

  fb::Sizes sizes = quick ? fb::Sizes::quick() : fb::Sizes{};
  if (reps > 0) sizes.reps = reps;
  trace_options.guest_bytes = quick ? 32 * fb::kMiB : 256 * fb::kMiB;
  for (std::string& p : trace_options.trace_paths) p = std::filesystem::absolute(p).string();
  if (!corpus_path.empty()) corpus_path = std::filesystem::absolute(corpus_path).string();
  if (!make_corpus_path.empty()) {
    fb::CorpusOptions co;
    co.size = sizes.storage_bytes;
    co.work_dir = std::filesystem::absolute(make_corpus_path).parent_path().string();
    co.source_dir = FAULTLINE_SOURCE_DIR;
    auto report = fb::build_realistic_corpus(co, make_corpus_path, make_corpus_path + ".flws");
    if (!report) {
      std::fprintf(stderr, "cannot build the corpus: %s\n", report.error().describe().c_str());
      return 2;
    }
    for (const std::string& line : fb::describe_corpus(*report)) std::printf("%s\n", line.c_str());
    std::printf("written to %s and %s.flws\n", make_corpus_path.c_str(), make_corpus_path.c_str());
    return 0;
  }
  if (!json_path.empty()) json_path = std::filesystem::absolute(json_path).string();
  if (!chart_path.empty()) chart_path = std::filesystem::absolute(chart_path).string();

  Cleanup cleanup;
  char tmpl[] = "/tmp/faultline-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) {
    std::perror("mkdtemp");
    return 2;
  }
  std::snprintf(g_dir, sizeof g_dir, "%s", tmpl);
  const std::string dir = g_dir;
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
  sigaction(SIGPIPE, &sa, nullptr);  // e.g. `faultline-bench | head`

  // 2 MiB pages: enough for the largest guest fully touched (scenario 1's
  // kernel baseline, scenario 2's eager fill), one guest at a time.
  bool huge = false;
  uint64_t need_bytes = 0;  // 0: no chosen scenario has 2 MiB configurations (storage)
  if (!no_huge) {
    if (want.count(1)) need_bytes = std::max(need_bytes, sizes.s1_guest);
    if (want.count(2)) need_bytes = std::max(need_bytes, sizes.s2_guest);
    if (want.count(3)) need_bytes = std::max(need_bytes, sizes.s3_guest);
    // The image scenario's 2 MiB on-demand rows touch the whole file once.
    if (want.count(fb::kImageScenario)) need_bytes = std::max(need_bytes, sizes.storage_bytes);
    const long need = static_cast<long>(need_bytes / faultline::kPageSize2M) + 8;
    const long old = read_nr_hugepages();
    if (need_bytes > 0 && old >= 0) {
      std::snprintf(g_hugepages_old, sizeof g_hugepages_old, "%ld", old);
      if (write_nr_hugepages(old + need) &&
          faultline::client::free_huge_pages_2m() >= static_cast<uint64_t>(need)) {
        huge = true;
        std::fprintf(stderr, "reserved %ld huge pages (vm.nr_hugepages %ld -> %ld; restored at exit)\n", need, old,
                     old + need);
        warm_huge_page_pool(need);
      } else {
        std::fprintf(stderr, "could not reserve %ld 2 MiB huge pages: 2 MiB configurations skipped\n", need);
        restore_hugepages();
      }
    }
  }

  bool kvm = false;
#if FAULTLINE_BENCH_HAVE_KVM
  kvm = !no_vcpu && faultline::client::KvmGuest::available();
#endif

  const std::string log_path = dir + "/server.log";
  track_file(log_path);
  const int log_fd = ::open(log_path.c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
  faultline::Logger logger(faultline::LogFormat::kText, faultline::LogLevel::kWarn, log_fd >= 0 ? log_fd : 2);

  fb::Results results;
  fb::Context ctx;
  ctx.sizes = sizes;
  ctx.dir = dir;
  ctx.file_small = dir + "/mem-small";
  ctx.file_large = dir + "/mem-large";
  ctx.file_sparse = dir + "/mem-sparse";
  ctx.logger = &logger;
  ctx.huge_pages = huge;
  ctx.kvm = kvm;
  ctx.faultline_workers = workers;
  ctx.faultline_reader_serves_cached = reader_serves_cached;
  ctx.faultline_busy_poll_us = busy_poll_us;
  ctx.faultline_prefetch_threads = prefetch_threads;
  ctx.faultline_prefetch_fetches = prefetch_fetches;
  ctx.faultline_fault_around_pages = fault_around_pages;
  ctx.faultline_fault_around_readahead = fault_around_readahead == "on";
  ctx.metrics_cost = metrics_cost;
  ctx.source_dir = FAULTLINE_SOURCE_DIR;
  ctx.corpus_path = corpus_path;
  ctx.image_frame_pages = image_frame_pages;
  ctx.image_rows = image_rows;
  ctx.results = &results;
  for (const char* n : {"mem-small", "mem-large", "mem-sparse", "mem-small.zeroidx", "mem-large.zeroidx",
                        "mem-sparse.zeroidx", "s1.sock", "s2.sock", "s2-eager.sock", "s2-record.sock",
                        "s2-prefetch.sock", "s3.sock", "s4.sock", "s1-metrics.sock", "s3-metrics.sock", "image-generated.mem",
                        "image-generated.flrec", "image-realistic.flrec", "img-0.sock", "img-1.sock", "img-2.sock",
                        "img-3.sock", "img-record.sock", "baseline.sock"}) {
    track_file(dir + "/" + n);
  }
  // The trace scenario: the generated traces, their memory file and servers.
  for (const std::string& n : {std::string("trace-0.flws"), std::string("trace-1.flws"), std::string("trace-2.flws"),
                               "trace-" + std::to_string(trace_options.guest_bytes) + ".mem",
                               "trace-" + std::to_string(trace_options.guest_bytes) + ".mem.zeroidx",
                               std::string("trace-fl-no-fa.sock"), std::string("trace-faultline.sock"),
                               std::string("trace-fl-prefetch.sock")}) {
    track_file(dir + "/" + n);
  }
  // Scenario 2's recorded working sets (record-PAGESIZE-TOUCHER-THREADS.flrec).
  for (const char* ps : {"4096", "2097152"}) {
    for (const char* who : {"host", "vcpu"}) {
      for (const char* t : {"1", "2"}) track_file(dir + "/record-" + ps + "-" + who + "-" + t + ".flrec");
    }
  }

  auto make_file = [&](const std::string& path, uint64_t size) -> bool {
    std::fprintf(stderr, "writing a %llu MiB memory file...\n", static_cast<unsigned long long>(size / fb::kMiB));
    auto st = faultline::client::write_test_memory_file(path, size, fb::kFileSeed, fb::kZeroFraction);
    if (!st) {
      std::fprintf(stderr, "cannot write the memory file %s: %s\n", path.c_str(), st.error().describe().c_str());
      return false;
    }
    fb::warm_page_cache(path);
    return true;
  };
  if ((want.count(1) || want.count(3)) && !make_file(ctx.file_small, std::max(sizes.s1_guest, sizes.s3_guest))) return 2;
  if (want.count(2) && !make_file(ctx.file_large, sizes.s2_guest)) return 2;
  if (want.count(4)) {
    // Scenario 4 never reads the file: a sparse one of the largest guest size.
    const int fd = ::open(ctx.file_sparse.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
    const uint64_t size = *std::max_element(sizes.s4_guests.begin(), sizes.s4_guests.end());
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
      std::perror("sparse memory file");
      return 2;
    }
    ::close(fd);
  }

  if (!huge && !no_huge && need_bytes > 0) {
    results.notes.push_back("2 MiB page configurations skipped: no huge pages could be reserved");
  }
  if (!kvm && !no_vcpu) results.notes.push_back("vCPU configurations skipped: /dev/kvm unusable or built without client/kvm");

  // The realistic corpus, built once for the image and storage scenarios
  // (the image scenario runs first: the storage scenario removes it).
  if ((want.count(fb::kImageScenario) || want.count(fb::kStorageScenario) || want.count(fb::kStoreScenario)) &&
      ctx.corpus_path.empty()) {
    const std::string path = dir + "/realistic.mem";
    track_file(path);
    track_file(path + ".flws");
    std::fprintf(stderr, "building a %llu MiB realistic corpus (g++ and python3, see docs/performance.md)...\n",
                 static_cast<unsigned long long>(sizes.storage_bytes / fb::kMiB));
    fb::CorpusOptions co;
    co.size = sizes.storage_bytes;
    co.work_dir = dir;
    co.source_dir = FAULTLINE_SOURCE_DIR;
    auto corpus = fb::build_realistic_corpus(co, path, path + ".flws");
    if (corpus) {
      ctx.corpus_path = path;
      results.corpus_description = fb::describe_corpus(*corpus);
    } else {
      ctx.corpus_error = corpus.error().describe();
    }
  }

  results.cores = fb::core_count();
  results.load1_start = fb::load_average_1min();
  const auto t0 = std::chrono::steady_clock::now();
  if (want.count(1)) fb::run_scenario1(ctx);
  if (want.count(2)) fb::run_scenario2(ctx);
  if (want.count(3)) fb::run_scenario3(ctx);
  if (want.count(4)) fb::run_scenario4(ctx);
  if (metrics_cost) fb::measure_metrics_recording(ctx);
  if (want.count(fb::kImageScenario)) fb::run_image_scenario(ctx);
  if (want.count(fb::kStoreScenario)) fb::run_store_scenario(ctx);
  if (want.count(fb::kStorageScenario)) fb::run_storage_scenario(ctx);
  if (want.count(fb::kTraceScenario)) fb::run_trace_scenario(ctx, trace_options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  results.load1_end = fb::load_average_1min();

  const auto targets = fb::evaluate_targets(results);
  fb::print_report(results, targets, sizes, quick);
  std::printf("\nscenarios ran in %.1f s\n", seconds);

  int rc = 0;
  if (!json_path.empty()) {
    if (auto e = fb::write_json(json_path, results, targets, sizes, quick)) {
      std::fprintf(stderr, "%s\n", e->c_str());
      rc = 2;
    } else {
      std::printf("JSON written to %s\n", json_path.c_str());
    }
  }
  if (!chart_path.empty()) std::printf("%s\n", fb::write_chart(chart_path, dir, results).c_str());

  bool row_errors = false;
  for (const fb::Row& row : results.rows) row_errors = row_errors || row.note.rfind("error:", 0) == 0;
  if (results.data_mismatches > 0) {
    std::printf("FAILED: %llu pages were served with wrong content\n",
                static_cast<unsigned long long>(results.data_mismatches));
    rc = 1;
  } else if (row_errors) {
    std::printf("FAILED: some configurations ended in an error (see the notes in the tables)\n");
    rc = 1;
  }
  if (log_fd >= 0) ::close(log_fd);
  return rc;
}
