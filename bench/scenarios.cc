#include "bench/scenarios.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <sstream>
#include <thread>

#include "bench/load.h"
#include "bench/stats.h"
#include "client/test_memory_file.h"
#include "client/touch.h"
#include "guest/page_state.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "image/transfer.h"
#include "objstore/s3_client.h"
#include "objstore/s3_store.h"
#include "kernel/userfaultfd.h"
#include "metrics/fault_metrics.h"
#include "snapshot/working_set.h"
#if FAULTLINE_BENCH_HAVE_KVM
#include "client/kvm/kvm_guest.h"
#endif

namespace faultline::bench {

Sizes Sizes::quick() {
  Sizes s;
  s.reps = 1;
  s.s1_guest = 32 * kMiB;
  s.s1_vcpu_guest_4k = 4 * kMiB;
  s.s1_vcpu_guest_2m = 16 * kMiB;
  s.s2_guest = 128 * kMiB;
  s.s2_set = 16 * kMiB;
  s.s2_vcpu_guest = 32 * kMiB;
  s.s2_vcpu_set = 4 * kMiB;
  s.s3_guest = 32 * kMiB;
  s.s3_min_removes = 100;
  s.s4_guests = {64 * kMiB, 256 * kMiB};
  s.storage_bytes = 32 * kMiB;
  s.store_generated_bytes = 32 * kMiB;
  s.quiet_wait_s = 2;  // the smoke test on a shared machine must not wait minutes
  return s;
}

double Row::metric(const std::string& key) const {
  for (const auto& [k, v] : metrics) {
    if (k == key) return v;
  }
  return std::nan("");
}

std::string Row::config() const {
  if (!subject.empty()) return subject;
  std::string s = page_size == kPageSize2M ? "2M" : "4K";
  s += " " + toucher + " " + std::to_string(threads) + "T";
  if (order != "-") s += " " + order;
  if (!load.empty()) s += " " + load;
  return s;
}

void warm_page_cache(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return;
  std::vector<uint8_t> buf(4 * kMiB);
  while (::read(fd.get(), buf.data(), buf.size()) > 0) {
  }
}

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(); }

// What the first qword of the page at guest offset `offset` holds in the
// memory file (client/test_memory_file.h: the 4 KiB page index, or 0).
uint64_t expected_first_qword(uint64_t offset) {
  const uint64_t p = offset / client::kTestPageBytes;
  return client::test_page_is_zero(p, kFileSeed, kZeroFraction) ? 0 : p;
}

bool content_checked(Backend b) { return b != Backend::kKernel; }


// Pages of `offsets` whose bytes differ anywhere from the memory file's.
// Runs after the touching threads have joined, outside every timed region.
uint64_t count_bad_pages(const uint8_t* guest, const Mapping& file, std::span<const uint64_t> offsets,
                         uint64_t page_size) {
  uint64_t bad = 0;
  for (uint64_t off : offsets) {
    if (off + page_size > file.size() || std::memcmp(guest + off, file.bytes() + off, page_size) != 0) ++bad;
  }
  return bad;
}

struct TouchOutcome {
  std::vector<uint32_t> latencies_ns;  // one per first access (empty for batched vCPU runs)
  double seconds = 0;                  // first thread's start to last thread's end
  uint64_t bad_pages = 0;
  std::string error;
};

// Host threads read the first byte of every page of their contiguous slice of
// `offsets`; each first access is timed by the thread that makes it.
TouchOutcome touch_host(uint8_t* base, std::span<const uint64_t> offsets, int threads, bool verify) {
  TouchOutcome out;
  std::vector<std::vector<uint32_t>> lat(static_cast<size_t>(threads));
  std::vector<int64_t> start(static_cast<size_t>(threads)), end(static_cast<size_t>(threads));
  std::vector<uint64_t> bad(static_cast<size_t>(threads));
  std::barrier sync(threads);
  {
    std::vector<std::jthread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t b = offsets.size() * static_cast<size_t>(t) / static_cast<size_t>(threads);
        const size_t e = offsets.size() * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
        std::vector<uint32_t>& l = lat[static_cast<size_t>(t)];
        l.assign(e - b, 0);  // allocated and touched before the clock starts
        sync.arrive_and_wait();
        start[static_cast<size_t>(t)] = now_ns();
        uint64_t sink = 0;
        for (size_t i = b; i < e; ++i) {
          const int64_t t0 = now_ns();
          sink += *reinterpret_cast<volatile const uint64_t*>(base + offsets[i]);
          const int64_t t1 = now_ns();
          l[i - b] = static_cast<uint32_t>(std::min<int64_t>(t1 - t0, UINT32_MAX));
        }
        end[static_cast<size_t>(t)] = now_ns();
        asm volatile("" ::"r"(sink));
        if (verify) {
          for (size_t i = b; i < e; ++i) {
            if (*reinterpret_cast<const uint64_t*>(base + offsets[i]) != expected_first_qword(offsets[i])) {
              ++bad[static_cast<size_t>(t)];
            }
          }
        }
      });
    }
  }
  for (int t = 0; t < threads; ++t) {
    out.latencies_ns.insert(out.latencies_ns.end(), lat[static_cast<size_t>(t)].begin(), lat[static_cast<size_t>(t)].end());
    out.bad_pages += bad[static_cast<size_t>(t)];
  }
  out.seconds = static_cast<double>(*std::max_element(end.begin(), end.end()) -
                                    *std::min_element(start.begin(), start.end())) / 1e9;
  return out;
}

#if FAULTLINE_BENCH_HAVE_KVM
// KVM vCPUs read the first and last qword of every page of their slice.
// per_page: one KVM_RUN per page, timed around it (the latency then includes
// a guest entry and exit, the same for every backend); otherwise one run per
// vCPU over its whole slice (throughput only).
TouchOutcome touch_vcpu(BenchGuest& g, std::span<const uint64_t> offsets, int vcpus, bool per_page, bool verify) {
  TouchOutcome out;
  auto kvm = client::KvmGuest::create({{g.base(), g.size()}}, vcpus, g.page_size());
  if (!kvm) {
    out.error = kvm.error().describe();
    return out;
  }
  std::vector<std::vector<uint32_t>> lat(static_cast<size_t>(vcpus));
  std::vector<int64_t> start(static_cast<size_t>(vcpus)), end(static_cast<size_t>(vcpus));
  std::vector<uint64_t> bad(static_cast<size_t>(vcpus));
  std::vector<std::string> errors(static_cast<size_t>(vcpus));
  std::barrier sync(vcpus);
  {
    std::vector<std::jthread> pool;
    for (int v = 0; v < vcpus; ++v) {
      pool.emplace_back([&, v] {
        const size_t vi = static_cast<size_t>(v);
        const size_t b = offsets.size() * vi / static_cast<size_t>(vcpus);
        const size_t e = offsets.size() * (vi + 1) / static_cast<size_t>(vcpus);
        auto check = [&](uint64_t off, uint64_t first) {
          if (verify && first != expected_first_qword(off)) ++bad[vi];
        };
        if (per_page) lat[vi].assign(e - b, 0);
        sync.arrive_and_wait();
        start[vi] = now_ns();
        if (per_page) {
          for (size_t i = b; i < e; ++i) {
            const int64_t t0 = now_ns();
            auto r = kvm->run_touch(v, offsets.subspan(i, 1), client::VcpuAccess::kRead, 1);
            const int64_t t1 = now_ns();
            if (!r) {
              errors[vi] = r.error().describe();
              break;
            }
            lat[vi][i - b] = static_cast<uint32_t>(std::min<int64_t>(t1 - t0, UINT32_MAX));
            check(offsets[i], r->first_qword[0]);
          }
        } else if (e > b) {
          auto r = kvm->run_touch(v, offsets.subspan(b, e - b), client::VcpuAccess::kRead, 1);
          if (!r) {
            errors[vi] = r.error().describe();
          } else {
            for (size_t i = b; i < e; ++i) check(offsets[i], r->first_qword[i - b]);
          }
        }
        end[vi] = now_ns();
      });
    }
  }
  for (size_t v = 0; v < static_cast<size_t>(vcpus); ++v) {
    if (!errors[v].empty() && out.error.empty()) out.error = "vCPU " + std::to_string(v) + ": " + errors[v];
    out.latencies_ns.insert(out.latencies_ns.end(), lat[v].begin(), lat[v].end());
    out.bad_pages += bad[v];
  }
  out.seconds = static_cast<double>(*std::max_element(end.begin(), end.end()) -
                                    *std::min_element(start.begin(), start.end())) / 1e9;
  return out;
}
#endif

