// The trace-replay scenario of faultline-bench (`--scenario trace`, issue 10):
// touchers replay a first-touch trace (bench/trace.h), one thread per stream
// (vCPU), each reading one byte of every page of its stream in order, against
//   (b) file-mmap   the memory file mmap'ed MAP_PRIVATE, page cache warm (the
//                   kernel maps up to 16 neighbours of a read fault);
//   (c) naive-uffd  the naive one-thread server;
//   fl-no-fa        faultline on demand, fault-around off (fault_around_pages 1);
//   faultline       faultline on demand with fault-around (the default, 64);
//   fl-prefetch     faultline with --prefetch of the trace itself (reference).
// Repetitions interleaved, the backend order rotated each repetition. Per
// row (medians): the restore time (guest mapping and handshake until every
// stream touched its last page), the faults the touching threads took
// (getrusage), the server's fault count, and from this process's pagemap
// after the replay the pages present and, of those, the ones not in the
// trace (installed and never touched); for faultline the server's
// ahead_pages / ahead_faulted beside them. Every byte of every touched and
// every present page is compared with the memory file (a difference counts
// in Results::data_mismatches and fails the run).
//
// Traces: generated ones over a guest of TraceScenarioOptions::guest_bytes
// (a real guest's shape with 1 and 2 streams, and a random-access one), and
// every --trace FILE (a working-set file, e.g. `serve --record` of a real
// Firecracker guest) split into `trace_streams` streams, replayed over a
// generated memory file of the size its header names.
//
// Thread-safety: one controlling thread; the scenario starts and joins its
// touching threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench/report.h"
#include "bench/scenarios.h"

namespace faultline::bench {

inline constexpr int kTraceScenario = 7;

struct TraceScenarioOptions {
  uint64_t guest_bytes = 256 * kMiB;  // the generated traces' guest (32 MiB with --quick)
  std::vector<std::string> trace_paths;  // --trace FILE, replayed after the generated ones
  int trace_streams = 1;                 // streams a --trace FILE is split into
};

// Appends one Row per trace and backend (scenario kTraceScenario, subject the
// trace's name; its shape in the row's metrics) to ctx.results.
void run_trace_scenario(Context& ctx, const TraceScenarioOptions& options);

// The trace-replay table and each trace's shape, when there are rows for it.
void print_trace_report(const Results& results);

// Issue 10's trace-replay targets, for every trace but the random-access
// one: on-demand restore with fault-around at most 1.5x (b) file mmap and at
// least 4x faster than faultline without fault-around; pages installed ahead
// and never touched at most 10 % of the pages installed.
void add_trace_targets(const Results& results, std::vector<Target>& out);

}  // namespace faultline::bench
