#include "bench/trace_replay.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include "bench/stats.h"
#include "bench/trace.h"
#include "client/test_memory_file.h"
#include "common/mapping.h"
#include "common/unique_fd.h"

namespace faultline::bench {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const std::vector<Backend> kBackends{Backend::kFileMmap,          Backend::kNaive,     Backend::kFaultlineNoFaultAround,
                                     Backend::kFaultline,            Backend::kFaultlineReadahead,
                                     Backend::kFaultlinePrefetch};

struct NamedTrace {
  std::string name;         // the row subject: "generated 1 vCPU", "random 1 vCPU", "FILE 2 vCPU"
  std::string record_path;  // the trace as a working-set file (what fl-prefetch replays)
  bool random_access = false;
  Trace trace;
};

struct ReplayOutcome {
  double seconds = 0;          // first stream's start to last stream's end
  uint64_t thread_faults = 0;  // minor + major faults the touching threads took
};

// One thread per stream, started together; each reads one byte of every
// page of its stream, in order. Reads only: a real guest also writes, but a
// read is the File backend's best case (a write to a MAP_PRIVATE file
// mapping copies the page, one fault per page, no fault-around), so the
// comparison is the strictest for faultline.
ReplayOutcome replay(const uint8_t* base, const Trace& trace) {
  const size_t n = trace.streams.size();
  std::vector<int64_t> start(n), end(n);
  std::vector<uint64_t> faults(n);
  std::barrier sync(static_cast<ptrdiff_t>(n));
  {
    std::vector<std::jthread> pool;
    for (size_t s = 0; s < n; ++s) {
      pool.emplace_back([&, s] {
        const std::vector<uint64_t>& pages = trace.streams[s];
        rusage before{}, after{};
        ::getrusage(RUSAGE_THREAD, &before);
        sync.arrive_and_wait();
        start[s] = now_ns();
        uint8_t sink = 0;
        for (uint64_t off : pages) sink ^= *reinterpret_cast<volatile const uint8_t*>(base + off);
        end[s] = now_ns();
        asm volatile("" ::"r"(sink));
        ::getrusage(RUSAGE_THREAD, &after);
        faults[s] = static_cast<uint64_t>((after.ru_minflt - before.ru_minflt) + (after.ru_majflt - before.ru_majflt));
      });
    }
  }
  ReplayOutcome out;
  out.seconds = static_cast<double>(*std::max_element(end.begin(), end.end()) -
                                    *std::min_element(start.begin(), start.end())) / 1e9;
  for (uint64_t f : faults) out.thread_faults += f;
  return out;
}

// What this process's page tables say about the guest after a replay.
struct Residency {
  uint64_t present = 0;          // pages present (pagemap bit 63)
  uint64_t outside_trace = 0;    // present but not in the trace: installed and never touched
  uint64_t trace_missing = 0;    // in the trace but not present (touched, yet not mapped: must be 0)
  std::vector<uint64_t> checked;  // offsets of every trace page and every present page, for the byte check
};

// /proc/self/pagemap: one 64-bit entry per virtual page of this process, bit
// 63 set while the page is present in RAM (a page installed by UFFDIO_COPY
// or UFFDIO_ZEROPAGE, or a page-cache page the File backend mapped).
Result<Residency> read_residency(const uint8_t* base, uint64_t bytes, const std::vector<uint8_t>& in_trace) {
  UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open /proc/self/pagemap");
  const uint64_t pages = bytes / kTracePage;
  std::vector<uint64_t> entries(pages);
  const off_t at = static_cast<off_t>(reinterpret_cast<uint64_t>(base) / kTracePage * sizeof(uint64_t));
  const size_t want = pages * sizeof(uint64_t);
  size_t got = 0;
  while (got < want) {
    const ssize_t r = ::pread(fd.get(), reinterpret_cast<char*>(entries.data()) + got, want - got,
                              at + static_cast<off_t>(got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r < 0 ? fail_errno("cannot read /proc/self/pagemap") : fail("/proc/self/pagemap ended early");
    got += static_cast<size_t>(r);
  }
  Residency res;
  for (uint64_t p = 0; p < pages; ++p) {
    const bool present = (entries[p] >> 63) & 1;
    if (present) ++res.present;
    if (present && !in_trace[p]) ++res.outside_trace;
    if (!present && in_trace[p]) ++res.trace_missing;
    if (present || in_trace[p]) res.checked.push_back(p * kTracePage);
  }
  return res;
}

void add_shape_metrics(Row& row, const TraceShape& s) {
  row.metrics.emplace_back("trace_next_page_share", s.next_page_share);
  row.metrics.emplace_back("trace_block_use", s.block_use);
  row.metrics.emplace_back("trace_full_block_share", s.full_block_share);
  row.metrics.emplace_back("trace_backward_jump_share", s.backward_jump_share);
  row.metrics.emplace_back("trace_runs", static_cast<double>(s.runs));
  row.metrics.emplace_back("trace_mean_run_pages", s.mean_run_pages);
  row.metrics.emplace_back("trace_longest_run_pages", static_cast<double>(s.longest_run_pages));
  row.metrics.emplace_back("trace_single_page_run_share", s.single_page_run_share);
}

void replay_trace(Context& ctx, const NamedTrace& nt, const std::string& memory_path, const Mapping& file) {
  const Trace& trace = nt.trace;
  const uint64_t bytes = trace.guest_bytes;
  std::vector<uint8_t> in_trace(bytes / kTracePage);
  for (const auto& s : trace.streams) {
    for (uint64_t off : s) in_trace[off / kTracePage] = 1;
  }

  // One server per faultline configuration, for every repetition of this
  // trace (sessions run one at a time: a guest waits for its session's end).
  std::map<Backend, std::unique_ptr<FaultlineHost>> hosts;
  std::map<Backend, std::string> host_errors;
  for (Backend b : {Backend::kFaultlineNoFaultAround, Backend::kFaultline, Backend::kFaultlineReadahead,
                    Backend::kFaultlinePrefetch}) {
    FaultlineHost::Options o;
    if (b == Backend::kFaultlineReadahead) o.fault_around_readahead = true;
    if (b == Backend::kFaultlinePrefetch) o.prefetch_path = nt.record_path;
    auto h = start_host(ctx, memory_path, std::string("trace-") + label(b), o, b != Backend::kFaultlineNoFaultAround);
    if (h) {
      hosts[b] = std::move(*h);
    } else {
      host_errors[b] = "error: " + h.error().describe();
    }
  }

  struct Series {
    Backend backend;
    std::map<std::string, std::vector<double>> values;
    bool not_applicable = false;
    std::string note;
  };
  std::vector<Series> series;
  for (Backend b : kBackends) series.push_back(Series{b, {}, false, host_errors.count(b) ? host_errors[b] : ""});

  for (int rep = 0; rep < ctx.sizes.reps; ++rep) {
    // The backend order rotates each repetition (as in the other scenarios):
    // on a shared, noisy machine no backend always runs first.
    for (size_t k = 0; k < series.size(); ++k) {
      Series& s = series[(k + static_cast<size_t>(rep)) % series.size()];
      if (s.not_applicable || !s.note.empty()) continue;
      auto add = [&](const std::string& key, double v) { s.values[key].push_back(v); };
      auto failed = [&](const Error& e) {
        s.not_applicable = e.code == kNotApplicable;
        s.note = s.not_applicable ? e.message : "error: " + e.describe();
      };
      FaultlineHost* host = hosts.count(s.backend) ? hosts[s.backend].get() : nullptr;
      // A baseline server process is started (listening) before the clock,
      // as Firecracker's uffd handler is before the snapshot load.
      std::unique_ptr<BaselineProcess> baseline;
      if (is_baseline_server(s.backend)) {
        auto b = BaselineProcess::start(baseline_mode(s.backend), memory_path, ctx.dir + "/baseline.sock");
        if (!b) {
          failed(b.error());
          continue;
        }
        baseline = std::move(*b);
      }
      const int64_t t0 = now_ns();
      auto g = BenchGuest::create(s.backend, GuestSpec{bytes, kTracePage, memory_path, host, false, baseline.get()});
      if (!g) {
        failed(g.error());
        continue;
      }
      const double setup = static_cast<double>(now_ns() - t0) / 1e9;
      const ReplayOutcome r = replay((*g)->base(), trace);
      // Outside the timed region: what is mapped now, and every byte of it.
      auto res = read_residency((*g)->base(), bytes, in_trace);
      if (!res) {
        failed(res.error());
        continue;
      }
      uint64_t bad = 0;
      for (uint64_t off : res->checked) {
        if (std::memcmp((*g)->base() + off, file.bytes() + off, kTracePage) != 0) ++bad;
      }
      g->reset();  // a faultline guest waits here for its session's end
      uint64_t baseline_faults = 0;
      if (baseline) {  // the guest is gone: the baseline server exits and reports
        auto stats = baseline->wait_exit(std::chrono::seconds(30));
        if (!stats) {
          failed(stats.error());
          continue;
        }
        baseline_faults = stats->faults;
      }
      if (bad > 0) {
        ctx.results->data_mismatches += bad;
        ctx.results->notes.push_back(std::string("DATA MISMATCH: ") + label(s.backend) + " served " +
                                     std::to_string(bad) + " pages with wrong content in the trace replay of " +
                                     nt.name);
      }
      if (res->trace_missing > 0) {
        failed(Error{0, std::to_string(res->trace_missing) + " touched pages are not present after the replay"});
        continue;
      }
      add("restore_ms", (setup + r.seconds) * 1e3);
      add("thread_faults", static_cast<double>(r.thread_faults));
      add("present_pages", static_cast<double>(res->present));
      add("untouched_present_pages", static_cast<double>(res->outside_trace));
      add("untouched_present_share", static_cast<double>(res->outside_trace) / static_cast<double>(res->present));
      if (baseline) add("server_faults", static_cast<double>(baseline_faults));
      if (host != nullptr) {
        const auto finished = host->server().finished_sessions();
        if (finished.empty()) {
          failed(Error{0, "faultline has no finished session to read counters from"});
          continue;
        }
        const SessionCounters& c = finished.back().counters;
        add("server_faults", static_cast<double>(c.faults));
        add("prefetched_pages", static_cast<double>(c.prefaulted_pages));
        add("ahead_pages", static_cast<double>(c.ahead_pages));
        add("ahead_faulted", static_cast<double>(c.ahead_faulted));
      }
    }
  }

  const TraceShape shape = measure_shape(trace);
  for (const Series& s : series) {
    Row row;
    row.scenario = kTraceScenario;
    row.subject = nt.name;
    row.order = nt.random_access ? "random" : "trace";
    row.threads = static_cast<int>(trace.streams.size());
    row.backend = s.backend;
    row.guest_bytes = bytes;
    row.pages = trace.pages();
    row.reps = ctx.sizes.reps;
    row.not_applicable = s.not_applicable;
    row.note = s.note;
    for (const auto& [k, v] : s.values) row.metrics.emplace_back(k, median(v));
    add_shape_metrics(row, shape);
    ctx.results->rows.push_back(std::move(row));
  }
}

void error_row(Context& ctx, const std::string& subject, const std::string& why) {
  Row row;
  row.scenario = kTraceScenario;
  row.subject = subject;
  row.not_applicable = true;
  row.note = "error: " + why;
  ctx.results->rows.push_back(row);
}

// The memory file a trace replays over: generated (client/test_memory_file.h,
// the seed and zero share of the other scenarios), its page cache warmed.
Status make_memory_file(const std::string& path, uint64_t bytes) {
  if (std::filesystem::exists(path)) return {};
  std::fprintf(stderr, "trace: writing a %llu MiB memory file...\n", static_cast<unsigned long long>(bytes / kMiB));
  if (auto st = client::write_test_memory_file(path, bytes, kFileSeed, kZeroFraction); !st) return st;
  warm_page_cache(path);
  return {};
}

}  // namespace

void run_trace_scenario(Context& ctx, const TraceScenarioOptions& options) {
  std::vector<NamedTrace> traces;
  struct Generated {
    const char* name;
    int streams;
    bool random;
    uint64_t seed;
  };
  for (const Generated& gen : {Generated{"generated 1 vCPU", 1, false, 1}, Generated{"generated 2 vCPU", 2, false, 2},
                               Generated{"random 1 vCPU", 1, true, 3}}) {
    TraceOptions o;
    o.guest_bytes = options.guest_bytes;
    o.streams = gen.streams;
    o.random_access = gen.random;
    o.seed = gen.seed;
    auto t = generate_trace(o);
    if (!t) {
      error_row(ctx, gen.name, t.error().describe());
      continue;
    }
    const std::string path = ctx.dir + "/trace-" + std::to_string(traces.size()) + ".flws";
    if (auto st = write_trace(path, *t); !st) {
      error_row(ctx, gen.name, st.error().describe());
      continue;
    }
    traces.push_back({gen.name, path, gen.random, std::move(*t)});
  }
  for (const std::string& path : options.trace_paths) {
    const std::string name = std::filesystem::path(path).filename().string() + " " +
                             std::to_string(options.trace_streams) + " vCPU";
    auto t = read_trace(path, options.trace_streams);
    if (!t) {
      error_row(ctx, name, t.error().describe());
      continue;
    }
    traces.push_back({name, path, false, std::move(*t)});
  }

  for (const NamedTrace& nt : traces) {
    const std::string memory_path = ctx.dir + "/trace-" + std::to_string(nt.trace.guest_bytes) + ".mem";
    if (auto st = make_memory_file(memory_path, nt.trace.guest_bytes); !st) {
      error_row(ctx, nt.name, "cannot write the memory file: " + st.error().describe());
      continue;
    }
    warm_page_cache(memory_path);
    auto file = Mapping::map_file(memory_path);
    if (!file) {
      error_row(ctx, nt.name, "cannot map the memory file: " + file.error().describe());
      continue;
    }
    std::fprintf(stderr, "  trace: %s\n", nt.name.c_str());
    replay_trace(ctx, nt, memory_path, *file);
  }
}

// --- report -----------------------------------------------------------------

namespace {

std::string num(double v, int precision) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

const Row* trace_row(const Results& r, const std::string& subject, Backend b) {
  for (const Row& row : r.rows) {
    if (row.scenario == kTraceScenario && row.subject == subject && row.backend == b) return &row;
  }
  return nullptr;
}

double trace_metric(const Results& r, const std::string& subject, Backend b, const std::string& key) {
  const Row* row = trace_row(r, subject, b);
  return row && !row->not_applicable && row->note.empty() ? row->metric(key) : std::nan("");
}

std::vector<std::string> subjects(const Results& r) {
  std::vector<std::string> out;
  for (const Row& row : r.rows) {
    if (row.scenario == kTraceScenario && std::find(out.begin(), out.end(), row.subject) == out.end()) {
      out.push_back(row.subject);
    }
  }
  return out;
}

}  // namespace

void print_trace_report(const Results& r) {
  const auto names = subjects(r);
  if (names.empty()) return;
  const std::string title = "Trace replay: first-touch traces replayed, one thread per stream (vCPU)";
  std::printf("\n%s\n%s\n", title.c_str(), std::string(title.size(), '=').c_str());
  std::printf("each thread reads one byte of every page of its stream, in order; restore = guest mapping/handshake "
              "until every stream is done\n");
  std::printf("faultline = on demand with fault-around (the default 64 pages); fl+ra = the same with readahead "
              "(--fault-around-readahead on);\nfl-no-fa = fault_around_pages 1; fl-prefetch = --prefetch of the trace "
              "itself\n");
  std::printf("faults: taken by the touching threads (getrusage) / read by the server; ahead: pages fault-around "
              "installed ahead of a fault;\npresent: guest pages "
              "present after the replay (pagemap),\nuntouched: present but not in the trace (installed and never "
              "touched), waste = untouched / present\n");
  for (const std::string& name : names) {
    const Row* any = nullptr;
    for (const Row& row : r.rows) {
      if (row.scenario == kTraceScenario && row.subject == name) any = any ? any : &row;
    }
    TraceShape s;
    s.pages = any->pages;
    s.next_page_share = any->metric("trace_next_page_share");
    s.block_use = any->metric("trace_block_use");
    s.full_block_share = any->metric("trace_full_block_share");
    s.backward_jump_share = any->metric("trace_backward_jump_share");
    s.runs = static_cast<uint64_t>(std::max(0.0, any->metric("trace_runs")));
    s.mean_run_pages = any->metric("trace_mean_run_pages");
    s.longest_run_pages = static_cast<uint64_t>(std::max(0.0, any->metric("trace_longest_run_pages")));
    s.single_page_run_share = any->metric("trace_single_page_run_share");
    if (std::isnan(s.next_page_share)) {  // the trace could not be made or read
      std::printf("\n%s: %s\n", name.c_str(), any->note.c_str());
      continue;
    }
    std::printf("\n%s (%llu MiB guest): ", name.c_str(), static_cast<unsigned long long>(any->guest_bytes / kMiB));
    std::printf("%s\n", describe_shape(s).c_str());
    std::printf("%-12s %10s %8s %8s %9s %9s %9s %9s %9s %7s %s\n", "backend", "restore ms", "/file", "no-fa/x",
                "th faults", "srv flts", "ahead", "present", "untouched", "waste", "note");
    const double file_ms = trace_metric(r, name, Backend::kFileMmap, "restore_ms");
    const double nofa_ms = trace_metric(r, name, Backend::kFaultlineNoFaultAround, "restore_ms");
    for (const Row& row : r.rows) {
      if (row.scenario != kTraceScenario || row.subject != name) continue;
      const double ms = row.metric("restore_ms");
      std::printf("%-12s %10s %8s %8s %9s %9s %9s %9s %9s %6s%% %s\n", label(row.backend), num(ms, 1).c_str(),
                  num(ms / file_ms, 2).c_str(), num(nofa_ms / ms, 2).c_str(),
                  num(row.metric("thread_faults"), 0).c_str(), num(row.metric("server_faults"), 0).c_str(),
                  num(row.metric("ahead_pages"), 0).c_str(),
                  num(row.metric("present_pages"), 0).c_str(), num(row.metric("untouched_present_pages"), 0).c_str(),
                  num(100 * row.metric("untouched_present_share"), 1).c_str(), row.note.c_str());
    }
  }
}

void add_trace_targets(const Results& r, std::vector<Target>& out) {
  auto ratio_target = [&](const std::string& name, double num_v, double den_v, const std::string& text,
                          bool higher_is_met, double bound, const std::string& why_missing, bool percent = false) {
    Target t;
    t.name = name;
    t.ratio = num_v / den_v;
    if (std::isnan(t.ratio)) {
      t.measured = why_missing;
    } else {
      t.measured = text + " = " + (percent ? num(100 * t.ratio, 1) + " %" : num(t.ratio, 2) + "x");
      t.met = higher_is_met ? t.ratio >= bound : t.ratio <= bound;
    }
    out.push_back(std::move(t));
  };
  bool any = false;
  for (const std::string& name : subjects(r)) {
    const Row* fl = trace_row(r, name, Backend::kFaultline);
    if (fl == nullptr || fl->order == "random") continue;
    any = true;
    const std::string missing = fl->note.empty() ? "a row is missing (see the table)" : "faultline: " + fl->note;
    const double ms = trace_metric(r, name, Backend::kFaultline, "restore_ms");
    const double file = trace_metric(r, name, Backend::kFileMmap, "restore_ms");
    const double nofa = trace_metric(r, name, Backend::kFaultlineNoFaultAround, "restore_ms");
    ratio_target("trace (" + name + "): on-demand restore with fault-around <= 1.5x (b) file mmap", ms, file,
                 "faultline " + num(ms, 1) + " ms / file-mmap " + num(file, 1) + " ms", false, 1.5, missing);
    ratio_target("trace (" + name + "): fault-around >= 4x faster than faultline without it", nofa, ms,
                 "fl-no-fa " + num(nofa, 1) + " ms / faultline " + num(ms, 1) + " ms", true, 4.0, missing);
    const double untouched = trace_metric(r, name, Backend::kFaultline, "untouched_present_pages");
    const double present = trace_metric(r, name, Backend::kFaultline, "present_pages");
    ratio_target("trace (" + name + "): pages installed ahead and never touched <= 10 % of installed pages",
                 untouched, present,
                 "pagemap: " + num(untouched, 0) + " present pages outside the trace / " + num(present, 0) +
                     " present",
                 false, 0.10, missing, true);
  }
  if (!any) {
    Target t;
    t.name = "trace replay: fault-around against (b) file mmap and faultline without it; waste <= 10 %";
    t.ratio = std::nan("");
    t.measured = "trace scenario not run";
    out.push_back(std::move(t));
  }
}

}  // namespace faultline::bench