// Touches, then (backends other than the kernel's, when `file` is given)
// compares every byte of every touched page with the memory file.
TouchOutcome touch(BenchGuest& g, const std::string& toucher, std::span<const uint64_t> offsets, int threads,
                   bool per_page, const Mapping* file) {
  const bool verify = content_checked(g.backend()) && file != nullptr;
  auto with_full_check = [&](TouchOutcome t) {
    if (verify && t.error.empty()) t.bad_pages += count_bad_pages(g.base(), *file, offsets, g.page_size());
    return t;
  };
  // Host threads read first qwords only while timed; the full check follows.
  if (toucher == "host") return with_full_check(touch_host(g.base(), offsets, threads, false));
#if FAULTLINE_BENCH_HAVE_KVM
  // vCPUs also check the qwords the guest itself read.
  return with_full_check(touch_vcpu(g, offsets, threads, per_page, verify));
#else
  (void)per_page;
  TouchOutcome out;
  out.error = "built without client/kvm";
  return out;
#endif
}

// Collects one backend's repetitions for one configuration.
struct Series {
  Backend backend;
  std::map<std::string, std::vector<double>> values;
  bool not_applicable = false;
  std::string note;
  void add(const std::string& key, double v) { values[key].push_back(v); }
};

// Runs `body(series, rep)` for every repetition and backend, the backend
// order rotated each repetition so that no backend always runs first (the
// machine is shared and noisy: interleaving spreads the noise over all).
std::vector<Series> make_series(const std::vector<Backend>& backends) {
  std::vector<Series> series;
  for (Backend b : backends) series.push_back(Series{b, {}, false, {}});
  return series;
}

// One repetition: `body(series, rep)` for every backend, starting with a
// different one each repetition.
template <typename Body>
void run_repetition(std::vector<Series>& series, int rep, Body& body) {
  for (size_t k = 0; k < series.size(); ++k) {
    Series& s = series[(k + static_cast<size_t>(rep)) % series.size()];
    if (s.not_applicable || !s.note.empty()) continue;
    body(s, rep);
  }
}

template <typename Body>
std::vector<Series> interleaved(const std::vector<Backend>& backends, int reps, Body body) {
  std::vector<Series> series = make_series(backends);
  for (int rep = 0; rep < reps; ++rep) run_repetition(series, rep, body);
  return series;
}

void record_failure(Series& s, const Error& e) {
  if (e.code == kNotApplicable) {
    s.not_applicable = true;
    s.note = e.message;
  } else {
    s.note = "error: " + e.describe();
  }
}

void push_rows(Context& ctx, const Row& proto, const std::vector<Series>& series, int reps) {
  for (const Series& s : series) {
    Row r = proto;
    r.backend = s.backend;
    r.reps = reps;
    r.not_applicable = s.not_applicable;
    r.note = s.note;
    for (const auto& [k, v] : s.values) r.metrics.emplace_back(k, median(v));
    ctx.results->rows.push_back(std::move(r));
  }
}

std::vector<uint64_t> page_sizes(const Context& ctx) {
  std::vector<uint64_t> v{kPageSize4K};
  if (ctx.huge_pages) v.push_back(kPageSize2M);
  return v;
}

std::vector<std::string> touchers(const Context& ctx) {
  std::vector<std::string> v{"host"};
  if (ctx.kvm) v.push_back("vcpu");
  return v;
}

void progress(const std::string& what) {
  std::fprintf(stderr, "  %s\n", what.c_str());
  std::fflush(stderr);
}


// For the baseline backends, a fresh faultline-baseline-server listening for
// one guest's handshake (Firecracker starts one uffd handler per VM); null
// for the other backends. Started before any timed region.
Result<std::unique_ptr<BaselineProcess>> start_baseline(Context& ctx, Backend b, const std::string& memory_path) {
  if (!is_baseline_server(b)) return std::unique_ptr<BaselineProcess>();
  return BaselineProcess::start(baseline_mode(b), memory_path, ctx.dir + "/baseline.sock");
}

// After the guest of a baseline backend is gone: the server must have exited
// cleanly; its fault count goes to `key`. False (and the failure recorded)
// otherwise.
bool finish_baseline(Series& s, BaselineProcess* baseline, const std::string& key) {
  if (baseline == nullptr) return true;
  auto stats = baseline->wait_exit(std::chrono::seconds(30));
  if (!stats) {
    record_failure(s, stats.error());
    return false;
  }
  if (!key.empty()) s.add(key, static_cast<double>(stats->faults));
  return true;
}

// With --metrics-cost, a second faultline host that records fault latency
// (null otherwise, or with a note when it did not start).
std::unique_ptr<FaultlineHost> start_metrics_host(Context& ctx, const std::string& memory_path, const std::string& name,
                                                  std::vector<Backend>& backends) {
  if (!ctx.metrics_cost) return nullptr;
  FaultlineHost::Options o;
  o.record_fault_latency = true;
  auto h = start_host(ctx, memory_path, name, o);
  if (!h) {
    ctx.results->notes.push_back(name + ": faultline with metrics did not start: " + h.error().describe());
    return nullptr;
  }
  backends.push_back(Backend::kFaultlineMetrics);
  return std::move(*h);
}

void note_bad(Context& ctx, const TouchOutcome& t, Backend b, const std::string& where) {
  if (t.bad_pages == 0) return;
  ctx.results->data_mismatches += t.bad_pages;
  ctx.results->notes.push_back(std::string("DATA MISMATCH: ") + label(b) + " served " + std::to_string(t.bad_pages) +
                               " pages with wrong content in " + where);
}

// A restore that read its pages: the seconds from the guest's mapping (its
// handshake included, unless GuestSpec::wait_until_served) to its last page,
// and the guest, still mapped, so that its session is still live for the
// caller to read counters from (destroying it ends the session).
struct PagesRead {
  double seconds = 0;
  std::unique_ptr<BenchGuest> guest;
};

// A guest of `backend` (`spec`) reads one byte of every page of `pages`, in
// order, on one host thread; then every byte of those pages is compared with
// `file`, and pages that differ are noted for `where`: a working-set restore.
Result<PagesRead> read_pages(Context& ctx, Backend backend, const GuestSpec& spec, std::span<const uint64_t> pages,
                             const Mapping& file, const std::string& where) {
  const int64_t t0 = now_ns();
  auto g = BenchGuest::create(backend, spec);
  if (!g) return std::unexpected(g.error());
  const double setup = static_cast<double>(now_ns() - t0) / 1e9;
  TouchOutcome t = touch(**g, "host", pages, 1, false, &file);
  if (!t.error.empty()) return std::unexpected(Error{0, t.error});
  note_bad(ctx, t, backend, where);
  return PagesRead{setup + t.seconds, std::move(*g)};
}

}  // namespace

Result<std::unique_ptr<FaultlineHost>> start_host(Context& ctx, const std::string& memory_path,
                                                  const std::string& name, FaultlineHost::Options o, bool fault_around) {
  o.memory_path = memory_path;
  o.workers = ctx.faultline_workers;
  o.reader_serves_cached = ctx.faultline_reader_serves_cached;
  o.busy_poll_us = ctx.faultline_busy_poll_us;
  o.prefetch_threads = ctx.faultline_prefetch_threads;
  o.prefetch_fetches = ctx.faultline_prefetch_fetches;
  o.fault_around_pages = fault_around ? ctx.faultline_fault_around_pages : 1;
  o.fault_around_readahead = o.fault_around_readahead || ctx.faultline_fault_around_readahead;
  o.socket_path = ctx.dir + "/" + name + ".sock";
  return FaultlineHost::start(o, *ctx.logger);
}

// --- scenario 1: on-demand fault service ---------------------------------

