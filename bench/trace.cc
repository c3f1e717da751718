#include "bench/trace.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>

#include "common/unique_fd.h"

namespace faultline::bench {

uint64_t Trace::pages() const {
  uint64_t n = 0;
  for (const auto& s : streams) n += s.size();
  return n;
}

namespace {

// Slice t of n pages split into `streams`: [n*t/N, n*(t+1)/N).
uint64_t slice_begin(uint64_t n, int streams, int t) {
  return n * static_cast<uint64_t>(t) / static_cast<uint64_t>(streams);
}

// The shape of a real guest's first touches, as a model with few knobs.
// A guest kernel hands memory out from the buddy allocator in aligned
// power-of-two blocks and then walks what it got (page tables, the page
// cache, slabs, a process image): so a stream touches *extents*, aligned
// runs of 4 to 512 pages, from their start upwards, in *runs* of
// geometric length (mean 16 pages) with now and then a long one (64-512
// pages); between two runs it moves to a new extent or goes back to one it
// left unfinished (a backward jump when that one lies below). A few pages
// of an extent are never touched (holes), and a few touches are single
// pages anywhere in the guest. The constants are set so that the default
// trace shows what the issue measured on a real Firecracker guest: ~95 % of
// touches followed by the next page, 64 KiB blocks ~90 % used
// (docs/performance.md, "Trace replay", prints what a run measured).
constexpr uint64_t kExtentPages[] = {4, 8, 16, 32, 64, 128, 256, 512};
constexpr double kExtentWeights[] = {2, 3, 10, 20, 25, 20, 12, 8};
constexpr double kSingleShare = 0.03;     // of runs: one page somewhere else in the guest
constexpr double kResumeShare = 0.70;     // of runs: back to an extent left unfinished
constexpr double kLongRunShare = 0.10;    // of runs: 64-512 pages instead of geometric
constexpr double kMeanRunPages = 16;      // the geometric runs
constexpr double kHoleShare = 0.004;      // of an extent's pages: never touched
constexpr int kPlacementTries = 64;

struct Extent {
  uint64_t cursor = 0;  // next page to touch
  uint64_t end = 0;     // one past the last page
};

class StreamGenerator {
 public:
  StreamGenerator(std::vector<uint8_t>& taken, std::mt19937_64& rng) : taken_(taken), rng_(rng) {}

  // Appends `length` distinct pages (byte offsets) to `out`; false when the
  // guest ran out of free pages.
  bool generate(uint64_t length, std::vector<uint64_t>& out) {
    std::uniform_real_distribution<double> u(0, 1);
    std::geometric_distribution<uint64_t> geometric(1.0 / kMeanRunPages);
    std::uniform_int_distribution<uint64_t> long_run(64, 512);
    std::vector<Extent> open;
    while (out.size() < length) {
      if (u(rng_) < kSingleShare) {
        const auto page = free_page();
        if (!page) return false;
        out.push_back(*page * kTracePage);
        continue;
      }
      size_t current;
      if (!open.empty() && u(rng_) < kResumeShare) {
        current = std::uniform_int_distribution<size_t>(0, open.size() - 1)(rng_);
      } else {
        const auto e = new_extent();
        if (!e) return false;
        open.push_back(*e);
        current = open.size() - 1;
      }
      const uint64_t run = u(rng_) < kLongRunShare ? long_run(rng_) : geometric(rng_) + 1;
      Extent& e = open[current];
      for (uint64_t i = 0; i < run && e.cursor < e.end && out.size() < length; ++i, ++e.cursor) {
        if (u(rng_) < kHoleShare) continue;
        out.push_back(e.cursor * kTracePage);
      }
      if (e.cursor == e.end) {
        open[current] = open.back();
        open.pop_back();
      }
    }
    return true;
  }

 private:
  std::optional<uint64_t> free_page() {
    std::uniform_int_distribution<uint64_t> any(0, taken_.size() - 1);
    for (int i = 0; i < kPlacementTries; ++i) {
      const uint64_t p = any(rng_);
      if (!taken_[p]) {
        taken_[p] = 1;
        return p;
      }
    }
    return std::nullopt;
  }

