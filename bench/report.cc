#include "bench/report.h"

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "bench/load.h"
#include "bench/stats.h"
#include "bench/storage.h"
#include "bench/trace_replay.h"

namespace faultline::bench {

namespace {

std::string num(double v, int precision = 1) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

std::string human_bytes(double b) {
  if (std::isnan(b)) return "-";
  const char* unit[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  double v = b;
  while (std::fabs(v) >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, unit[u]);
  return buf;
}

const Row* find(const Results& r, int scenario, const std::string& config, Backend b) {
  for (const Row& row : r.rows) {
    if (row.scenario == scenario && row.config() == config && row.backend == b) return &row;
  }
  return nullptr;
}

double metric_of(const Results& r, int scenario, const std::string& config, Backend b, const std::string& key) {
  const Row* row = find(r, scenario, config, b);
  return row && !row->not_applicable ? row->metric(key) : std::nan("");
}

std::string status_text(const Row& row) {
  if (row.not_applicable) return row.note.empty() ? "n/a" : row.note;
  return row.note;
}

void heading(const std::string& title) { std::printf("\n%s\n%s\n", title.c_str(), std::string(title.size(), '=').c_str()); }

// Scenario 1: the configuration without its load condition ("4K host 1T random").
std::string s1_base_config(const Row& row) {
  std::string c = row.config();
  if (!row.load.empty()) c.resize(c.size() - row.load.size() - 1);
  return c;
}

// Median over scenario 1's loaded rows of `key` (NaN if none).
double s1_loaded_median(const Results& r, const std::string& key) {
  std::vector<double> v;
  for (const Row& row : r.rows) {
    if (row.scenario == 1 && row.load == "loaded") v.push_back(row.metric(key));
  }
  return median(v);
}
double s1_load_threads(const Results& r) { return s1_loaded_median(r, "load_threads"); }
double s1_generated_load(const Results& r) { return s1_loaded_median(r, "load_cores"); }

// The image scenario: the raw-file backend an image backend is compared with.
Backend raw_counterpart(Backend b) {
  switch (b) {
    case Backend::kFaultlineImage:
    case Backend::kFaultlineImageWarm: return Backend::kFaultline;
    case Backend::kFaultlineImagePrefetch: return Backend::kFaultlinePrefetch;
    case Backend::kFaultlineImageEager: return Backend::kFaultlineEager;
    default: return b;
  }
}

// The figure a row of the image scenario is judged by.
std::string image_row_key(const Row& row) {
  if (!std::isnan(row.metric("fill_ms"))) return "fill_ms";
  if (!std::isnan(row.metric("restore_ms"))) return "restore_ms";
  return "p50_us";
}

// Issue 11's targets: the working-set restore from the bucket against the
// same image on local disk, and the bytes fetched against the set.
void add_store_targets(const Results& r, std::vector<Target>& out) {
  for (const Row& row : r.rows) {
    if (row.scenario != kStoreScenario || row.not_applicable) continue;
    auto load = [&] {
      return " (load average " + num(row.metric("load1_before"), 2) + " -> " + num(row.metric("load1_after"), 2) +
             ", " + num(row.metric("cores"), 0) + " cores)";
    };
    auto against_local = [&](const std::string& name, double bound) {
      Target t;
      t.name = name;
      const double mine = row.metric("restore_ms");
      const double local = metric_of(r, kStoreScenario, row.config(), Backend::kFaultlineImagePrefetch, "restore_ms");
      t.ratio = mine / local;
      if (std::isnan(t.ratio)) {
        t.measured = "not measured: " + (row.note.empty() ? std::string("a row is missing") : row.note);
      } else {
        t.measured = std::string(label(row.backend)) + " " + num(mine, 1) + " ms / local image " + num(local, 1) +
                     " ms = " + num(t.ratio, 2) + "x" + load();
        t.met = t.ratio <= bound;
      }
      out.push_back(std::move(t));
    };
    if (row.backend == Backend::kFaultlineStoreWarm) {
      against_local("store (" + row.config() + "): warm-cache restore <= 1.1x the local image", 1.1);
    }
    if (row.backend == Backend::kFaultlineStoreCold) {
      against_local("store (" + row.config() + "): cold-cache restore with prefetch <= 2x the local image", 2.0);
      Target t;
      t.name = "store (" + row.config() + "): bytes fetched <= 1.5x the working set's compressed size";
      t.ratio = row.metric("read_amplification");
      if (std::isnan(t.ratio)) {
        t.measured = "not measured: " + row.note;
      } else {
        t.measured = num(row.metric("fetched_mb"), 1) + " MB fetched in " + num(row.metric("gets"), 0) + " GETs / " +
                     num(row.metric("ws_compressed_mb"), 1) + " MB = " + num(t.ratio, 2) + "x";
        t.met = t.ratio <= 1.5;
      }
      out.push_back(std::move(t));
    }
  }
}

void add_image_targets(const Results& r, std::vector<Target>& out) {
  auto image_target = [&](const std::string& name, const Row& image_row, const std::string& key, double bound,
                          const std::string& unit) {
    Target t;
    t.name = name;
    const double img = image_row.metric(key);
    const double raw = metric_of(r, kImageScenario, image_row.config(), raw_counterpart(image_row.backend), key);
    t.ratio = img / raw;
    if (std::isnan(t.ratio)) {
      t.measured = "not measured: " + (image_row.note.empty() ? std::string("the raw-file row is missing") : image_row.note);
    } else {
      t.measured = std::string("image ") + num(img, 2) + unit + " / raw file " + num(raw, 2) + unit + " = " +
                   num(t.ratio, 2) + "x (load average " + num(image_row.metric("load1_before"), 2) + " -> " +
                   num(image_row.metric("load1_after"), 2) + ", " + num(image_row.metric("cores"), 0) + " cores)";
      t.met = t.ratio <= bound;
    }
    out.push_back(std::move(t));
  };
  bool any = false;
  for (const Row& row : r.rows) {
    if (row.scenario != kImageScenario) continue;
    any = true;
    if (row.backend == Backend::kFaultlineImage && image_row_key(row) == "p50_us") {
      image_target("image (" + row.config() + "): on-demand p50 from an image <= 1.3x raw file", row, "p50_us", 1.3,
                   " us");
    }
    if (row.backend == Backend::kFaultlineImagePrefetch) {
      image_target("image (" + row.config() + "): restore with prefetch from an image <= 1.2x raw-file prefetch", row,
                   "restore_ms", 1.2, " ms");
    }
  }
  if (!any) {
    for (const char* name : {"image: on-demand p50 from an image <= 1.3x raw file",
                             "image: working-set restore with prefetch from an image <= 1.2x raw-file prefetch"}) {
      Target t;
      t.name = name;
      t.ratio = std::nan("");
      t.measured = "image scenario not run";
      out.push_back(std::move(t));
    }
  }
}

}  // namespace

std::vector<Target> evaluate_targets(const Results& r) {
  std::vector<Target> out;
  auto ratio_target = [&](std::string name, double num_v, double den_v, std::string num_name, std::string den_name,
                          std::string unit, bool higher_is_met, double bound, std::string why_missing) {
    Target t;
    t.name = std::move(name);
    t.ratio = num_v / den_v;
    if (std::isnan(t.ratio)) {
      t.measured = why_missing;
    } else {
      t.measured = num_name + " " + num(num_v, 1) + unit + " / " + den_name + " " + num(den_v, 1) + unit + " = " +
                   num(t.ratio, 2) + "x";
      t.met = higher_is_met ? t.ratio >= bound : t.ratio <= bound;
    }
    out.push_back(std::move(t));
  };

  const std::string s2 = "4K host 1T";
  const double naive2 = metric_of(r, 2, s2, Backend::kNaive, "restore_ms");
  const double prefetch2 = metric_of(r, 2, s2, Backend::kFaultlinePrefetch, "restore_ms");
  const double file2 = metric_of(r, 2, s2, Backend::kFileMmap, "restore_ms");
  const Row* pre = find(r, 2, s2, Backend::kFaultlinePrefetch);
  const std::string pre_missing = pre ? "record+prefetch " + status_text(*pre) : "scenario 2 not run";
  ratio_target("scenario 2 (" + s2 + "): record+prefetch >= 5x faster than (c) naive on demand", naive2, prefetch2,
               "naive", "prefetch", " ms", true, 5.0, pre_missing);
  ratio_target("scenario 2 (" + s2 + "): record+prefetch within 1.5x of (b) file mmap", prefetch2, file2,
               "prefetch", "file-mmap", " ms", false, 1.5, pre_missing);

  // Scenario 1, quiet and loaded. A quiet target measured on a machine that
  // was not quiet is not judged: the bench refuses to call that run quiet.
  auto s1_target = [&](const std::string& c, std::string name, const char* key, Backend baseline,
                       const std::string& unit, bool higher_is_met, double bound) {
    const Row* fl = find(r, 1, c, Backend::kFaultline);
    ratio_target("scenario 1 (" + c + "): " + std::move(name), metric_of(r, 1, c, Backend::kFaultline, key),
                 metric_of(r, 1, c, baseline, key), "faultline", label(baseline), unit, higher_is_met, bound,
                 fl ? "faultline " + status_text(*fl) : "scenario 1 not run");
    Target& t = out.back();
    if (fl && fl->load == "quiet" && fl->metric("not_quiet_reps") > 0) {
      t.measured += " -- not judged: " + fl->note;
      t.met.reset();
    } else if (fl && fl->load == "loaded") {
      t.measured += " (under " + num(fl->metric("load_cores"), 2) + " cores of generated load, other processes " +
                    num(fl->metric("other_cores"), 2) + ")";
    } else if (fl) {
      t.measured += " (other processes " + num(fl->metric("other_cores"), 2) + " cores, load average " +
                    num(fl->metric("load1"), 2) + ")";
    }
  };
  for (const char* load : {"quiet", "loaded"}) {
    const std::string l = load;
    s1_target("4K host 1T random " + l, "faultline p50 no worse than the busy-polling baseline (issue 10)", "p50_us",
              Backend::kBusyPoll, " us", false, 1.0);
    for (const std::string c : {"4K host 1T random", "4K host 1T seq"}) {
      s1_target(c + " " + l, "faultline p50 no worse than (c) naive", "p50_us", Backend::kNaive, " us", false, 1.0);
    }
    for (const std::string c : {"4K host 2T random", "4K host 2T seq"}) {
      s1_target(c + " " + l, "faultline faults/s >= 1.5x (c) naive", "faults_per_s", Backend::kNaive, "/s", true, 1.5);
    }
  }

  {
    Target t;
    t.name = "scenario 3: faultline madvise p99 < 1 ms (worst configuration)";
    double worst = std::nan("");
    std::string where;
    for (const Row& row : r.rows) {
      if (row.scenario != 3 || row.backend != Backend::kFaultline || row.not_applicable) continue;
      const double p99 = row.metric("madvise_p99_us");
      if (std::isnan(worst) || p99 > worst) {
        worst = p99;
        where = row.config();
      }
    }
    t.ratio = worst / 1000.0;
    if (std::isnan(worst)) {
      t.measured = "scenario 3 not run";
    } else {
      t.measured = "p99 " + num(worst, 1) + " us (" + where + ") / 1000 us = " + num(t.ratio, 3) + "x";
      t.met = worst < 1000.0;
    }
    out.push_back(std::move(t));
  }
  {
    Target t;
    t.name = "scenario 4: faultline state <= 1 byte per 4 KiB page (page-state table, largest 4K guest)";
    const Row* best = nullptr;
    for (const Row& row : r.rows) {
      if (row.scenario == 4 && row.backend == Backend::kFaultline && row.page_size == kPageSize4K &&
          !row.not_applicable && (!best || row.guest_bytes > best->guest_bytes)) {
        best = &row;
      }
    }
    if (!best) {
      t.ratio = std::nan("");
      t.measured = "scenario 4 not run";
    } else {
      // The per-page state is the target's subject; the fixed per-session
      // buffers (independent of guest size) are shown beside it.
      t.ratio = best->metric("table_bytes_per_4k_page");
      t.measured = "page-state table " + num(t.ratio, 3) + " bytes per 4 KiB page over " +
                   human_bytes(static_cast<double>(best->guest_bytes)) + "; with the fixed per-session buffers " +
                   num(best->metric("state_bytes_per_4k_page"), 3) + " (" +
                   human_bytes(best->metric("state_bytes") - best->metric("table_bytes_per_4k_page") *
                                                                 static_cast<double>(best->guest_bytes) / 4096.0) +
                   " of buffers)";
      t.met = t.ratio <= 1.0;
    }
    out.push_back(std::move(t));
  }
  add_image_targets(r, out);
  add_store_targets(r, out);
  add_storage_targets(r, out);
  add_trace_targets(r, out);
  return out;
}

void print_report(const Results& r, const std::vector<Target>& targets, const Sizes& sz, bool quick) {
  std::printf("faultline-bench (%s run, %d repetition%s, medians; baselines and faultline interleaved)\n",
              quick ? "quick" : "full", sz.reps, sz.reps == 1 ? "" : "s");
  std::printf("backends: (a) kernel = anonymous memory, no uffd; (b) file-mmap = memory file MAP_PRIVATE, warm page "
              "cache;\n          (c) naive-uffd = a separate process, one thread: poll, one read + pread + UFFDIO_COPY "
              "per fault;\n          busy-poll (scenario 1) = the same, spinning on a non-blocking read; faultline = "
              "in-process Server; all uffd servers over the real handshake\n");
  std::printf("machine: %d cores; load average (1 min) %s at the start and %s at the end of the scenarios\n", r.cores,
              num(r.load1_start, 2).c_str(), num(r.load1_end, 2).c_str());

  bool any = false;
  for (const Row& row : r.rows) any = any || row.scenario == 1;
  if (any) {
    heading("Scenario 1: on-demand fault service (first read of every page, timed by the touching thread)");
    std::printf("host threads: %s guest; vCPUs: %s (4K) / %s (2M) guest, one KVM_RUN per page (kvm_pvm emulates the "
                "guest: slow per page, so smaller)\n",
                human_bytes(static_cast<double>(sz.s1_guest)).c_str(),
                human_bytes(static_cast<double>(sz.s1_vcpu_guest_4k)).c_str(),
                human_bytes(static_cast<double>(sz.s1_vcpu_guest_2m)).c_str());
    std::printf("every configuration twice, repetitions alternating: quiet = before each repetition the bench waits up "
                "to %d s for\nprocesses other than itself to keep at most %.1f cores busy (0.5 s windows of /proc/stat "
                "minus its own CPU time); a repetition\nwhere they were busier, before or during it, is NOT quiet. "
                "loaded = %s threads of another process spinning\n(faultline-baseline-server --spin), started before "
                "and killed after each loaded repetition.\n",
                sz.quiet_wait_s, kQuietMaxOtherCores, num(s1_load_threads(r), 0).c_str());
    std::printf("faults: fault messages the server read; other: cores other processes kept busy (median); loaded "
                "rows also used %s cores of generated load\n",
                num(s1_generated_load(r), 2).c_str());
    std::printf("%-20s %-11s | %-47s | %-47s | %s\n", "", "", "quiet", "loaded", "");
    std::printf("%-20s %-11s | %9s %9s %10s %9s %5s | %9s %9s %10s %9s %5s | %s\n", "config", "backend", "p50 us",
                "p99 us", "faults/s", "faults", "other", "p50 us", "p99 us", "faults/s", "faults", "other", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != 1 || row.load != "quiet") continue;
      const std::string base = s1_base_config(row);
      const Row* loaded = find(r, 1, base + " loaded", row.backend);
      auto cells = [](const Row* x) {
        if (!x) return std::string(47, ' ');
        char buf[128];
        std::snprintf(buf, sizeof buf, "%9s %9s %10s %9s %5s", num(x->metric("p50_us"), 2).c_str(),
                      num(x->metric("p99_us"), 1).c_str(), num(x->metric("faults_per_s"), 0).c_str(),
                      num(x->metric("server_faults"), 0).c_str(), num(x->metric("other_cores"), 2).c_str());
        return std::string(buf);
      };
      std::string note = status_text(row);
      if (loaded && !status_text(*loaded).empty()) {
        note += (note.empty() ? "" : "; ") + std::string("loaded: ") + status_text(*loaded);
      }
      std::printf("%-20s %-11s | %s | %s | %s\n", base.c_str(), label(row.backend), cells(&row).c_str(),
                  cells(loaded).c_str(), note.c_str());
    }
    std::printf("\nfaultline against the one-thread baselines (p50: faultline / baseline, below 1 = faultline faster; "
                "faults/s: faultline / baseline, above 1 = faultline faster)\n");
    std::printf("%-20s | %-39s | %-39s\n", "", "quiet", "loaded");
    std::printf("%-20s | %9s %9s %9s %9s | %9s %9s %9s %9s\n", "config", "p50/naive", "p50/busy", "f/s/naive",
                "f/s/busy", "p50/naive", "p50/busy", "f/s/naive", "f/s/busy");
    for (const Row& row : r.rows) {
      if (row.scenario != 1 || row.load != "quiet" || row.backend != Backend::kFaultline) continue;
      const std::string base = s1_base_config(row);
      std::string line;
      for (const char* load : {" quiet", " loaded"}) {
        const std::string c = base + load;
        auto ratio = [&](Backend b, const char* key) {
          return metric_of(r, 1, c, Backend::kFaultline, key) / metric_of(r, 1, c, b, key);
        };
        char buf[96];
        std::snprintf(buf, sizeof buf, " | %9s %9s %9s %9s", num(ratio(Backend::kNaive, "p50_us"), 2).c_str(),
                      num(ratio(Backend::kBusyPoll, "p50_us"), 2).c_str(),
                      num(ratio(Backend::kNaive, "faults_per_s"), 2).c_str(),
                      num(ratio(Backend::kBusyPoll, "faults_per_s"), 2).c_str());
        line += buf;
      }
      std::printf("%-20s%s\n", base.c_str(), line.c_str());
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || row.scenario == 2;
  if (any) {
    heading("Scenario 2: restore of a working set (time from mapping/handshake until every page of the set was read)");
    std::printf("host threads: %s of a %s guest; vCPUs: %s of %s (one KVM_RUN per vCPU); pages random over the guest\n",
                human_bytes(static_cast<double>(sz.s2_set)).c_str(), human_bytes(static_cast<double>(sz.s2_guest)).c_str(),
                human_bytes(static_cast<double>(sz.s2_vcpu_set)).c_str(),
                human_bytes(static_cast<double>(sz.s2_vcpu_guest)).c_str());
    std::printf("faults: fault messages faultline read until the set was read (the rest of the set was installed "
                "ahead of its faults)\n");
    std::printf("%-20s %-11s %12s %12s %12s %10s %10s  %s\n", "config", "backend", "restore ms", "naive/this",
                "this/file", "set pages", "faults", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != 2) continue;
      const double ms = row.metric("restore_ms");
      std::printf("%-20s %-11s %12s %12s %12s %10s %10s  %s\n", row.config().c_str(), label(row.backend),
                  num(ms, 1).c_str(), num(metric_of(r, 2, row.config(), Backend::kNaive, "restore_ms") / ms, 2).c_str(),
                  num(ms / metric_of(r, 2, row.config(), Backend::kFileMmap, "restore_ms"), 2).c_str(),
                  num(static_cast<double>(row.pages), 0).c_str(), num(row.metric("demand_faults"), 0).c_str(),
                  status_text(row).c_str());
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || row.scenario == 3;
  if (any) {
    heading("Scenario 3: REMOVE under load (madvise(MADV_DONTNEED) latency while other threads fault)");
    std::printf("%s guest swept by the faulting threads; %llu removes of 64 KiB (4K) or one 2 MiB page, one every "
                "~200 us\n",
                human_bytes(static_cast<double>(sz.s3_guest)).c_str(),
                static_cast<unsigned long long>(sz.s3_min_removes));
    std::printf("uffd servers: fault messages read during the run, how many faultline's event reader served itself, "
                "EAGAIN retries\n");
    std::printf("%-20s %-11s %12s %12s %12s %10s %10s %8s  %s\n", "config", "backend", "p50 us", "p99 us", "max us",
                "faults", "by reader", "EAGAIN", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != 3) continue;
      std::printf("%-20s %-11s %12s %12s %12s %10s %10s %8s  %s\n", row.config().c_str(), label(row.backend),
                  num(row.metric("madvise_p50_us"), 1).c_str(), num(row.metric("madvise_p99_us"), 1).c_str(),
                  num(row.metric("madvise_max_us"), 1).c_str(), num(row.metric("faults"), 0).c_str(),
                  num(row.metric("reader_served"), 0).c_str(), num(row.metric("eagain_retries"), 0).c_str(),
                  status_text(row).c_str());
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || row.scenario == 4;
  if (any) {
    heading("Scenario 4: server memory (faultline: Session::memory_use(); RSS delta at session start)");
    std::printf("state = page-state table + fixed per-session buffers (+ record list); per 4 KiB page of guest: the "
                "table alone, and table + buffers\n");
    std::printf("%-10s %-5s %-11s %12s %14s %12s %12s %12s  %s\n", "guest", "page", "backend", "state", "state/GiB",
                "table B/4K", "+buf B/4K", "RSS delta", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != 4) continue;
      std::printf("%-10s %-5s %-11s %12s %14s %12s %12s %12s  %s\n",
                  human_bytes(static_cast<double>(row.guest_bytes)).c_str(), row.page_size == kPageSize2M ? "2M" : "4K",
                  label(row.backend), human_bytes(row.metric("state_bytes")).c_str(),
                  human_bytes(row.metric("state_bytes_per_gib")).c_str(),
                  num(row.metric("table_bytes_per_4k_page"), 3).c_str(),
                  num(row.metric("state_bytes_per_4k_page"), 3).c_str(), human_bytes(row.metric("rss_delta_bytes")).c_str(),
                  status_text(row).c_str());
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || (row.backend == Backend::kFaultlineMetrics && !row.not_applicable);
  if (any) {
    heading("Cost of metrics: faultline timing every fault (serve --metrics) / the same without");
    std::printf("two faultline servers, interleaved with each other and the baselines; on/off = 1.00 means no cost "
                "(p50, p99: lower is better; faults/s: higher is better)\n");
    if (!std::isnan(r.metrics_record_ns)) {
      std::printf("recording alone (two clock reads, bucket lookup, stores; median of 5 x 2e6 in a loop on one "
                  "thread): %.1f ns per fault\n",
                  r.metrics_record_ns);
    }
    std::printf("%-26s %9s %9s %7s %9s %9s %7s %11s %11s %7s\n", "scenario 1 config", "p50 off", "p50 on", "on/off",
                "p99 off", "p99 on", "on/off", "f/s off", "f/s on", "on/off");
    double log_p50 = 0, log_fps = 0;
    int n = 0;
    for (const Row& row : r.rows) {
      if (row.scenario != 1 || row.backend != Backend::kFaultline || row.not_applicable) continue;
      const Row* on = find(r, 1, row.config(), Backend::kFaultlineMetrics);
      if (!on || on->not_applicable) continue;
      const double p50 = on->metric("p50_us") / row.metric("p50_us");
      const double p99 = on->metric("p99_us") / row.metric("p99_us");
      const double fps = on->metric("faults_per_s") / row.metric("faults_per_s");
      std::printf("%-26s %9s %9s %7s %9s %9s %7s %11s %11s %7s\n", row.config().c_str(),
                  num(row.metric("p50_us"), 2).c_str(), num(on->metric("p50_us"), 2).c_str(), num(p50, 3).c_str(),
                  num(row.metric("p99_us"), 1).c_str(), num(on->metric("p99_us"), 1).c_str(), num(p99, 3).c_str(),
                  num(row.metric("faults_per_s"), 0).c_str(), num(on->metric("faults_per_s"), 0).c_str(),
                  num(fps, 3).c_str());
      if (std::isfinite(p50) && std::isfinite(fps) && p50 > 0 && fps > 0) {
        log_p50 += std::log(p50);
        log_fps += std::log(fps);
        ++n;
      }
    }
    if (n > 0) {
      std::printf("geometric mean over %d configurations: p50 on/off %.3f, faults/s on/off %.3f\n", n,
                  std::exp(log_p50 / n), std::exp(log_fps / n));
    }
    bool s3 = false;
    for (const Row& row : r.rows) s3 = s3 || (row.scenario == 3 && row.backend == Backend::kFaultlineMetrics);
    if (s3) {
      std::printf("\n%-20s %12s %12s %7s %12s %12s %7s\n", "scenario 3 config", "madv p50 off", "madv p50 on",
                  "on/off", "madv p99 off", "madv p99 on", "on/off");
      for (const Row& row : r.rows) {
        if (row.scenario != 3 || row.backend != Backend::kFaultline || row.not_applicable) continue;
        const Row* on = find(r, 3, row.config(), Backend::kFaultlineMetrics);
        if (!on || on->not_applicable) continue;
        std::printf("%-20s %12s %12s %7s %12s %12s %7s\n", row.config().c_str(),
                    num(row.metric("madvise_p50_us"), 1).c_str(), num(on->metric("madvise_p50_us"), 1).c_str(),
                    num(on->metric("madvise_p50_us") / row.metric("madvise_p50_us"), 3).c_str(),
                    num(row.metric("madvise_p99_us"), 1).c_str(), num(on->metric("madvise_p99_us"), 1).c_str(),
                    num(on->metric("madvise_p99_us") / row.metric("madvise_p99_us"), 3).c_str());
      }
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || row.scenario == kImageScenario;
  if (any) {
    heading("Image serving: serve --image against serving the raw memory file (issue 9)");
    std::printf("a fresh in-process server per measurement (real handshake; an image starts with an empty frame cache), "
                "one host thread;\nthe store and the raw file on the same file system, both warm in the page cache; "
                "img/raw: this image row against its raw-file row\n");
    std::printf("on demand: every page once, first read timed (fl-img-warm: after another VM made the same reads through the same server); restore: time from handshake until the set was read "
                "(fl-prefetch: --prefetch RECORD,\nfl-img-prefetch: the image created with --working-set RECORD); "
                "eager fill: time until every guest page was resident (mincore)\n");
    std::printf("%-34s %-15s %9s %9s %10s %10s %9s %7s %9s %9s  %s\n", "config", "backend", "p50 us", "p99 us",
                "restore ms", "fill ms", "set pages", "img/raw", "faults", "by reader", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != kImageScenario) continue;
      const std::string key = image_row_key(row);
      const double ratio =
          from_image(row.backend)
              ? row.metric(key) / metric_of(r, kImageScenario, row.config(), raw_counterpart(row.backend), key)
              : std::nan("");
      std::printf("%-34s %-15s %9s %9s %10s %10s %9s %7s %9s %9s  %s\n", row.config().c_str(), label(row.backend),
                  num(row.metric("p50_us"), 2).c_str(), num(row.metric("p99_us"), 1).c_str(),
                  num(row.metric("restore_ms"), 1).c_str(), num(row.metric("fill_ms"), 1).c_str(),
                  num(static_cast<double>(row.pages), 0).c_str(), num(ratio, 2).c_str(),
                  num(row.metric("demand_faults"), 0).c_str(), num(row.metric("reader_served"), 0).c_str(),
                  status_text(row).c_str());
    }
    std::set<std::string> printed;
    for (const Row& row : r.rows) {
      if (row.scenario != kImageScenario || std::isnan(row.metric("image_frame_bytes"))) continue;
      const std::string frames = row.page_size == kPageSize2M ? "2M" : "4K";
      if (!printed.insert(frames).second) continue;
      std::printf("%s images: frames of %s\n", frames.c_str(), human_bytes(row.metric("image_frame_bytes")).c_str());
    }
    printed.clear();
    for (const Row& row : r.rows) {
      if (row.scenario != kImageScenario || std::isnan(row.metric("load1_before"))) continue;
      const std::string subject = row.config().substr(0, row.config().find(' '));
      if (!printed.insert(subject).second) continue;
      std::printf("load average (1 min) %s before / %s after the %s file, %s cores; first write of fresh anonymous "
                  "memory %s us per 4 KiB page\n",
                  num(row.metric("load1_before"), 2).c_str(), num(row.metric("load1_after"), 2).c_str(),
                  subject.c_str(), num(row.metric("cores"), 0).c_str(),
                  num(row.metric("fresh_memory_us_per_page"), 2).c_str());
    }
  }

  any = false;
  for (const Row& row : r.rows) any = any || row.scenario == kStoreScenario;
  if (any) {
    heading("Images in an object store: the working-set restore from a local Ceph RADOS Gateway (issue 11)");
    std::printf("a fresh in-process daemon per measurement (real handshake, empty frame cache), --prefetch of the "
                "recorded set, one host thread reading the set;\nfl-prefetch: the raw file; fl-img-prefetch: the "
                "image (create --working-set) on local disk; fl-s3-cold: that image in the bucket, empty --cache-dir;\n"
                "fl-s3-warm: the same with a --cache-dir an earlier daemon filled. restore: handshake until the set "
                "was read (image opening is start-up, untimed);\nGETs and MB: what the S3 client fetched for the "
                "restore (opening the image included); amp: MB fetched / the set's compressed size (its pages at the image's ratio);\n"
                "CPU ms: used from the daemon's start to its stop by this process (daemon, S3 client, touching thread) "
                "and by the store's daemons (mon, OSD, gateway);\nbusy: how busy the machine's cores were meanwhile, "
                "any process (/proc/stat; near 100 %%: the restore waited for CPU, not for the store)\n");
    std::printf("%-34s %-15s %10s %8s %8s %9s %6s %9s %9s %9s %9s %6s  %s\n", "config", "backend", "restore ms",
                "x local", "GETs", "MB", "amp", "set MB", "faults", "own CPU", "store CPU", "busy", "note");
    for (const Row& row : r.rows) {
      if (row.scenario != kStoreScenario) continue;
      const double local = metric_of(r, kStoreScenario, row.config(), Backend::kFaultlineImagePrefetch, "restore_ms");
      const double busy = row.metric("machine_busy_pct");
      std::printf("%-34s %-15s %10s %8s %8s %9s %6s %9s %9s %9s %9s %6s  %s\n", row.config().c_str(),
                  label(row.backend), num(row.metric("restore_ms"), 1).c_str(),
                  num(row.metric("restore_ms") / local, 2).c_str(), num(row.metric("gets"), 0).c_str(),
                  num(row.metric("fetched_mb"), 1).c_str(), num(row.metric("read_amplification"), 2).c_str(),
                  num(row.metric("ws_compressed_mb"), 1).c_str(), num(row.metric("demand_faults"), 0).c_str(),
                  num(row.metric("own_cpu_ms"), 0).c_str(), num(row.metric("store_cpu_ms"), 0).c_str(),
                  (num(busy, 0) + (std::isnan(busy) ? "" : " %")).c_str(), status_text(row).c_str());
    }
    std::set<std::string> printed;
    for (const Row& row : r.rows) {
      if (row.scenario != kStoreScenario || std::isnan(row.metric("load1_before"))) continue;
      const std::string subject = row.config().substr(0, row.config().find(' '));
      if (!printed.insert(subject).second) continue;
      std::printf("load average (1 min) %s before / %s after the %s file, %s cores\n",
                  num(row.metric("load1_before"), 2).c_str(), num(row.metric("load1_after"), 2).c_str(),
                  subject.c_str(), num(row.metric("cores"), 0).c_str());
    }
  }

  print_storage_report(r);
  print_trace_report(r);

  if (!r.notes.empty()) {
    heading("Notes");
    for (const std::string& n : r.notes) std::printf("- %s\n", n.c_str());
  }

  heading("Targets (issues 4, 9, 10 and 11; measured ratios, never asserted)");
  for (const Target& t : targets) {
    std::printf("%-9s %s\n          %s\n", t.met ? (*t.met ? "MET" : "NOT MET") : "n/a", t.name.c_str(),
                t.measured.c_str());
  }
  std::fflush(stdout);
}

std::optional<std::string> write_json(const std::string& path, const Results& r, const std::vector<Target>& targets,
                                      const Sizes& sz, bool quick) {
  using nlohmann::json;
  auto finite = [](double v) -> json { return std::isnan(v) || std::isinf(v) ? json(nullptr) : json(v); };
  json j;
  j["mode"] = quick ? "quick" : "full";
  j["repetitions"] = sz.reps;
  j["sizes"] = {{"s1_guest", sz.s1_guest},       {"s1_vcpu_guest_4k", sz.s1_vcpu_guest_4k},
                {"s1_vcpu_guest_2m", sz.s1_vcpu_guest_2m}, {"s2_guest", sz.s2_guest},
                {"s2_set", sz.s2_set},           {"s2_vcpu_guest", sz.s2_vcpu_guest},
                {"s2_vcpu_set", sz.s2_vcpu_set}, {"s3_guest", sz.s3_guest},
                {"s3_removes", sz.s3_min_removes}, {"s4_guests", sz.s4_guests},
                {"storage_bytes", sz.storage_bytes}, {"quiet_wait_s", sz.quiet_wait_s}};
  j["rows"] = json::array();
  for (const Row& row : r.rows) {
    json m = json::object();
    for (const auto& [k, v] : row.metrics) m[k] = finite(v);
    j["rows"].push_back({{"scenario", row.scenario},
                         {"config", row.config()},
                         {"subject", row.subject},
                         {"page_size", row.page_size},
                         {"toucher", row.toucher},
                         {"threads", row.threads},
                         {"order", row.order},
                         {"load", row.load},
                         {"quiet", row.load == "quiet" ? json(row.metric("not_quiet_reps") == 0) : json(nullptr)},
                         {"backend", label(row.backend)},
                         {"backend_description", to_string(row.backend)},
                         {"guest_bytes", row.guest_bytes},
                         {"pages", row.pages},
                         {"repetitions", row.reps},
                         {"not_applicable", row.not_applicable},
                         {"note", row.note},
                         {"metrics", m}});
  }
  j["targets"] = json::array();
  for (const Target& t : targets) {
    j["targets"].push_back({{"name", t.name},
                            {"measured", t.measured},
                            {"ratio", finite(t.ratio)},
                            {"met", t.met ? json(*t.met) : json(nullptr)}});
  }
  j["machine"] = {{"cores", r.cores}, {"load1_start", finite(r.load1_start)}, {"load1_end", finite(r.load1_end)}};
  j["quiet_rule"] = {{"max_other_cores", kQuietMaxOtherCores}, {"wait_s", sz.quiet_wait_s}};
  j["data_mismatches"] = r.data_mismatches;
  j["metrics_record_ns"] = finite(r.metrics_record_ns);
  j["notes"] = r.notes;
  j["corpus_description"] = r.corpus_description;
  std::ofstream f(path);
  if (!f) return "cannot write " + path;
  f << j.dump(2) << "\n";
  if (!f) return "write to " + path + " failed";
  return std::nullopt;
}

namespace {

// One gnuplot data file: a row per configuration, a column per backend ("-" = missing).
bool write_panel(const std::string& path, const Results& r, int scenario, const std::vector<Backend>& backends,
                 const std::string& key) {
  std::vector<std::string> configs;
  for (const Row& row : r.rows) {
    if (row.scenario == scenario && std::find(configs.begin(), configs.end(), row.config()) == configs.end()) {
      configs.push_back(row.config());
    }
  }
  if (configs.empty()) return false;
  std::ofstream f(path);
  f << "config";
  for (Backend b : backends) f << " \"" << label(b) << "\"";
  f << "\n";
  for (const std::string& c : configs) {
    f << "\"" << c << "\"";
    for (Backend b : backends) {
      const double v = metric_of(r, scenario, c, b, key);
      f << " " << (std::isnan(v) || v <= 0 ? std::string("-") : num(v, 3));
    }
    f << "\n";
  }
  return true;
}

}  // namespace

std::string write_chart(const std::string& png_path, const std::string& work_dir, const Results& r) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    return "chart skipped: gnuplot not found (apt-get install gnuplot-nox)";
  }
  const std::vector<Backend> four{Backend::kKernel, Backend::kFileMmap, Backend::kNaive, Backend::kFaultline};
  const std::vector<Backend> six{Backend::kKernel,    Backend::kFileMmap,          Backend::kNaive,
                                 Backend::kFaultline, Backend::kFaultlinePrefetch, Backend::kFaultlineEager};
  struct Panel {
    std::string file, title, ylabel;
    size_t columns;
  };
  std::vector<Panel> panels;
  auto add = [&](int scenario, const std::vector<Backend>& b, const std::string& key, const std::string& title,
                 const std::string& ylabel) {
    const std::string file = work_dir + "/chart-" + std::to_string(panels.size()) + ".dat";
    if (write_panel(file, r, scenario, b, key)) panels.push_back({file, title, ylabel, b.size()});
  };
  const std::vector<Backend> five{Backend::kKernel, Backend::kFileMmap, Backend::kNaive, Backend::kBusyPoll,
                                  Backend::kFaultline};
  add(1, five, "p50_us", "Scenario 1: fault latency p50, quiet and loaded (lower is better)", "microseconds (log)");
  add(1, five, "faults_per_s", "Scenario 1: faults per second, quiet and loaded (higher is better)", "faults/s (log)");
  add(2, six, "restore_ms", "Scenario 2: working-set restore time (lower is better)", "milliseconds (log)");
  add(3, four, "madvise_p99_us", "Scenario 3: madvise(DONTNEED) p99 under load (lower is better)",
      "microseconds (log)");
  if (panels.empty()) return "chart skipped: no data";

  const std::string script = work_dir + "/chart.gp";
  std::ofstream g(script);
  g << "set terminal pngcairo size 1600," << 520 * panels.size() << " font 'Sans,10'\n"
    << "set output '" << png_path << "'\n"
    << "set datafile missing '-'\n"
    << "set style data histograms\nset style histogram clustered gap 1\n"
    << "set style fill solid 0.85 border -1\nset boxwidth 0.9\n"
    << "set logscale y\nset grid ytics\nset key outside right top\n"
    << "set xtics rotate by -30 noenhanced\nset key noenhanced\n"
    << "set multiplot layout " << panels.size() << ",1\n";
  for (const Panel& p : panels) {
    g << "set title '" << p.title << "'\nset ylabel '" << p.ylabel << "'\n"
      << "plot for [i=2:" << p.columns + 1 << "] '" << p.file << "' using i:xtic(1) title columnheader(i)\n";
  }
  g << "unset multiplot\n";
  g.close();
  const std::string cmd = "gnuplot '" + script + "' 2>" + work_dir + "/gnuplot.err";
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    std::ifstream e(work_dir + "/gnuplot.err");
    std::string first;
    std::getline(e, first);
    return "chart failed: gnuplot exited " + std::to_string(WEXITSTATUS(rc)) + ": " + first;
  }
  return "chart written to " + png_path;
}

}  // namespace faultline::bench