void run_scenario1(Context& ctx) {
  auto host = start_host(ctx, ctx.file_small, "s1");
  if (!host) {
    ctx.results->notes.push_back("scenario 1: faultline did not start: " + host.error().describe());
    return;
  }
  warm_page_cache(ctx.file_small);
  auto file = Mapping::map_file(ctx.file_small);
  if (!file) {
    ctx.results->notes.push_back("scenario 1: cannot map the memory file: " + file.error().describe());
    return;
  }
  std::vector<Backend> backends{Backend::kKernel, Backend::kFileMmap, Backend::kNaive, Backend::kBusyPoll,
                                Backend::kFaultline};
  auto with_metrics = start_metrics_host(ctx, ctx.file_small, "s1-metrics", backends);
  // The generated load: one spinning thread per core, in another process.
  const int load_threads = core_count();
  for (uint64_t ps : page_sizes(ctx)) {
    for (const std::string& toucher : touchers(ctx)) {
      const uint64_t bytes = toucher == "host" ? ctx.sizes.s1_guest
                                               : (ps == kPageSize4K ? ctx.sizes.s1_vcpu_guest_4k : ctx.sizes.s1_vcpu_guest_2m);
      const uint64_t pages = bytes / ps;
      for (int threads : {1, 2}) {
        for (auto order : {client::PageOrder::kSequential, client::PageOrder::kRandom}) {
          Row proto;
          proto.scenario = 1;
          proto.page_size = ps;
          proto.toucher = toucher;
          proto.threads = threads;
          proto.order = order == client::PageOrder::kSequential ? "seq" : "random";
          proto.guest_bytes = bytes;
          proto.pages = pages;
          progress("scenario 1: " + proto.config() + " (quiet and loaded)");
          const auto offsets = client::select_pages(pages, ps, 1.0, order, 11);
          auto body = [&](Series& s, int) {
            auto baseline = start_baseline(ctx, s.backend, ctx.file_small);
            if (!baseline) return record_failure(s, baseline.error());
            FaultlineHost* h = s.backend == Backend::kFaultlineMetrics ? with_metrics.get() : host->get();
            {
              auto g = BenchGuest::create(s.backend, GuestSpec{bytes, ps, ctx.file_small, h, true, baseline->get()});
              if (!g) return record_failure(s, g.error());
              TouchOutcome t = touch(**g, toucher, offsets, threads, true, &*file);
              if (!t.error.empty()) return record_failure(s, Error{0, t.error});
              note_bad(ctx, t, s.backend, "scenario 1 " + proto.config());
              s.add("faults_per_s", static_cast<double>(offsets.size()) / t.seconds);
              s.add("p50_us", percentile(t.latencies_ns, 50) / 1e3);
              s.add("p99_us", percentile(t.latencies_ns, 99) / 1e3);
              if (s.backend == Backend::kFaultline || s.backend == Backend::kFaultlineMetrics) {
                for (const SessionSummary& live : h->server().live_sessions()) {
                  s.add("server_faults", static_cast<double>(live.counters.faults));
                }
              }
            }  // the guest is gone: a baseline server exits and reports
            finish_baseline(s, baseline->get(), "server_faults");
          };
          // Repetitions alternate quiet and loaded, so that both see the same
          // drift of the machine.
          std::vector<Series> quiet = make_series(backends), loaded = make_series(backends);
          int not_quiet_reps = 0;
          double worst_other = 0;
          std::string load_error;
          for (int rep = 0; rep < ctx.sizes.reps; ++rep) {
            {
              const QuietWait w = wait_for_quiet(std::chrono::seconds(ctx.sizes.quiet_wait_s), std::chrono::milliseconds(500));
              const double load1 = load_average_1min();
              OtherLoadMeter meter;
              run_repetition(quiet, rep, body);
              const double other = meter.other_cores();
              // Refused as quiet when the machine was busy before or during it.
              if (!w.quiet || !(other <= kQuietMaxOtherCores)) ++not_quiet_reps;
              worst_other = std::max({worst_other, w.other_cores, other});
              for (Series& s : quiet) {
                s.add("load1", load1);
                s.add("other_cores", other);
                s.add("quiet_wait_s", w.waited_s);
              }
            }
            auto spinner = SpinLoad::start(load_threads);
            if (!spinner) {
              load_error = "error: the background load did not start: " + spinner.error().describe();
              break;
            }
            const double load1 = load_average_1min();
            OtherLoadMeter meter;
            run_repetition(loaded, rep, body);
            const double seconds = meter.seconds();
            auto ended = spinner->stop();
            if (!ended) {
              load_error = "error: the background load: " + ended.error().describe();
              break;
            }
            // Measured after the spinner was reaped: its CPU counts as the bench's.
            const double other = meter.other_cores();
            for (Series& s : loaded) {
              s.add("load1", load1);
              s.add("other_cores", other);
              s.add("load_cores", ended->cpu_seconds / seconds);
            }
          }
          proto.load = "quiet";
          const size_t first_quiet = ctx.results->rows.size();
          push_rows(ctx, proto, quiet, ctx.sizes.reps);
          for (size_t i = first_quiet; i < ctx.results->rows.size(); ++i) {
            Row& row = ctx.results->rows[i];
            row.metrics.emplace_back("not_quiet_reps", static_cast<double>(not_quiet_reps));
            if (not_quiet_reps > 0) {
              char why[160];
              std::snprintf(why, sizeof why, "NOT quiet (%d of %d reps: other processes up to %.2f cores > %.1f)",
                            not_quiet_reps, ctx.sizes.reps, worst_other, kQuietMaxOtherCores);
              row.note = row.note.empty() ? why : row.note + "; " + why;
            }
          }
          proto.load = "loaded";
          const size_t first_loaded = ctx.results->rows.size();
          push_rows(ctx, proto, loaded, ctx.sizes.reps);
          for (size_t i = first_loaded; i < ctx.results->rows.size(); ++i) {
            Row& row = ctx.results->rows[i];
            row.metrics.emplace_back("load_threads", static_cast<double>(load_threads));
            if (!load_error.empty() && row.note.empty()) row.note = load_error;
          }
        }
      }
    }
  }
}

// --- scenario 2: restore of a working set ---------------------------------