  // An aligned run of free pages, its size drawn from kExtentWeights (a
  // smaller one when no place is found); every page of it is taken.
  std::optional<Extent> new_extent() {
    std::discrete_distribution<size_t> size_index(std::begin(kExtentWeights), std::end(kExtentWeights));
    for (size_t k = size_index(rng_) + 1; k-- > 0;) {
      const uint64_t size = kExtentPages[k];
      if (size > taken_.size()) continue;
      std::uniform_int_distribution<uint64_t> slot(0, taken_.size() / size - 1);
      for (int i = 0; i < kPlacementTries; ++i) {
        const uint64_t first = slot(rng_) * size;
        if (std::any_of(taken_.begin() + static_cast<ptrdiff_t>(first),
                        taken_.begin() + static_cast<ptrdiff_t>(first + size), [](uint8_t t) { return t != 0; })) {
          continue;
        }
        std::fill_n(taken_.begin() + static_cast<ptrdiff_t>(first), size, uint8_t{1});
        return Extent{first, first + size};
      }
    }
    return std::nullopt;
  }

  std::vector<uint8_t>& taken_;  // one byte per guest page: 1 once any stream may touch it
  std::mt19937_64& rng_;
};

}  // namespace

Result<Trace> generate_trace(const TraceOptions& o) {
  if (o.guest_bytes == 0 || o.guest_bytes % kTracePage != 0) {
    return fail("trace: the guest size must be a positive multiple of 4 KiB", EINVAL);
  }
  if (o.streams < 1 || o.streams > 4) return fail("trace: 1 to 4 streams (vCPUs)", EINVAL);
  // Extents need free room around them to be placed at random.
  if (!(o.fraction > 0 && o.fraction <= 0.5)) return fail("trace: the fraction of pages touched must be in (0, 0.5]", EINVAL);
  const uint64_t guest_pages = o.guest_bytes / kTracePage;
  const uint64_t total = std::max<uint64_t>(static_cast<uint64_t>(o.streams),
                                            static_cast<uint64_t>(static_cast<double>(guest_pages) * o.fraction));
  Trace t;
  t.guest_bytes = o.guest_bytes;
  t.streams.resize(static_cast<size_t>(o.streams));
  std::mt19937_64 rng(o.seed);
  if (o.random_access) {
    std::vector<uint64_t> pages(guest_pages);
    std::iota(pages.begin(), pages.end(), uint64_t{0});
    std::shuffle(pages.begin(), pages.end(), rng);
    for (int s = 0; s < o.streams; ++s) {
      for (uint64_t i = slice_begin(total, o.streams, s); i < slice_begin(total, o.streams, s + 1); ++i) {
        t.streams[static_cast<size_t>(s)].push_back(pages[i] * kTracePage);
      }
    }
    return t;
  }
  std::vector<uint8_t> taken(guest_pages);
  StreamGenerator generator(taken, rng);
  for (int s = 0; s < o.streams; ++s) {
    const uint64_t length = slice_begin(total, o.streams, s + 1) - slice_begin(total, o.streams, s);
    if (!generator.generate(length, t.streams[static_cast<size_t>(s)])) {
      return fail("trace: the guest is too full to place " + std::to_string(total) + " pages in extents", ENOSPC);
    }
  }
  return t;
}

TraceShape measure_shape(const Trace& trace) {
  TraceShape shape;
  shape.pages = trace.pages();
  if (shape.pages == 0) return shape;
  uint64_t next = 0, backward = 0, single_runs = 0;
  for (const auto& s : trace.streams) {
    uint64_t run = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      ++run;
      const bool continues = i + 1 < s.size() && s[i + 1] == s[i] + kTracePage;
      if (continues) {
        ++next;
        continue;
      }
      if (i + 1 < s.size() && s[i + 1] < s[i]) ++backward;
      ++shape.runs;
      if (run == 1) ++single_runs;
      shape.longest_run_pages = std::max(shape.longest_run_pages, run);
      run = 0;
    }
  }
  // Blocks: every page's 64 KiB block, counted once.
  std::vector<uint64_t> blocks;
  blocks.reserve(shape.pages);
  for (const auto& s : trace.streams) {
    for (uint64_t off : s) blocks.push_back(off / (kTracePage * kTraceBlockPages));
  }
  std::sort(blocks.begin(), blocks.end());
  uint64_t block_count = 0, full = 0;
  for (size_t i = 0; i < blocks.size();) {
    size_t j = i;
    while (j < blocks.size() && blocks[j] == blocks[i]) ++j;
    ++block_count;
    if (j - i == kTraceBlockPages) ++full;
    i = j;
  }
  const double n = static_cast<double>(shape.pages);
  shape.next_page_share = static_cast<double>(next) / n;
  shape.backward_jump_share = static_cast<double>(backward) / n;
  shape.block_use = n / static_cast<double>(block_count * kTraceBlockPages);
  shape.full_block_share = static_cast<double>(full) / static_cast<double>(block_count);
  shape.mean_run_pages = n / static_cast<double>(shape.runs);
  shape.single_page_run_share = static_cast<double>(single_runs) / static_cast<double>(shape.runs);
  return shape;
}

