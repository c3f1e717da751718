// The four scenarios of faultline-bench (issue 4, "Benchmark"), each run with
// faultline and the baselines side by side, repetitions interleaved so that
// the machine's noise hits every backend alike. Every scenario appends Rows
// (medians over repetitions) to a Results.
//
// Thread-safety: one controlling thread; the scenarios start and join their
// own touching threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bench/guests.h"
#include "common/log.h"
#include "common/mapping.h"

namespace faultline::bench {

inline constexpr uint64_t kMiB = 1024 * 1024;
inline constexpr uint64_t kGiB = 1024 * kMiB;
// Memory files are client::write_test_memory_file(seed, zero fraction).
inline constexpr uint64_t kFileSeed = 7;
inline constexpr double kZeroFraction = 0.1;

struct Sizes {
  int reps = 2;  // full mode; 3 took over 12 minutes on the shared 2-core machine
  uint64_t s1_guest = 1 * kGiB;          // host threads
  uint64_t s1_vcpu_guest_4k = 32 * kMiB;  // vCPUs: kvm_pvm emulates the guest, ~200 µs per uffd fault
  uint64_t s1_vcpu_guest_2m = 256 * kMiB;
  uint64_t s2_guest = 2 * kGiB;
  uint64_t s2_set = 256 * kMiB;
  uint64_t s2_vcpu_guest = 256 * kMiB;
  uint64_t s2_vcpu_set = 32 * kMiB;
  uint64_t s3_guest = 512 * kMiB;
  uint64_t s3_min_removes = 1000;
  std::vector<uint64_t> s4_guests = {1 * kGiB, 4 * kGiB};
  uint64_t storage_bytes = 256 * kMiB;  // the storage and image scenarios' files (bench/storage.h)
  uint64_t store_generated_bytes = 2 * kGiB;  // the store scenario's generated guest (issue 11)
  // Scenario 1: how long to wait before a quiet repetition for the machine
  // to quieten down (bench/load.h); it runs anyway after that, marked NOT quiet.
  int quiet_wait_s = 60;
  static Sizes quick();
};

struct Row {
  int scenario = 0;
  uint64_t page_size = 4096;
  std::string toucher = "host";  // "host" or "vcpu"
  int threads = 1;
  std::string order = "-";       // "seq", "random" or "-"
  Backend backend = Backend::kKernel;
  uint64_t guest_bytes = 0;
  uint64_t pages = 0;             // pages touched per repetition (or removes)
  int reps = 0;
  bool not_applicable = false;
  std::string note;               // why n/a, or an error
  std::string subject;            // storage scenario: the memory file ("generated", "realistic")
  std::string load;               // scenario 1: "quiet" or "loaded" (bench/load.h); empty elsewhere
  std::vector<std::pair<std::string, double>> metrics;  // medians over reps

  double metric(const std::string& key) const;  // NaN when absent
  std::string config() const;                   // "4K host 1T random quiet" (the subject, when set)
};

struct Results {
  std::vector<Row> rows;
  uint64_t data_mismatches = 0;  // pages whose content was wrong (a server bug)
  std::vector<std::string> notes;
  // --metrics-cost: what recording one fault costs the serving thread, alone
  // (two clock reads, the bucket lookup, the stores), in ns; NaN if not run.
  double metrics_record_ns = std::nan("");
  // The storage scenario: how the realistic corpus was made (bench/corpus.h).
  std::vector<std::string> corpus_description;
  // The machine the run was made on: cores, and the 1-minute load average
  // at the start and the end of the scenarios.
  int cores = 0;
  double load1_start = std::nan("");
  double load1_end = std::nan("");
};

struct Context {
  Sizes sizes;
  std::string dir;           // temp dir for sockets, logs, records
  std::string file_small;    // scenarios 1 and 3
  std::string file_large;    // scenario 2
  std::string file_sparse;   // scenario 4 (never read)
  const Logger* logger = nullptr;
  bool huge_pages = false;   // 2 MiB pages reserved
  bool kvm = false;          // /dev/kvm usable and built with client/kvm
  int faultline_workers = 2; // ServerConfig::workers_per_session
  bool faultline_reader_serves_cached = true;  // ServerConfig::reader_serves_cached
  int64_t faultline_busy_poll_us = 100;        // ServerConfig::busy_poll
  int faultline_prefetch_threads = 2;          // ServerConfig::prefetch_threads
  int faultline_prefetch_fetches = 12;         // ServerConfig::prefetch_fetches
  // ServerConfig::fault_around_pages of the faultline rows (serve's default;
  // 1: off). The trace scenario's fl-no-fa row is always 1.
  uint32_t faultline_fault_around_pages = 64;
  bool faultline_fault_around_readahead = false;  // ServerConfig::fault_around_readahead of the faultline rows
  // Scenarios 1 and 3 also run faultline with fault-latency recording on
  // (Backend::kFaultlineMetrics), interleaved with it off: the cost of --metrics.
  bool metrics_cost = false;
  // The storage scenario: this repository (the corpus compiler's input), and
  // a corpus made before (--corpus FILE, its working set FILE.flws) or empty.
  std::string source_dir;
  std::string corpus_path;
  std::string corpus_error;  // why there is no corpus_path, when there is none
  // The image scenario: pages per frame of its 4 KiB images (0: the default,
  // image::default_frame_pages), to compare frame sizes run against run.
  uint32_t image_frame_pages = 0;
  // The image scenario: run only the blocks of rows whose subject contains
  // this text (empty: all), to profile one of them.
  std::string image_rows;
  Results* results = nullptr;
};

// A faultline server on its own thread with the context's settings, its
// socket ctx.dir/NAME.sock; fault_around false serves with fault-around off.
Result<std::unique_ptr<FaultlineHost>> start_host(Context& ctx, const std::string& memory_path,
                                                  const std::string& name, FaultlineHost::Options o = {},
                                                  bool fault_around = true);

void run_scenario1(Context& ctx);
void run_scenario2(Context& ctx);
void run_scenario3(Context& ctx);
void run_scenario4(Context& ctx);
// Image-backed serving next to raw-file serving (issue 9), on a generated
// file and the realistic corpus (ctx.corpus_path): on-demand fault latency,
// working-set restore on demand / with --prefetch RECORD / with --prefetch
// all, and the eager fill of the whole guest, each from the raw file and from
// an image of it. Every server is fresh (an empty frame cache).
inline constexpr int kImageScenario = 6;
void run_image_scenario(Context& ctx);
// The store scenario (issue 11): the working-set restore of the generated
// file and of the realistic corpus from an image in a local Ceph RADOS
// Gateway (scripts/rgw.sh), with a cold and a warm disk cache, next to the
// same image on local disk and the raw file, interleaved; GETs, bytes
// fetched and read amplification per restore. Rows of scenario
// kStoreScenario; not applicable (with the reason) without Ceph.
inline constexpr int kStoreScenario = 8;
void run_store_scenario(Context& ctx);
// Times FaultLatencyShard::record() with its clock reads in a loop on one
// thread: the CPU cost --metrics adds to each fault, without the noise of a
// whole fault's service. Sets results->metrics_record_ns.
void measure_metrics_recording(Context& ctx);

// Reads a file once so that every backend starts from a warm page cache.
void warm_page_cache(const std::string& path);

}  // namespace faultline::bench