void run_scenario2(Context& ctx) {
  auto on_demand = start_host(ctx, ctx.file_large, "s2");
  if (!on_demand) {
    ctx.results->notes.push_back("scenario 2: faultline did not start: " + on_demand.error().describe());
    return;
  }
  std::unique_ptr<FaultlineHost> eager;
  std::string eager_note;
  {
    FaultlineHost::Options o;
    o.prefetch_all = true;
    auto h = start_host(ctx, ctx.file_large, "s2-eager", o);
    if (h) {
      eager = std::move(*h);
    } else {
      eager_note = "error: " + h.error().describe();
    }
  }
  warm_page_cache(ctx.file_large);
  auto file = Mapping::map_file(ctx.file_large);
  if (!file) {
    ctx.results->notes.push_back("scenario 2: cannot map the memory file: " + file.error().describe());
    return;
  }
  const std::vector<Backend> backends{Backend::kKernel,   Backend::kFileMmap,          Backend::kNaive,
                                      Backend::kFaultline, Backend::kFaultlinePrefetch, Backend::kFaultlineEager};
  for (uint64_t ps : page_sizes(ctx)) {
    for (const std::string& toucher : touchers(ctx)) {
      const uint64_t bytes = toucher == "host" ? ctx.sizes.s2_guest : ctx.sizes.s2_vcpu_guest;
      const uint64_t set_bytes = toucher == "host" ? ctx.sizes.s2_set : ctx.sizes.s2_vcpu_set;
      const uint64_t pages = bytes / ps;
      const double fraction = static_cast<double>(set_bytes) / static_cast<double>(bytes);
      // The working set: pages spread over the whole guest, first touched in random order.
      const auto set = client::select_pages(pages, ps, fraction, client::PageOrder::kRandom, 13);
      for (int threads : {1, 2}) {
        Row proto;
        proto.scenario = 2;
        proto.page_size = ps;
        proto.toucher = toucher;
        proto.threads = threads;
        proto.guest_bytes = bytes;
        proto.pages = set.size();
        progress("scenario 2: " + proto.config());

        // record+prefetch: one recorded run first (not timed), then replays.
        std::unique_ptr<FaultlineHost> prefetch;
        std::string prefetch_note;
        {
          const std::string record = ctx.dir + "/record-" + std::to_string(ps) + "-" + toucher + "-" +
                                     std::to_string(threads) + ".flrec";
          FaultlineHost::Options ro;
          ro.record_path = record;
          auto rh = start_host(ctx, ctx.file_large, "s2-record", ro);
          if (!rh) {
            prefetch_note = "error: " + rh.error().describe();
          } else {
            {
              auto g = BenchGuest::create(Backend::kFaultline, GuestSpec{bytes, ps, ctx.file_large, rh->get(), true});
              if (!g) {
                prefetch_note = "error: recording run: " + g.error().describe();
              } else {
                TouchOutcome t = touch(**g, toucher, set, threads, false, &*file);
                if (!t.error.empty()) prefetch_note = "error: recording run: " + t.error;
                note_bad(ctx, t, Backend::kFaultline, "the recording run of scenario 2 " + proto.config());
              }
            }  // the session ends here and writes the record
            rh->reset();
            FaultlineHost::Options po;
            po.prefetch_path = record;
            if (prefetch_note.rfind("error:", 0) != 0) {  // the recording run went well
              auto ph = start_host(ctx, ctx.file_large, "s2-prefetch", po);
              if (ph) {
                prefetch = std::move(*ph);
              } else {
                prefetch_note = "error: " + ph.error().describe();
              }
            }
          }
        }

        auto series = interleaved(backends, ctx.sizes.reps, [&](Series& s, int) {
          FaultlineHost* host = on_demand->get();
          if (s.backend == Backend::kFaultlinePrefetch) host = prefetch.get();
          if (s.backend == Backend::kFaultlineEager) host = eager.get();
          if (host == nullptr) {
            s.not_applicable = true;
            s.note = s.backend == Backend::kFaultlinePrefetch ? prefetch_note : eager_note;
            return;
          }
          // A baseline server is started (listening) before the clock, as
          // Firecracker's uffd handler is before the snapshot load.
          auto baseline = start_baseline(ctx, s.backend, ctx.file_large);
          if (!baseline) return record_failure(s, baseline.error());
          {
            const int64_t t0 = now_ns();
            auto g = BenchGuest::create(s.backend, GuestSpec{bytes, ps, ctx.file_large, host, false, baseline->get()});
            if (!g) return record_failure(s, g.error());
            const double setup = static_cast<double>(now_ns() - t0) / 1e9;
            TouchOutcome t = touch(**g, toucher, set, threads, false, &*file);
            if (!t.error.empty()) return record_failure(s, Error{0, t.error});
            note_bad(ctx, t, s.backend, "scenario 2 " + proto.config());
            s.add("restore_ms", (setup + t.seconds) * 1e3);
            if (s.backend == Backend::kFaultline || s.backend == Backend::kFaultlinePrefetch ||
                s.backend == Backend::kFaultlineEager) {
              // What the session did by the time the set was verified (the
              // eager fill may still be running).
              for (const SessionSummary& live : host->server().live_sessions()) {
                s.add("prefetched_pages", static_cast<double>(live.counters.prefaulted_pages));
                s.add("demand_faults", static_cast<double>(live.counters.faults));
                s.add("prefetch_late", static_cast<double>(live.counters.prefetch_late));
              }
            }
          }
          finish_baseline(s, baseline->get(), "demand_faults");
        });
        push_rows(ctx, proto, series, ctx.sizes.reps);
      }
    }
  }
}

// --- scenario 3: REMOVE under load -----------------------------------------

void run_scenario3(Context& ctx) {
  auto host = start_host(ctx, ctx.file_small, "s3");
  if (!host) {
    ctx.results->notes.push_back("scenario 3: faultline did not start: " + host.error().describe());
    return;
  }
  warm_page_cache(ctx.file_small);
  std::vector<Backend> backends{Backend::kKernel, Backend::kFileMmap, Backend::kNaive, Backend::kFaultline};
  auto with_metrics = start_metrics_host(ctx, ctx.file_small, "s3-metrics", backends);
  for (uint64_t ps : page_sizes(ctx)) {
    const uint64_t bytes = ctx.sizes.s3_guest;
    const uint64_t pages = bytes / ps;
    // What a balloon gives back at a time: 64 KiB of 4 KiB pages, one 2 MiB page.
    const uint64_t remove_bytes = ps == kPageSize4K ? 16 * ps : ps;
    for (int threads : {1, 2}) {
      Row proto;
      proto.scenario = 3;
      proto.page_size = ps;
      proto.threads = threads;
      proto.guest_bytes = bytes;
      proto.pages = ctx.sizes.s3_min_removes;
      progress("scenario 3: " + proto.config());
      const auto offsets = client::select_pages(pages, ps, 1.0, client::PageOrder::kSequential, 17);
      auto series = interleaved(backends, ctx.sizes.reps, [&](Series& s, int rep) {
        FaultlineHost* h = s.backend == Backend::kFaultlineMetrics ? with_metrics.get() : host->get();
        auto baseline = start_baseline(ctx, s.backend, ctx.file_small);
        if (!baseline) return record_failure(s, baseline.error());
        auto g = BenchGuest::create(s.backend, GuestSpec{bytes, ps, ctx.file_small, h, true, baseline->get()});
        if (!g) return record_failure(s, g.error());
        // Touchers sweep the guest over and over (the first sweep faults every
        // page, later ones re-fault what was removed) until the removes are done.
        std::atomic<bool> stop{false};
        std::atomic<uint64_t> sweeps{0};
        std::vector<std::jthread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            const size_t b = offsets.size() * static_cast<size_t>(t) / static_cast<size_t>(threads);
            const size_t e = offsets.size() * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
            uint64_t sink = 0;
            while (!stop.load(std::memory_order_relaxed)) {
              for (size_t i = b; i < e && !stop.load(std::memory_order_relaxed); ++i) {
                sink += *reinterpret_cast<volatile const uint64_t*>((*g)->base() + offsets[i]);
              }
              sweeps.fetch_add(1, std::memory_order_relaxed);
            }
            asm volatile("" ::"r"(sink));
          });
        }
        std::mt19937_64 rng(1000 + static_cast<uint64_t>(rep));
        std::vector<uint32_t> lat;
        lat.reserve(ctx.sizes.s3_min_removes);
        std::string error;
        for (uint64_t i = 0; i < ctx.sizes.s3_min_removes; ++i) {
          const uint64_t off = (rng() % ((bytes - remove_bytes) / ps + 1)) * ps;
          const int64_t t0 = now_ns();
          auto st = (*g)->remove(off, remove_bytes);
          const int64_t t1 = now_ns();
          if (!st) {
            error = st.error().describe();
            break;
          }
          lat.push_back(static_cast<uint32_t>(std::min<int64_t>(t1 - t0, UINT32_MAX)));
          // Pacing, not ordering: a balloon returns memory now and then, not in a tight loop.
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        stop.store(true);
        pool.clear();
        if (!error.empty()) return record_failure(s, Error{0, error});
        if (s.backend == Backend::kFaultline || s.backend == Backend::kFaultlineMetrics) {
          // Where the session's work went while the removes ran.
          for (const SessionSummary& live : h->server().live_sessions()) {
            s.add("faults", static_cast<double>(live.counters.faults));
            s.add("reader_served", static_cast<double>(live.counters.reader_served));
            s.add("eagain_retries", static_cast<double>(live.counters.retries));
          }
        }
        s.add("madvise_p50_us", percentile(lat, 50) / 1e3);
        s.add("madvise_p99_us", percentile(lat, 99) / 1e3);
        s.add("madvise_max_us", percentile(lat, 100) / 1e3);
        s.add("removes", static_cast<double>(lat.size()));
        g->reset();  // the guest is gone: a baseline server exits and reports
        if (baseline->get() != nullptr) {
          auto stats = (*baseline)->wait_exit(std::chrono::seconds(30));
          if (!stats) return record_failure(s, stats.error());
          s.add("faults", static_cast<double>(stats->faults));
          s.add("eagain_retries", static_cast<double>(stats->eagain_retries));
        }
      });
      push_rows(ctx, proto, series, ctx.sizes.reps);
    }
  }
}

// --- the cost of recording, alone ---------------------------------------------

