// The storage table of faultline-bench (`--scenario storage`, issue 9): what
// the image format (src/image) costs and saves on two memory files, the
// generated one of the other scenarios (random bytes, 10 % zero pages) and
// the realistic corpus (bench/corpus.h):
//   raw and stored size, the ratio against zstd -3 of the whole file, dedup
//   of a 10-generation chain writing 5 % of pages each, sharing between two
//   images created independently from one file, create and flatten
//   throughput, and the cost of decompressing a frame against copying a page
//   out of a raw file.
// Figures only; the targets are printed as measured ratios, never asserted.
// The flattened image is compared with the raw file byte for byte (a
// mismatch counts in Results::data_mismatches, as a wrong page does).
//
// Thread-safety: one controlling thread.
#pragma once

#include <vector>

#include "bench/report.h"
#include "bench/scenarios.h"

namespace faultline::bench {

inline constexpr int kStorageScenario = 5;

// Appends one Row per memory file (scenario kStorageScenario, Row::subject
// "generated" / "realistic") and the corpus description to ctx.results.
void run_storage_scenario(Context& ctx);

// The storage table, when there are rows for it.
void print_storage_report(const Results& results);

// Issue 9's storage targets: stored bytes of the realistic corpus at most
// 1.15x zstd -3 of the whole file; create of it at least 500 MB/s.
void add_storage_targets(const Results& results, std::vector<Target>& out);

}  // namespace faultline::bench