WorkingSet to_working_set(const Trace& trace) {
  WorkingSet set;
  set.page_size = static_cast<uint32_t>(kTracePage);
  set.memory_file_size = trace.guest_bytes;
  set.offsets.reserve(trace.pages());
  for (const auto& s : trace.streams) set.offsets.insert(set.offsets.end(), s.begin(), s.end());
  return set;
}

Result<Trace> trace_from_working_set(const WorkingSet& set, int streams) {
  if (set.page_size != kTracePage) {
    return fail("trace: a record of " + std::to_string(set.page_size) + "-byte pages (replay takes 4 KiB pages)",
                EINVAL);
  }
  if (streams < 1 || streams > 64) return fail("trace: 1 to 64 streams", EINVAL);
  Trace t;
  t.guest_bytes = set.memory_file_size;
  t.streams.resize(static_cast<size_t>(streams));
  const uint64_t n = set.offsets.size();
  for (int s = 0; s < streams; ++s) {
    t.streams[static_cast<size_t>(s)].assign(set.offsets.begin() + static_cast<ptrdiff_t>(slice_begin(n, streams, s)),
                                             set.offsets.begin() + static_cast<ptrdiff_t>(slice_begin(n, streams, s + 1)));
  }
  return t;
}

Status write_trace(const std::string& path, const Trace& trace) {
  return write_working_set(path, to_working_set(trace));
}

Result<Trace> read_trace(const std::string& path, int streams) {
  // The memory-file size the record names (its header, offset 16, see
  // snapshot/working_set.h), so that read_working_set checks the record
  // against it: replay makes its memory file to that size.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open the trace " + path);
  uint64_t memory_file_size = 0;
  if (::pread(fd.get(), &memory_file_size, sizeof memory_file_size, 16) != sizeof memory_file_size) {
    return fail("the trace " + path + " is too short to be a working-set file", EINVAL);
  }
  auto set = read_working_set(path, memory_file_size);
  if (!set) return fail(path + ": " + set.error().describe(), set.error().code);
  if (set->offsets.empty()) return fail("the trace " + path + " has no pages", EINVAL);
  // A replay touches each page once: a record lists first touches, so a
  // page twice means this is not one.
  std::vector<uint64_t> sorted = set->offsets;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return fail("the trace " + path + " lists a page twice: not a first-touch record", EINVAL);
  }
  return trace_from_working_set(*set, streams);
}

std::string describe_shape(const TraceShape& s) {
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%llu pages; next page follows %.1f %% of touches; 64 KiB blocks touched %.1f %% used, %.1f %% "
                "fully; %llu runs, mean %.1f pages, longest %llu, %.1f %% single pages; backward jumps after %.1f "
                "%% of touches",
                static_cast<unsigned long long>(s.pages), 100 * s.next_page_share, 100 * s.block_use,
                100 * s.full_block_share, static_cast<unsigned long long>(s.runs), s.mean_run_pages,
                static_cast<unsigned long long>(s.longest_run_pages), 100 * s.single_page_run_share,
                100 * s.backward_jump_share);
  return buf;
}

}  // namespace faultline::bench