void measure_metrics_recording(Context& ctx) {
  // As on the fault path: one clock read when the batch is read (here one
  // fault per batch, the worst case) and one when the fault is served,
  // inside record(). Paths rotate so every histogram is written.
  metrics::FaultLatencyShard shard;
  constexpr int kRounds = 5;
  constexpr uint64_t kFaults = 2'000'000;
  std::vector<double> per_fault;
  for (int round = 0; round < kRounds; ++round) {
    const int64_t t0 = now_ns();
    for (uint64_t i = 0; i < kFaults; ++i) {
      const int64_t read_ns = metrics::now_ns();
      shard.record(static_cast<metrics::FaultPath>(i & 3), read_ns);
    }
    per_fault.push_back(static_cast<double>(now_ns() - t0) / static_cast<double>(kFaults));
  }
  std::array<metrics::HistogramCounts, metrics::kFaultPaths> counts{};
  shard.add_to(counts);
  uint64_t recorded = 0;
  for (const auto& c : counts) recorded += c.count();
  if (recorded != kRounds * kFaults) ctx.results->notes.push_back("metrics recording: counts do not add up");
  ctx.results->metrics_record_ns = median(per_fault);
}

// --- scenario 4: server memory ---------------------------------------------

void run_scenario4(Context& ctx) {
  for (uint64_t ps : {kPageSize4K, kPageSize2M}) {
    for (uint64_t bytes : ctx.sizes.s4_guests) {
      Row proto;
      proto.scenario = 4;
      proto.page_size = ps;
      proto.toucher = "-";
      proto.guest_bytes = bytes;
      proto.pages = bytes / ps;
      progress("scenario 4: " + std::to_string(bytes / kMiB) + " MiB guest, " + (ps == kPageSize2M ? "2M" : "4K"));
      auto series = interleaved({Backend::kNaive, Backend::kFaultline}, ctx.sizes.reps, [&](Series& s, int) {
        // Give freed heap pages back first, so that the session's allocations
        // show up in RSS instead of reusing memory a previous guest left resident.
        // A fresh server per measurement: sessions of earlier repetitions are
        // freed lazily and would shrink the delta while it is measured.
        std::unique_ptr<FaultlineHost> host;
        if (s.backend == Backend::kFaultline) {
          auto h = start_host(ctx, ctx.file_sparse, "s4");
          if (!h) return record_failure(s, h.error());
          host = std::move(*h);
        }
        auto baseline = start_baseline(ctx, s.backend, ctx.file_sparse);
        if (!baseline) return record_failure(s, baseline.error());
        // The server's RSS: the naive one is a process of its own.
        const pid_t server_pid = baseline->get() != nullptr ? (*baseline)->pid() : 0;
        ::malloc_trim(0);
        const uint64_t before = resident_bytes(server_pid);
        auto g = BenchGuest::create(s.backend, GuestSpec{bytes, ps, ctx.file_sparse, host.get(), true, baseline->get()});
        if (!g) return record_failure(s, g.error());
        const uint64_t after = resident_bytes(server_pid);
        const uint64_t pages = bytes / ps;
        double state = 0, table = 0, record = 0;
        if (s.backend == Backend::kNaive) {
          state = static_cast<double>((*baseline)->state_bytes());
          table = static_cast<double>(pages);  // its removed-page map, one byte a page
        } else {
          // What the session itself says it holds (Session::memory_use()).
          std::shared_ptr<Session> session;
          for (const SessionSummary& live : host->server().live_sessions()) session = host->server().session(live.id);
          if (!session) return record_failure(s, Error{0, "faultline has no live session to measure"});
          const Session::MemoryUse use = session->memory_use();
          table = static_cast<double>(use.page_state_bytes);
          record = static_cast<double>(use.record_bytes);
          state = static_cast<double>(use.total());
        }
        const double pages_4k = static_cast<double>(bytes) / 4096.0;
        const double gib = static_cast<double>(bytes) / static_cast<double>(kGiB);
        s.add("state_bytes", state);
        s.add("state_bytes_per_gib", state / gib);
        s.add("state_bytes_per_4k_page", state / pages_4k);
        s.add("table_bytes_per_4k_page", table / pages_4k);
        s.add("record_bytes", record);
        s.add("rss_delta_bytes", static_cast<double>(after) - static_cast<double>(before));
      });
      push_rows(ctx, proto, series, ctx.sizes.reps);
    }
  }
}

// --- the image scenario: serving an image against serving the raw file ------

