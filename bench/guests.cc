#include "bench/guests.h"

#include <fcntl.h>
#include <linux/mman.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

namespace faultline::bench {

const char* to_string(Backend b) {
  switch (b) {
    case Backend::kKernel: return "(a) kernel alone, anonymous memory";
    case Backend::kFileMmap: return "(b) file mmap MAP_PRIVATE, warm page cache";
    case Backend::kNaive: return "(c) naive uffd server (separate process: poll, one read, pread + UFFDIO_COPY per fault)";
    case Backend::kBusyPoll: return "busy-polling uffd server (separate process: the naive one spinning on a non-blocking read)";
    case Backend::kFaultline: return "faultline on demand";
    case Backend::kFaultlineNoFaultAround: return "faultline on demand, fault-around off (fault_around_pages 1)";
    case Backend::kFaultlineReadahead: return "faultline on demand, fault-around with readahead";
    case Backend::kFaultlinePrefetch: return "faultline record+prefetch";
    case Backend::kFaultlineEager: return "faultline eager";
    case Backend::kFaultlineMetrics: return "faultline on demand, fault latency recorded (--metrics)";
    case Backend::kFaultlineImage: return "faultline on demand from an image (serve --image)";
    case Backend::kFaultlineImagePrefetch: return "faultline record+prefetch from an image created with --working-set";
    case Backend::kFaultlineImageEager: return "faultline eager (--prefetch all) from an image";
    case Backend::kFaultlineImageWarm:
      return "faultline on demand from an image, frame cache warm (a second VM of the image on the same daemon)";
    case Backend::kFaultlineStoreCold:
      return "faultline record+prefetch from the image in an object store, cold (empty disk and frame caches)";
    case Backend::kFaultlineStoreWarm:
      return "faultline record+prefetch from the image in an object store, disk cache warm (a restarted daemon)";
  }
  return "?";
}

bool is_baseline_server(Backend b) { return b == Backend::kNaive || b == Backend::kBusyPoll; }

BaselineMode baseline_mode(Backend b) { return b == Backend::kBusyPoll ? BaselineMode::kBusyPoll : BaselineMode::kNaive; }

bool from_image(Backend b) {
  return b == Backend::kFaultlineImage || b == Backend::kFaultlineImagePrefetch || b == Backend::kFaultlineImageEager ||
         b == Backend::kFaultlineImageWarm || b == Backend::kFaultlineStoreCold || b == Backend::kFaultlineStoreWarm;
}

const char* label(Backend b) {
  switch (b) {
    case Backend::kKernel: return "kernel";
    case Backend::kFileMmap: return "file-mmap";
    case Backend::kNaive: return "naive-uffd";
    case Backend::kBusyPoll: return "busy-poll";
    case Backend::kFaultline: return "faultline";
    case Backend::kFaultlineNoFaultAround: return "fl-no-fa";
    case Backend::kFaultlineReadahead: return "fl+ra";
    case Backend::kFaultlinePrefetch: return "fl-prefetch";
    case Backend::kFaultlineEager: return "fl-eager";
    case Backend::kFaultlineMetrics: return "fl+metrics";
    case Backend::kFaultlineImage: return "fl-image";
    case Backend::kFaultlineImagePrefetch: return "fl-img-prefetch";
    case Backend::kFaultlineImageEager: return "fl-img-eager";
    case Backend::kFaultlineImageWarm: return "fl-img-warm";
    case Backend::kFaultlineStoreCold: return "fl-s3-cold";
    case Backend::kFaultlineStoreWarm: return "fl-s3-warm";
  }
  return "?";
}

namespace {

// Polling the server's counters from a benchmark, never ordering a test.
template <typename Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

}  // namespace

Result<std::unique_ptr<FaultlineHost>> FaultlineHost::start(const Options& options, const Logger& logger) {
  std::unique_ptr<FaultlineHost> h(new FaultlineHost(options));
  ServerConfig c;
  c.socket_path = options.socket_path;
  if (options.image_path.empty()) {
    c.memory_path = options.memory_path;
  } else {
    c.image_path = options.image_path;
  }
  c.cache_dir = options.cache_dir;
  c.workers_per_session = options.workers;
  // The client is this process: a fatal session must not SIGKILL the bench.
  c.on_fatal = OnFatal::kLeave;
  c.record_path = options.record_path;
  c.prefetch_path = options.prefetch_path;
  c.prefetch_all = options.prefetch_all;
  c.prefetch_threads = options.prefetch_threads;
  c.prefetch_fetches = options.prefetch_fetches;
  c.reader_serves_cached = options.reader_serves_cached;
  c.busy_poll = std::chrono::microseconds(options.busy_poll_us);
  c.record_fault_latency = options.record_fault_latency;
  c.fault_around_pages = options.fault_around_pages;
  c.fault_around_readahead = options.fault_around_readahead;
  auto s = Server::create(c, logger);
  if (!s) return std::unexpected(s.error());
  h->server_ = std::move(*s);
  h->thread_ = std::thread([p = h.get()] { p->run_status_ = p->server_->run(); });
  return h;
}

FaultlineHost::~FaultlineHost() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

Result<std::unique_ptr<BenchGuest>> BenchGuest::create(Backend backend, const GuestSpec& spec) {
  std::unique_ptr<BenchGuest> g(new BenchGuest(backend, spec));
  const bool huge = spec.page_size == kPageSize2M;
  switch (backend) {
    case Backend::kKernel: {
      int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
      if (huge) flags |= MAP_HUGETLB | MAP_HUGE_2MB;
      auto m = Mapping::map(spec.bytes, PROT_READ | PROT_WRITE, flags);
      if (!m) return std::unexpected(m.error());
      g->mapping_ = std::move(*m);
      g->base_ = g->mapping_.bytes();
      return g;
    }
    case Backend::kFileMmap: {
      // A memory file on an ordinary filesystem cannot be mapped with
      // hugetlb pages: Firecracker restores hugetlbfs snapshots only through
      // a uffd server.
      if (huge) return fail("the File backend has no 2 MiB pages", kNotApplicable);
      UniqueFd fd(::open(spec.memory_path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd) return fail_errno("cannot open " + spec.memory_path);
      auto m = Mapping::map(spec.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd.get(), 0);
      if (!m) return std::unexpected(m.error());
      g->mapping_ = std::move(*m);
      g->base_ = g->mapping_.bytes();
      return g;
    }
    case Backend::kNaive:
    case Backend::kBusyPoll:
    case Backend::kFaultline:
    case Backend::kFaultlineNoFaultAround:
    case Backend::kFaultlineReadahead:
    case Backend::kFaultlinePrefetch:
    case Backend::kFaultlineEager:
    case Backend::kFaultlineMetrics:
    case Backend::kFaultlineImage:
    case Backend::kFaultlineImagePrefetch:
    case Backend::kFaultlineImageEager:
    case Backend::kFaultlineImageWarm:
    case Backend::kFaultlineStoreCold:
    case Backend::kFaultlineStoreWarm: {
      client::ClientConfig cc;
      cc.version = {1, 14};
      cc.region_sizes = {spec.bytes};
      cc.huge_pages = huge;
      auto c = client::FirecrackerClient::create(cc);
      if (!c) return std::unexpected(c.error());
      g->client_.emplace(std::move(*c));
      g->base_ = reinterpret_cast<uint8_t*>(g->client_->regions().front().base_host_virt_addr);
      if (is_baseline_server(backend)) {
        if (spec.baseline == nullptr) return fail("no baseline server process for this guest");
        if (auto s = g->client_->connect_and_send(spec.baseline->socket_path()); !s) return std::unexpected(s.error());
        if (spec.wait_until_served) {
          if (auto s = spec.baseline->wait_serving(std::chrono::seconds(10)); !s) return std::unexpected(s.error());
        }
        return g;
      }
      if (spec.host == nullptr) return fail("no faultline server for this guest", kNotApplicable);
      const size_t ended_before = spec.host->server().finished_sessions().size() +
                                  spec.host->server().rejected_connections().size();
      if (auto s = g->client_->connect_and_send(spec.host->socket_path()); !s) return std::unexpected(s.error());
      spec.host->count_session();
      if (spec.wait_until_served) {
        Server& srv = spec.host->server();
        // live_sessions(), not active_sessions(): the latter also counts a
        // connection whose handshake is still being read.
        if (!wait_for([&] { return !srv.live_sessions().empty() || srv.rejected_connections().size() +
                                                                         srv.finished_sessions().size() > ended_before; },
                      std::chrono::seconds(10)) ||
            srv.live_sessions().empty()) {
          auto rej = srv.rejected_connections();
          return fail("faultline did not start a session: " + (rej.empty() ? std::string("timeout") : rej.back()));
        }
      }
      return g;
    }
  }
  return fail("unknown backend");
}

BenchGuest::~BenchGuest() {
  const bool faultline = client_ && !is_baseline_server(backend_) && spec_.host != nullptr;
  const bool baseline = client_ && is_baseline_server(backend_) && spec_.baseline != nullptr;
  client_.reset();  // closes the socket: a v1.12+ session ends on EOF, a baseline server exits
  // Its outcome stays in the BaselineProcess for the scenario to read.
  if (baseline) (void)spec_.baseline->wait_exit(std::chrono::seconds(30));
  if (faultline) {
    const uint64_t started = spec_.host->sessions_started();
    Server& srv = spec_.host->server();
    (void)srv.wait_for_ended(started, std::chrono::seconds(30));
  }
}

Status BenchGuest::remove(uint64_t offset, uint64_t length) {
  if (client_) {
    auto r = client_->remove(offset, length);
    if (!r) return std::unexpected(r.error());
    return {};
  }
  if (::madvise(base_ + offset, length, MADV_DONTNEED) != 0) return fail_errno("madvise(MADV_DONTNEED) failed");
  return {};
}

uint64_t resident_bytes(pid_t pid) {
  // smaps_rollup walks the page tables: exact. VmRSS in /proc/self/status
  // comes from per-CPU counters that lag by up to tens of pages per CPU,
  // which is the size of what scenario 4 measures.
  std::ifstream f(pid == 0 ? std::string("/proc/self/smaps_rollup")
                           : "/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("Rss:", 0) == 0) return std::strtoull(line.c_str() + 4, nullptr, 10) * 1024;
  }
  return 0;
}

}  // namespace faultline::bench
