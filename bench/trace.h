// First-touch traces for the trace-replay scenario of faultline-bench
// (issue 10): generated traces with the shape of a real guest's first
// touches after restore, their shape measured the way the issue describes
// real guests, and their storage as faultline's own working-set files
// (`serve --record` format, snapshot/working_set.h), so that a record made
// by a real Firecracker guest can be replayed the same way.
//
// A trace is one page list per stream (a vCPU), each in that stream's
// first-touch order; no page appears twice in a trace. A working-set file has
// one list and no vCPU numbers, so a trace is stored as its streams one after
// another (stream 0's touches first) and read back split into N contiguous
// slices of near-equal length, slice t = [n*t/N, n*(t+1)/N) of the n pages
// (the split every other scenario uses for its threads). The generator makes
// every stream exactly its slice's length, so a generated trace reads back
// as the streams it was written with. A record of a real guest read back with
// N > 1 streams is N consecutive stretches of its first-touch order.
//
// Thread-safety: free functions with no shared state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "snapshot/working_set.h"

namespace faultline::bench {

inline constexpr uint64_t kTracePage = 4096;
inline constexpr uint64_t kTraceBlockPages = 16;  // 64 KiB: what the issue measures block use in

struct Trace {
  uint64_t guest_bytes = 0;                    // the memory file the trace is for
  std::vector<std::vector<uint64_t>> streams;  // byte offsets of 4 KiB pages, per stream in touch order
  uint64_t pages() const;
};

struct TraceOptions {
  uint64_t guest_bytes = 0;  // a multiple of 4 KiB
  int streams = 1;           // vCPUs, 1-4
  double fraction = 0.25;    // share of the guest's pages the trace touches
  // false: the shape of a real guest (runs of pages in aligned extents, some
  // single pages, backward jumps); true: every page chosen at random over
  // the guest, no runs at all (what fault-around must not slow down).
  bool random_access = false;
  uint64_t seed = 1;
};

// Deterministic: the same options give the same trace. Stream t holds
// exactly the pages of slice t of the stored trace (see above). An error
// when the options are out of range.
Result<Trace> generate_trace(const TraceOptions& options);

// What the issue measures on a real guest's first touches.
struct TraceShape {
  uint64_t pages = 0;
  // Touches followed, in their own stream, by a touch of the next page
  // (the issue: ~95 % on a real Firecracker guest). The last touch of a
  // stream counts as not followed.
  double next_page_share = 0;
  // Pages touched / pages of the 64 KiB blocks touched (the issue: the
  // blocks a real guest touches are ~90 % used).
  double block_use = 0;
  // Share of the 64 KiB blocks touched whose 16 pages are all touched.
  double full_block_share = 0;
  // Touches followed, in their stream, by a touch at a lower address.
  double backward_jump_share = 0;
  // Runs of consecutive pages (a touch followed by the next page continues a
  // run): their count, mean length, longest, and the share of runs that
  // are a single page.
  uint64_t runs = 0;
  double mean_run_pages = 0;
  uint64_t longest_run_pages = 0;
  double single_page_run_share = 0;
};
TraceShape measure_shape(const Trace& trace);

// The trace as a working-set file's contents (streams one after another).
WorkingSet to_working_set(const Trace& trace);
// Splits `set` (4 KiB pages) into `streams` contiguous slices (see above).
Result<Trace> trace_from_working_set(const WorkingSet& set, int streams);

// Writes `trace` with write_working_set (atomic, durable).
Status write_trace(const std::string& path, const Trace& trace);
// Reads any valid working-set file (read_working_set checks it against the
// memory-file size its own header names: the memory file to replay it on is
// made to that size) and splits it into `streams`.
Result<Trace> read_trace(const std::string& path, int streams);

// One line per figure, for the report.
std::string describe_shape(const TraceShape& shape);

}  // namespace faultline::bench