namespace {

// The guest's pages all resident (mincore): an eager fill has finished.
// Polled from the benchmark, never ordering a test.
Result<bool> all_resident(const uint8_t* base, uint64_t bytes, std::vector<unsigned char>& vec) {
  vec.resize(bytes / kPageSize4K);
  if (::mincore(const_cast<uint8_t*>(base), bytes, vec.data()) != 0) return fail_errno("mincore of the guest failed");
  for (unsigned char v : vec) {
    if ((v & 1) == 0) return false;
  }
  return true;
}

struct ImageSubject {
  std::string name;     // "generated", "realistic"
  std::string path;     // the raw memory file
  std::string ws_path;  // pages to restore, in order (the corpus's measured set), or empty: random 1/8
};

// The pages `subject` restores, in order: the corpus's measured set, or 1/8
// of the file's pages at random.
Result<std::vector<uint64_t>> working_set_of(const ImageSubject& subject, uint64_t size) {
  if (subject.ws_path.empty()) {
    return client::select_pages(size / kPageSize4K, kPageSize4K, 1.0 / 8, client::PageOrder::kRandom, 13);
  }
  auto ws = read_working_set(subject.ws_path, size);
  if (!ws) return std::unexpected(ws.error());
  return std::move(ws->offsets);
}

// Writes `record` as a restore of `set` records it (serve --record): one
// untimed restore through a recording server, every byte read checked.
Status record_working_set(Context& ctx, const ImageSubject& subject, std::span<const uint64_t> set,
                          const Mapping& file, const std::string& record, const std::string& scenario) {
  FaultlineHost::Options ro;
  ro.record_path = record;
  auto rh = start_host(ctx, subject.path, scenario + "-record", ro);
  if (!rh) return fail("recording server: " + rh.error().describe());
  auto r = read_pages(ctx, Backend::kFaultline, GuestSpec{file.size(), kPageSize4K, subject.path, rh->get(), true}, set,
                      file, "the recording run of the " + scenario + " scenario (" + subject.name + ")");
  if (!r) return fail("recording run: " + r.error().describe());
  return {};
}  // the session ends with the guest, before the server: the record is written

// Runs `measure(ctx, subject)`: a failure becomes a row of `scenario` with
// the error; every row it added (the error row too) gets the 1-minute load
// average before and after and the core count. Returns the index of its
// first row.
template <typename Measure>
size_t measure_subject(Context& ctx, int scenario, const ImageSubject& subject, Measure measure) {
  const double load_before = load_average_1min();
  const size_t first_row = ctx.results->rows.size();
  if (auto st = measure(ctx, subject); !st) {
    Row row;
    row.scenario = scenario;
    row.subject = subject.name;
    row.not_applicable = true;
    row.note = "error: " + st.error().describe();
    ctx.results->rows.push_back(row);
  }
  const double load_after = load_average_1min();
  for (size_t i = first_row; i < ctx.results->rows.size(); ++i) {
    ctx.results->rows[i].metrics.emplace_back("load1_before", load_before);
    ctx.results->rows[i].metrics.emplace_back("load1_after", load_after);
    ctx.results->rows[i].metrics.emplace_back("cores", static_cast<double>(core_count()));
  }
  return first_row;
}

// Serves `subject` from the raw file and from images of it, side by side.
Status measure_image_serving(Context& ctx, const ImageSubject& subject) {
  warm_page_cache(subject.path);
  auto file = Mapping::map_file(subject.path);
  if (!file) return std::unexpected(file.error());
  const uint64_t size = file->size();
  if (size == 0 || size % kPageSize4K != 0) return fail(subject.path + ": not a whole number of 4 KiB pages", EINVAL);

  // The store lives beside the raw file (the same file system, both warm in
  // the page cache: a create has just written every blob).
  const std::string store_dir = ctx.dir + "/image-" + subject.name + "-store";
  auto store = image::LocalStore::open(store_dir, true);
  if (!store) return std::unexpected(store.error());
  auto create = [&](const std::string& name, uint32_t page_size, const std::string& working_set) -> Status {
    image::CreateOptions o;
    o.memory_path = subject.path;
    o.name = name;
    o.page_size = page_size;
    if (page_size == image::kSmallPage) o.frame_pages = ctx.image_frame_pages;
    if (!working_set.empty()) o.working_set_path = working_set;
    auto r = image::create_image(**store, o);
    if (!r) return fail("image create " + name + ": " + r.error().describe(), r.error().code);
    return {};
  };
  progress("image: creating the images of the " + subject.name + " file");
  if (auto st = create("base", image::kSmallPage, ""); !st) return st;
  const bool huge = ctx.huge_pages && size % kPageSize2M == 0;
  if (huge) {
    if (auto st = create("base-2m", image::kHugePage, ""); !st) return st;
  }
  const std::string image_4k = store_dir + "/base";
  const std::string image_2m = store_dir + "/base-2m";
  int socket_seq = 0;
  auto wanted = [&](const std::string& row_subject) {
    return ctx.image_rows.empty() || row_subject.find(ctx.image_rows) != std::string::npos;
  };
  // A fresh server for every measurement: its frame cache starts empty, so
  // an image pays every decompression it needs (a raw-file server has no
  // cache to lose; its file stays warm in the page cache).
  auto fresh_host = [&](Backend b, uint64_t ps, FaultlineHost::Options o) {
    if (from_image(b)) o.image_path = ps == kPageSize2M ? image_2m : image_4k;
    // The image laid out by the record it replays (create --working-set).
    if (b == Backend::kFaultlineImagePrefetch) o.image_path = store_dir + "/base-ws";
    return start_host(ctx, subject.path, "img-" + std::to_string(socket_seq++ % 4), o);
  };
  // kFaultlineImageWarm: another VM first reads `offsets` through the same
  // server (untimed, checked), so the frames are in its cache when the
  // measured VM comes: the many-VMs-of-one-template case.
  auto warm_up = [&](Series& s, FaultlineHost& host, uint64_t ps, std::span<const uint64_t> offsets) -> bool {
    auto r = read_pages(ctx, Backend::kFaultlineImage, GuestSpec{size, ps, subject.path, &host, true}, offsets, *file,
                        "the warm-up VM of the image scenario (" + subject.name + ")");
    if (!r) record_failure(s, Error{0, "warm-up VM: " + r.error().describe()});
    return r.has_value();
  };
  auto session_counters = [](FaultlineHost& host, Series& s) {
    for (const SessionSummary& live : host.server().live_sessions()) {
      s.add("demand_faults", static_cast<double>(live.counters.faults));
      s.add("reader_served", static_cast<double>(live.counters.reader_served));
      s.add("prefetched_pages", static_cast<double>(live.counters.prefaulted_pages));
      s.add("prefetch_late", static_cast<double>(live.counters.prefetch_late));
    }
  };

  // On demand: every page once, one thread, timed per first access (as scenario 1).
  std::vector<uint64_t> page_sizes_here{kPageSize4K};
  if (huge) page_sizes_here.push_back(kPageSize2M);
  for (uint64_t ps : page_sizes_here) {
    for (auto order : {client::PageOrder::kSequential, client::PageOrder::kRandom}) {
      Row proto;
      proto.scenario = kImageScenario;
      proto.page_size = ps;
      proto.order = order == client::PageOrder::kSequential ? "seq" : "random";
      proto.guest_bytes = size;
      proto.pages = size / ps;
      proto.subject = subject.name + (ps == kPageSize2M ? " 2M " : " 4K ") + proto.order + " on demand";
      if (!wanted(proto.subject)) continue;
      progress("image: " + proto.subject);
      const auto offsets = client::select_pages(size / ps, ps, 1.0, order, 11);
      const std::vector<Backend> backends{Backend::kFaultline, Backend::kFaultlineImage, Backend::kFaultlineImageWarm};
      auto series = interleaved(backends, ctx.sizes.reps, [&](Series& s, int) {
        auto host = fresh_host(s.backend, ps, {});
        if (!host) return record_failure(s, host.error());
        if (s.backend == Backend::kFaultlineImageWarm && !warm_up(s, **host, ps, offsets)) return;
        {
          auto g = BenchGuest::create(s.backend, GuestSpec{size, ps, subject.path, host->get(), true});
          if (!g) return record_failure(s, g.error());
          TouchOutcome t = touch(**g, "host", offsets, 1, true, &*file);
          if (!t.error.empty()) return record_failure(s, Error{0, t.error});
          note_bad(ctx, t, s.backend, "image scenario " + proto.subject);
          s.add("faults_per_s", static_cast<double>(offsets.size()) / t.seconds);
          s.add("p50_us", percentile(t.latencies_ns, 50) / 1e3);
          s.add("p99_us", percentile(t.latencies_ns, 99) / 1e3);
          session_counters(**host, s);
        }
      });
      push_rows(ctx, proto, series, ctx.sizes.reps);
    }
  }

  // Working-set restore (as scenario 2, 4 KiB pages, one thread): record the
  // set with a recording session, create an image laid out by that record,
  // then restore on demand, with --prefetch RECORD and with --prefetch all,
  // from the raw file and from the images.
  const uint64_t pages = size / kPageSize4K;
  if (wanted(subject.name + " 4K working-set restore")) {
    auto working_set = working_set_of(subject, size);
    if (!working_set) return std::unexpected(working_set.error());
    const std::vector<uint64_t> set = std::move(*working_set);
    const std::string record = ctx.dir + "/image-" + subject.name + ".flrec";
    if (auto st = record_working_set(ctx, subject, set, *file, record, "image"); !st) return st;
    progress("image: creating the " + subject.name + " image with --working-set");
    if (auto st = create("base-ws", image::kSmallPage, record); !st) return st;
    Row proto;
    proto.scenario = kImageScenario;
    proto.guest_bytes = size;
    proto.pages = set.size();
    proto.order = subject.ws_path.empty() ? "random" : "recorded";
    proto.subject = subject.name + " 4K working-set restore";
    progress("image: " + proto.subject);
    const std::vector<Backend> backends{Backend::kFaultline,         Backend::kFaultlineImage,
                                        Backend::kFaultlinePrefetch, Backend::kFaultlineImagePrefetch,
                                        Backend::kFaultlineEager,    Backend::kFaultlineImageEager,
                                        Backend::kFaultlineImageWarm};
    auto series = interleaved(backends, ctx.sizes.reps, [&](Series& s, int) {
      FaultlineHost::Options o;
      if (s.backend == Backend::kFaultlinePrefetch || s.backend == Backend::kFaultlineImagePrefetch) o.prefetch_path = record;
      if (s.backend == Backend::kFaultlineEager || s.backend == Backend::kFaultlineImageEager) o.prefetch_all = true;
      auto host = fresh_host(s.backend, kPageSize4K, o);
      if (!host) return record_failure(s, host.error());
      if (s.backend == Backend::kFaultlineImageWarm && !warm_up(s, **host, kPageSize4K, set)) return;
      auto r = read_pages(ctx, s.backend, GuestSpec{size, kPageSize4K, subject.path, host->get(), false}, set, *file,
                          "image scenario " + proto.subject);
      if (!r) return record_failure(s, r.error());
      s.add("restore_ms", r->seconds * 1e3);
      session_counters(**host, s);
    });
    push_rows(ctx, proto, series, ctx.sizes.reps);
  }

  // Eager fill: --prefetch all until every page of the guest is resident
  // (mincore, polled every 2 ms, nothing touched), then every byte checked.
  if (wanted(subject.name + " 4K eager fill")) {
    Row proto;
    proto.scenario = kImageScenario;
    proto.guest_bytes = size;
    proto.pages = pages;
    proto.subject = subject.name + " 4K eager fill";
    progress("image: " + proto.subject);
    std::vector<uint64_t> all(pages);
    for (uint64_t p = 0; p < pages; ++p) all[p] = p * kPageSize4K;
    auto series = interleaved({Backend::kFaultlineEager, Backend::kFaultlineImageEager}, ctx.sizes.reps,
                              [&](Series& s, int) {
      FaultlineHost::Options o;
      o.prefetch_all = true;
      auto host = fresh_host(s.backend, kPageSize4K, o);
      if (!host) return record_failure(s, host.error());
      const int64_t t0 = now_ns();
      auto g = BenchGuest::create(s.backend, GuestSpec{size, kPageSize4K, subject.path, host->get(), false});
      if (!g) return record_failure(s, g.error());
      std::vector<unsigned char> vec;
      const int64_t deadline = t0 + int64_t{120} * 1'000'000'000;
      for (;;) {
        auto done = all_resident((*g)->base(), size, vec);
        if (!done) return record_failure(s, done.error());
        if (*done) break;
        if (now_ns() > deadline) return record_failure(s, Error{0, "the eager fill did not finish in 120 s"});
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      s.add("fill_ms", static_cast<double>(now_ns() - t0) / 1e6);
      s.add("fill_mb_s", static_cast<double>(size) / 1e6 / (static_cast<double>(now_ns() - t0) / 1e9));
      TouchOutcome t;
      t.bad_pages = count_bad_pages((*g)->base(), *file, all, kPageSize4K);
      note_bad(ctx, t, s.backend, "image scenario " + proto.subject);
      session_counters(**host, s);
    });
    push_rows(ctx, proto, series, ctx.sizes.reps);
  }
  return {};
}

// What first writing fresh anonymous memory costs here, per 4 KiB page: a
// frame cache fills memory it never used before with every frame it
// decompresses, which a raw-file server (page cache warm) never does.
double fresh_memory_us_per_page() {
  constexpr uint64_t kBytes = 64 * kMiB;
  auto m = Mapping::map(kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!m) return std::nan("");
  const int64_t t0 = now_ns();
  for (uint64_t off = 0; off < kBytes; off += kPageSize4K) m->bytes()[off] = 1;
  return static_cast<double>(now_ns() - t0) / 1e3 / static_cast<double>(kBytes / kPageSize4K);
}

}  // namespace

void run_image_scenario(Context& ctx) {
  std::vector<ImageSubject> subjects;
  const std::string generated = ctx.dir + "/image-generated.mem";
  std::fprintf(stderr, "image: writing a %llu MiB generated memory file...\n",
               static_cast<unsigned long long>(ctx.sizes.storage_bytes / kMiB));
  if (auto st = client::write_test_memory_file(generated, ctx.sizes.storage_bytes, kFileSeed, kZeroFraction); !st) {
    ctx.results->notes.push_back("image scenario: error: cannot write the generated file: " + st.error().describe());
  } else {
    subjects.push_back({"generated", generated, ""});
  }
  if (ctx.corpus_path.empty()) {
    Row row;
    row.scenario = kImageScenario;
    row.subject = "realistic";
    row.not_applicable = true;
    row.note = "error: no realistic corpus: " + ctx.corpus_error;
    ctx.results->rows.push_back(row);
  } else {
    subjects.push_back({"realistic", ctx.corpus_path, ctx.corpus_path + ".flws"});
  }
  for (const ImageSubject& subject : subjects) {
    const double fresh_before = fresh_memory_us_per_page();
    const size_t first_row = measure_subject(ctx, kImageScenario, subject, measure_image_serving);
    for (size_t i = first_row; i < ctx.results->rows.size(); ++i) {
      const bool huge_row = ctx.results->rows[i].page_size == kPageSize2M;
      const uint32_t frame_pages = huge_row ? image::default_frame_pages(image::kHugePage)
                                   : ctx.image_frame_pages != 0 ? ctx.image_frame_pages
                                                                : image::default_frame_pages(image::kSmallPage);
      ctx.results->rows[i].metrics.emplace_back("image_frame_bytes",
                                                static_cast<double>(frame_pages) * static_cast<double>(ctx.results->rows[i].page_size));
      ctx.results->rows[i].metrics.emplace_back("fresh_memory_us_per_page", fresh_before);
    }
    std::error_code ec;
    std::filesystem::remove_all(ctx.dir + "/image-" + subject.name + "-store", ec);
    std::filesystem::remove(ctx.dir + "/image-" + subject.name + ".flrec", ec);
  }
  std::error_code ec;
  std::filesystem::remove(generated, ec);
}

// --- the store scenario: the image served from an object store -------------

namespace {

// A single-node Ceph cluster with its RADOS Gateway on 127.0.0.1
// (scripts/rgw.sh), its S3 settings put in this process's environment;
// stopped when destroyed.
class Gateway {
 public:
  static Result<std::unique_ptr<Gateway>> start(const std::string& dir) {
    if (std::system("command -v ceph-mon >/dev/null 2>&1 && command -v radosgw >/dev/null 2>&1") != 0) {
      return fail("Ceph is not installed (scripts/install-deps.sh installs ceph-mon, ceph-osd and radosgw)",
                  kNotApplicable);
    }
    std::unique_ptr<Gateway> g(new Gateway(dir));
    // rgw.sh exits 3 when another process took the port first.
    for (int attempt = 0; attempt < 4 && !g->started_; ++attempt) {
      const std::string cmd = "RGW_OWNER_PID=" + std::to_string(::getpid()) + " bash " + FAULTLINE_SOURCE_DIR +
                              "/scripts/rgw.sh start " + dir + " " +
                              std::to_string(free_port_pair()) + " >" + dir + ".log 2>&1";
      const int status = std::system(cmd.c_str());
      g->started_ = status == 0;
      if (!g->started_ && !(WIFEXITED(status) && WEXITSTATUS(status) == 3)) {
        return fail("scripts/rgw.sh start failed (its output: " + dir + ".log)");
      }
    }
    if (!g->started_) return fail("scripts/rgw.sh found no free port");
    std::ifstream env(dir + "/env");  // "export NAME=VALUE" lines
    for (std::string line; std::getline(env, line);) {
      const auto eq = line.find('=');
      if (line.rfind("export ", 0) != 0 || eq == std::string::npos) continue;
      ::setenv(line.substr(7, eq - 7).c_str(), line.substr(eq + 1).c_str(), 1);
    }
    return g;
  }
  // CPU seconds (user + system) the cluster's daemons (mon, OSD, gateway)
  // have used since they started: the store's share of a restore on this
  // machine, where it runs on the same cores as the daemon and the guest.
  double cpu_seconds() const {
    static const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
    double total = 0;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
      if (entry.path().extension() != ".pid") continue;
      int pid = 0;
      std::ifstream(entry.path()) >> pid;
      std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
      std::string line;
      if (pid <= 0 || !std::getline(stat, line)) continue;
      // Fields after the command name, which may hold spaces: state is field
      // 3, utime and stime are fields 14 and 15.
      std::istringstream rest(line.substr(line.rfind(')') + 2));
      std::string field;
      double utime = 0, stime = 0;
      for (int i = 3; i <= 15 && rest >> field; ++i) {
        if (i == 14) utime = std::stod(field);
        if (i == 15) stime = std::stod(field);
      }
      total += (utime + stime) / ticks;
    }
    return total;
  }
  ~Gateway() {
    if (!started_) return;
    const std::string cmd = std::string("bash ") + FAULTLINE_SOURCE_DIR + "/scripts/rgw.sh stop " + dir_ + " >/dev/null 2>&1";
    (void)!std::system(cmd.c_str());
  }

