// The guest memories faultline-bench compares: one fresh guest per
// repetition, backed by the kernel alone, by a file mapping, by a baseline
// uffd server (a separate process, bench/baseline_process.h) or by faultline
// (in-process); both uffd kinds over the real handshake.
//
// Thread-safety: a FaultlineHost and the guests made from it are driven by
// one controlling thread; guest memory may be touched from any thread while
// its BenchGuest lives.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "bench/baseline_process.h"
#include "client/firecracker_client.h"
#include "common/error.h"
#include "common/log.h"
#include "common/mapping.h"
#include "server/server.h"

namespace faultline::bench {

enum class Backend {
  kKernel,             // (a) MAP_PRIVATE|MAP_ANONYMOUS, no uffd
  kFileMmap,           // (b) the memory file mmap'ed MAP_PRIVATE, page cache warm
  kNaive,              // (c) faultline-baseline-server --mode naive: one thread, poll, one UFFDIO_COPY per fault
  kBusyPoll,           // faultline-baseline-server --mode busy-poll: the same thread spinning on a non-blocking read
  kFaultline,          // faultline on demand
  kFaultlineNoFaultAround,  // faultline on demand, fault-around off (fault_around_pages 1): the faulting page only
  kFaultlineReadahead,      // faultline on demand, fault-around with readahead (fault_around_readahead)
  kFaultlinePrefetch,  // faultline replaying a recorded working set (--prefetch FILE)
  kFaultlineEager,     // faultline filling everything in the background (--prefetch all)
  kFaultlineMetrics,   // faultline on demand timing every fault for the latency histograms (--metrics)
  // The same three ways of serving, from a snapshot image (serve --image)
  // instead of the raw memory file (the image scenario, issue 9).
  kFaultlineImage,          // on demand
  kFaultlineImagePrefetch,  // replaying a recorded working set, image created with --working-set
  kFaultlineImageEager,     // --prefetch all
  kFaultlineImageWarm,      // on demand, the frame cache warm: a second VM of the image on the same daemon
  // The image laid out by a working set, in an object store (a local Ceph
  // RADOS Gateway), restored with --prefetch of that set (the store
  // scenario, issue 11):
  kFaultlineStoreCold,  // an empty --cache-dir and frame cache: every frame fetched from the gateway
  kFaultlineStoreWarm,  // a --cache-dir that an earlier restore filled (a restarted daemon); frame cache empty
};
// True for the backends served by faultline-baseline-server.
bool is_baseline_server(Backend b);
BaselineMode baseline_mode(Backend b);  // REQUIRES: is_baseline_server(b)
// True for the backends served from an image.
bool from_image(Backend b);
const char* to_string(Backend b);
// Short label for tables and the chart: "kernel", "file-mmap", ...
const char* label(Backend b);

// An errno that means "this backend does not apply here" (printed "n/a").
inline constexpr int kNotApplicable = ENOTSUP;

// A faultline Server on its own thread, serving one memory file or one
// image, in this process. on_fatal is kLeave: the "peer" is this very process.
class FaultlineHost {
 public:
  struct Options {
    std::string memory_path;
    std::string image_path;  // ServerConfig::image_path ("STORE_DIR/NAME"): served instead of memory_path
    std::string cache_dir;   // ServerConfig::cache_dir (images in an object store)
    std::string socket_path;
    int workers = 2;
    // ServerConfig::record_path, prefetch_path, prefetch_all, reader_serves_cached.
    std::string record_path;
    std::string prefetch_path;
    bool prefetch_all = false;
    bool reader_serves_cached = true;
    int64_t busy_poll_us = 100;  // ServerConfig::busy_poll
    int prefetch_threads = 2;    // ServerConfig::prefetch_threads
    int prefetch_fetches = 12;   // ServerConfig::prefetch_fetches
    bool record_fault_latency = false;  // ServerConfig::record_fault_latency (serve --metrics)
    uint32_t fault_around_pages = 64;   // ServerConfig::fault_around_pages (serve --fault-around-pages); 0 or 1: off
    bool fault_around_readahead = false;  // ServerConfig::fault_around_readahead (serve --fault-around-readahead)
  };
  static Result<std::unique_ptr<FaultlineHost>> start(const Options& options, const Logger& logger);
  ~FaultlineHost();

  Server& server() { return *server_; }
  const std::string& socket_path() const { return options_.socket_path; }
  // Sessions this host was asked to serve so far.
  uint64_t sessions_started() const { return started_; }
  void count_session() { ++started_; }

 private:
  explicit FaultlineHost(Options o) : options_(std::move(o)) {}
  Options options_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
  Status run_status_;
  uint64_t started_ = 0;
};

struct GuestSpec {
  uint64_t bytes = 0;
  uint64_t page_size = 4096;
  std::string memory_path;         // memory file, at least `bytes` long
  FaultlineHost* host = nullptr;   // for the faultline backends
  // For uffd backends: return only once the server has the uffd (scenario 1
  // measures fault service, not the handshake). Scenario 2 times it all.
  bool wait_until_served = true;
  // For kNaive and kBusyPoll: the server process, already listening, that
  // this guest sends its handshake to. It must outlive the guest.
  BaselineProcess* baseline = nullptr;
};

// One guest memory. Destroying it unmaps the memory and closes its socket,
// then waits until the faultline session has ended or the baseline server has
// exited, so repetitions never overlap.
class BenchGuest {
 public:
  static Result<std::unique_ptr<BenchGuest>> create(Backend backend, const GuestSpec& spec);
  ~BenchGuest();

  uint8_t* base() const { return base_; }
  uint64_t size() const { return spec_.bytes; }
  uint64_t page_size() const { return spec_.page_size; }
  Backend backend() const { return backend_; }
  client::FirecrackerClient* client() { return client_ ? &*client_ : nullptr; }
  // For madvise: the kernel and file backends call madvise directly, the
  // uffd backends go through FirecrackerClient::remove (same syscall).
  Status remove(uint64_t offset, uint64_t length);

 private:
  BenchGuest(Backend b, GuestSpec s) : backend_(b), spec_(std::move(s)) {}
  Backend backend_;
  GuestSpec spec_;
  uint8_t* base_ = nullptr;
  Mapping mapping_;                                // kernel / file backends
  std::optional<client::FirecrackerClient> client_;  // uffd backends
};

// Resident set size of process `pid` (0: this one) from the Rss of its
// /proc/PID/smaps_rollup, bytes.
uint64_t resident_bytes(pid_t pid = 0);

}  // namespace faultline::bench
