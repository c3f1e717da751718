// faultline-layout-bench: what a fault pays to find its page, and what a
// handshake pays to validate its regions, for 1, 2, 64 and the most regions
// --max-regions allows: the sorted GuestLayout (binary search, O(n log n)
// validation) side by side with the linear code it replaced (a scan per
// lookup, pairwise validation), which is copied here as the baseline.
// Also the cost of the read section a worker enters around each fault's
// lookup (PublishedLayout::read: one seq_cst store), against the plain
// atomic load it replaced. The event reader, which serves most 4 KiB faults
// itself, publishes the layouts and needs no read section: it pays the
// "sorted (new)" column.
//
// A program that prints figures; nothing here is a test.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <optional>
#include <random>
#include <vector>

#include "guest/layout.h"
#include "server/published_layout.h"

namespace faultline {
namespace {

// The layout code before it was sorted (src/guest/layout.cc at 8a91ed7):
// pairwise overlap checks in create(), a scan of every segment per lookup.
class LinearLayout {
 public:
  static std::optional<LinearLayout> create(const std::vector<GuestRegion>& regions, uint64_t file) {
    LinearLayout l;
    for (size_t i = 0; i < regions.size(); ++i) {
      const GuestRegion& r = regions[i];
      if (r.size == 0 || r.base_host_virt_addr % r.page_size || r.size % r.page_size || r.offset % r.page_size ||
          r.offset + r.size > file) {
        return std::nullopt;
      }
      for (size_t j = 0; j < i; ++j) {
        const GuestRegion& o = regions[j];
        if (r.base_host_virt_addr < o.end() && o.base_host_virt_addr < r.end()) return std::nullopt;
        if (r.offset < o.offset + o.size && o.offset < r.offset + r.size) return std::nullopt;
      }
      l.segments_.push_back(Segment{r.base_host_virt_addr, r.size, r.offset, r.page_size, l.pages_, uint32_t(i)});
      l.pages_ += r.size / r.page_size;
    }
    return l;
  }
  // Out of line, as it was in layout.cc: inlined into the benchmark loop it
  // would be flattered by a call the real fault path makes.
  [[gnu::noinline]] std::optional<PageLocation> locate(uint64_t address) const {
    for (const Segment& g : segments_) {
      if (address < g.base || address >= g.end()) continue;
      const uint64_t in = (address - g.base) / g.page_size;
      return PageLocation{g.region, g.first_page + in, g.base + in * g.page_size, g.offset + in * g.page_size,
                          g.page_size};
    }
    return std::nullopt;
  }

 private:
  std::vector<Segment> segments_;
  uint64_t pages_ = 0;
};

// `n` regions of 64 KiB .. 1 MiB laid out as a VMM would (in address order,
// with gaps), offsets back to back in the file.
std::vector<GuestRegion> regions_of(size_t n, uint64_t* file_size) {
  std::mt19937_64 rng(n);
  std::vector<GuestRegion> regions(n);
  uint64_t address = 0x7f0000000000, offset = 0;
  for (GuestRegion& r : regions) {
    r.page_size = kPageSize4K;
    r.size = (16 + rng() % 240) * 4096;
    r.base_host_virt_addr = address;
    r.offset = offset;
    address += r.size + (1 + rng() % 4) * 2 * 1024 * 1024;
    offset += r.size;
  }
  *file_size = offset;
  return regions;
}

// Fault addresses in random order, spread over every region or (`first_only`)
// all in the first one, as when a guest works in its low memory.
std::vector<uint64_t> fault_addresses(const std::vector<GuestRegion>& regions, size_t count, bool first_only) {
  std::mt19937_64 rng(42);
  std::vector<uint64_t> out(count);
  for (uint64_t& a : out) {
    const GuestRegion& r = regions[first_only ? 0 : rng() % regions.size()];
    a = r.base_host_virt_addr + (rng() % (r.size / 4096)) * 4096 + rng() % 4096;
  }
  return out;
}

using Clock = std::chrono::steady_clock;

// Best of `reps` runs of fn() (which does `ops` operations), in ns per op.
template <typename F>
double best_ns_per_op(int reps, size_t ops, F&& fn) {
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count();
    best = std::min(best, ns / static_cast<double>(ops));
  }
  return best;
}

volatile uint64_t g_sink;

}  // namespace
}  // namespace faultline

int main() {
  using namespace faultline;
  constexpr size_t kLookups = 1 << 20;
  for (const bool first_only : {false, true}) {
  std::printf("%slocate(): ns per lookup, random addresses %s (best of 7 runs of %zu)\n", first_only ? "\n" : "",
              first_only ? "all in the first region" : "over every region", kLookups);
  std::printf("%10s %12s %12s %14s %14s\n", "regions", "linear (old)", "sorted (new)", "new + read()", "old + load");
  std::printf("%10s %12s %12s %14s %14s\n", "", "", "(the reader)", "(a worker)", "(a worker)");
  for (size_t n : {size_t{1}, size_t{2}, size_t{3}, size_t{64}, size_t{kMaxRegionsCeiling}}) {
    uint64_t file = 0;
    const auto regions = regions_of(n, &file);
    const auto addresses = fault_addresses(regions, kLookups, first_only);
    auto linear = LinearLayout::create(regions, file);
    auto sorted = GuestLayout::create(regions, file);
    if (!linear || !sorted) return 1;
    const double old_ns = best_ns_per_op(7, kLookups, [&] {
      uint64_t sum = 0;
      for (uint64_t a : addresses) sum += linear->locate(a)->page_index;
      g_sink = sum;
    });
    const double new_ns = best_ns_per_op(7, kLookups, [&] {
      uint64_t sum = 0;
      for (uint64_t a : addresses) sum += sorted->locate(a)->page_index;
      g_sink = sum;
    });
    // What a worker does per fault now: enter a read section, look up, leave;
    // against what it did before: an acquire load of the layout pointer.
    PublishedLayout published(*sorted, 1);
    const double guarded_ns = best_ns_per_op(7, kLookups, [&] {
      uint64_t sum = 0;
      for (uint64_t a : addresses) sum += published.read(0)->locate(a)->page_index;
      g_sink = sum;
    });
    std::atomic<const LinearLayout*> old_pointer{&*linear};
    const double loaded_ns = best_ns_per_op(7, kLookups, [&] {
      uint64_t sum = 0;
      for (uint64_t a : addresses) sum += old_pointer.load(std::memory_order_acquire)->locate(a)->page_index;
      g_sink = sum;
    });
    std::printf("%10zu %12.1f %12.1f %14.1f %14.1f\n", n, old_ns, new_ns, guarded_ns, loaded_ns);
  }
  }

  std::printf("\ncreate(): ms per call, valid regions (best of 3)\n");
  std::printf("%10s %12s %12s\n", "regions", "linear (old)", "sorted (new)");
  for (size_t n : {size_t{64}, size_t{1024}, size_t{kMaxRegionsCeiling}}) {
    uint64_t file = 0;
    const auto regions = regions_of(n, &file);
    const double old_ms = best_ns_per_op(3, 1, [&] { g_sink = LinearLayout::create(regions, file).has_value(); }) / 1e6;
    const double new_ms = best_ns_per_op(3, 1, [&] { g_sink = GuestLayout::create(regions, file).has_value(); }) / 1e6;
    std::printf("%10zu %12.3f %12.3f\n", n, old_ms, new_ms);
  }
  return 0;
}