 private:
  explicit Gateway(std::string dir) : dir_(std::move(dir)) {}
  // A port nothing listens on, with the next one free too (the mon's), below
  // the kernel's ephemeral range.
  static int free_port_pair() {
    int low = 32768;
    std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low;
    std::mt19937 rng(std::random_device{}());
    for (int attempt = 0; attempt < 200; ++attempt) {
      const int port = 10000 + static_cast<int>(rng() % static_cast<unsigned>(std::max(low - 10002, 1000) / 2)) * 2;
      bool free = true;
      for (int p : {port, port + 1}) {
        UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = htons(static_cast<uint16_t>(p));
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) free = false;
      }
      if (free) return port;
    }
    return 7480;
  }
  std::string dir_;
  bool started_ = false;
};

// The working-set restore of `subject` from its image in the bucket (cold
// and warm disk cache), from the same image on local disk and from the raw
// file, interleaved, every byte read compared with the file.
Status measure_store_serving(Context& ctx, const ImageSubject& subject, const Gateway& gateway) {
  warm_page_cache(subject.path);
  auto file = Mapping::map_file(subject.path);
  if (!file) return std::unexpected(file.error());
  const uint64_t size = file->size();
  if (size == 0 || size % kPageSize4K != 0) return fail(subject.path + ": not a whole number of 4 KiB pages", EINVAL);
  auto working_set = working_set_of(subject, size);
  if (!working_set) return std::unexpected(working_set.error());
  const std::vector<uint64_t> set = std::move(*working_set);
  // The set as a restore records it (serve --record), then the image laid
  // out by that record (image create --working-set), pushed to the bucket.
  const std::string record = ctx.dir + "/store-" + subject.name + ".flrec";
  if (auto st = record_working_set(ctx, subject, set, *file, record, "store"); !st) return st;
  progress("store: creating the " + subject.name + " image with --working-set and pushing it to the gateway");
  const std::string store_dir = ctx.dir + "/store-" + subject.name + "-local";
  auto local = image::LocalStore::open(store_dir, true);
  if (!local) return std::unexpected(local.error());
  image::CreateOptions co;
  co.memory_path = subject.path;
  co.name = "base-ws";
  co.working_set_path = record;
  if (ctx.image_frame_pages != 0) co.frame_pages = ctx.image_frame_pages;
  auto created = image::create_image(**local, co);
  if (!created) return fail("image create: " + created.error().describe(), created.error().code);
  const std::string bucket_url = "s3://fl-bench/" + subject.name;
  {
    auto bucket = objstore::open_store(bucket_url, /*create=*/true);
    if (!bucket) return fail(bucket_url + ": " + bucket.error().describe(), bucket.error().code);
    auto pushed = image::copy_image(**local, **bucket, "base-ws", {});
    if (!pushed) return fail("push: " + pushed.error().describe(), pushed.error().code);
  }
  // What the working set weighs compressed: its pages at the image's
  // compression ratio (the denominator of the read amplification).
  const double ws_compressed_bytes =
      created->stored_pages == 0
          ? std::nan("")
          : static_cast<double>(set.size()) * static_cast<double>(created->stored_bytes) /
                static_cast<double>(created->stored_pages);

  const std::string warm_cache = ctx.dir + "/store-" + subject.name + "-cache-warm";
  int seq = 0;
  auto host_for = [&](Backend b) {
    FaultlineHost::Options o;
    o.prefetch_path = record;
    if (b == Backend::kFaultlineImagePrefetch) o.image_path = store_dir + "/base-ws";
    if (b == Backend::kFaultlineStoreCold || b == Backend::kFaultlineStoreWarm) {
      o.image_path = bucket_url + "/base-ws";
      o.cache_dir = b == Backend::kFaultlineStoreWarm ? warm_cache : ctx.dir + "/store-cache-cold";
    }
    return start_host(ctx, subject.path, "st-" + std::to_string(seq++ % 4), o);
  };
  // The warm disk cache: one untimed restore through a daemon that has since
  // stopped (every set page checked).
  {
    auto host = host_for(Backend::kFaultlineStoreWarm);
    if (!host) return fail("warming the disk cache: " + host.error().describe());
    auto r =
        read_pages(ctx, Backend::kFaultlineStoreWarm, GuestSpec{size, kPageSize4K, subject.path, host->get(), false},
                   set, *file, "the store scenario's warm-up (" + subject.name + ")");
    if (!r) return fail("warming the disk cache: " + r.error().describe());
  }

  Row proto;
  proto.scenario = kStoreScenario;
  proto.guest_bytes = size;
  proto.pages = set.size();
  proto.order = subject.ws_path.empty() ? "random" : "recorded";
  proto.subject = subject.name + " 4K working-set restore";
  progress("store: " + proto.subject);
  const std::vector<Backend> backends{Backend::kFaultlinePrefetch, Backend::kFaultlineImagePrefetch,
                                      Backend::kFaultlineStoreCold, Backend::kFaultlineStoreWarm};
  auto series = interleaved(backends, ctx.sizes.reps, [&](Series& s, int) {
    std::error_code ec;
    std::filesystem::remove_all(ctx.dir + "/store-cache-cold", ec);  // cold: nothing kept from the last run
    const auto before = objstore::S3Client::process_totals();
    const double store_cpu_before = gateway.cpu_seconds();
    const double own_cpu_before = own_cpu_seconds();
    const double machine_before = machine_busy_seconds();
    const int64_t cpu_window_start = now_ns();
    {
      // A fresh daemon each time: its frame cache starts empty. Opening the
      // image (its manifests, from the bucket for the store rows) is the
      // daemon's start-up and not timed: a restore starts at the handshake.
      auto host = host_for(s.backend);
      if (!host) return record_failure(s, host.error());
      auto r = read_pages(ctx, s.backend, GuestSpec{size, kPageSize4K, subject.path, host->get(), false}, set, *file,
                          "store scenario " + proto.subject);
      if (!r) return record_failure(s, r.error());
      s.add("restore_ms", r->seconds * 1e3);
      for (const SessionSummary& live : (*host)->server().live_sessions()) {
        s.add("demand_faults", static_cast<double>(live.counters.faults));
        s.add("prefetched_pages", static_cast<double>(live.counters.prefaulted_pages));
      }
    }  // the guest, then the daemon, gone: every fetch the restore caused is counted
    const auto after = objstore::S3Client::process_totals();
    // Where the restore's CPU went: this process (the daemon, its S3 client
    // and the touching thread) and the store's daemons, against the 2 cores.
    s.add("own_cpu_ms", (own_cpu_seconds() - own_cpu_before) * 1e3);
    s.add("store_cpu_ms", (gateway.cpu_seconds() - store_cpu_before) * 1e3);
    // And how busy the whole machine was meanwhile (other work included).
    const double cpu_window_s = static_cast<double>(now_ns() - cpu_window_start) / 1e9;
    s.add("machine_busy_pct", (machine_busy_seconds() - machine_before) / (cpu_window_s * core_count()) * 100);
    if (s.backend == Backend::kFaultlineStoreCold || s.backend == Backend::kFaultlineStoreWarm) {
      const double fetched = static_cast<double>(after.get_body_bytes - before.get_body_bytes);
      s.add("gets", static_cast<double>(after.gets - before.gets));
      s.add("fetched_mb", fetched / 1e6);
      s.add("read_amplification", fetched / ws_compressed_bytes);
      s.add("retries", static_cast<double>(after.retries - before.retries));
    }
  });
  push_rows(ctx, proto, series, ctx.sizes.reps);
  const size_t first = ctx.results->rows.size() - series.size();
  for (size_t i = first; i < ctx.results->rows.size(); ++i) {
    ctx.results->rows[i].metrics.emplace_back("ws_compressed_mb", ws_compressed_bytes / 1e6);
    ctx.results->rows[i].metrics.emplace_back("image_stored_mb", static_cast<double>(created->stored_bytes) / 1e6);
  }
  std::error_code ec;
  std::filesystem::remove_all(store_dir, ec);
  std::filesystem::remove_all(warm_cache, ec);
  std::filesystem::remove_all(ctx.dir + "/store-cache-cold", ec);
  std::filesystem::remove(record, ec);
  return {};
}

}  // namespace

void run_store_scenario(Context& ctx) {
  auto gateway = Gateway::start(ctx.dir + "/rgw");
  if (!gateway) {
    Row row;
    row.scenario = kStoreScenario;
    row.subject = "object store";
    row.not_applicable = true;
    row.note = (gateway.error().code == kNotApplicable ? "" : "error: ") + gateway.error().message;
    ctx.results->rows.push_back(row);
    return;
  }
  std::vector<ImageSubject> subjects;
  const std::string generated = ctx.dir + "/store-generated.mem";
  std::fprintf(stderr, "store: writing a %llu MiB generated memory file...\n",
               static_cast<unsigned long long>(ctx.sizes.store_generated_bytes / kMiB));
  if (auto st = client::write_test_memory_file(generated, ctx.sizes.store_generated_bytes, kFileSeed, kZeroFraction);
      !st) {
    ctx.results->notes.push_back("store scenario: error: cannot write the generated file: " + st.error().describe());
  } else {
    subjects.push_back({"generated", generated, ""});
  }
  if (!ctx.corpus_path.empty()) subjects.push_back({"realistic", ctx.corpus_path, ctx.corpus_path + ".flws"});
  for (const ImageSubject& subject : subjects) {
    measure_subject(ctx, kStoreScenario, subject, [&](Context& c, const ImageSubject& s) {
      return measure_store_serving(c, s, **gateway);
    });
  }
  std::error_code ec;
  std::filesystem::remove(generated, ec);
}

}  // namespace faultline::bench
