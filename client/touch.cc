#include "client/touch.h"

#include <algorithm>
#include <barrier>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "client/test_memory_file.h"

namespace faultline::client {

std::vector<uint64_t> select_pages(uint64_t page_count, uint64_t page_size, double fraction,
                                   PageOrder order, uint64_t seed) {
  std::vector<uint64_t> pages(page_count);
  std::iota(pages.begin(), pages.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(pages.begin(), pages.end(), rng);
  const double clamped = std::clamp(fraction, 0.0, 1.0);
  pages.resize(static_cast<size_t>(static_cast<double>(page_count) * clamped + 0.5));
  if (order == PageOrder::kSequential) std::sort(pages.begin(), pages.end());
  for (uint64_t& p : pages) p *= page_size;
  return pages;
}

std::vector<PageTouch> plan_touches(std::span<const uint64_t> offsets, double write_fraction,
                                    uint64_t seed) {
  std::vector<PageTouch> plan;
  plan.reserve(offsets.size());
  for (uint64_t offset : offsets) {
    // A per-page coin from the seed: the same page gets the same fate for the
    // same seed whatever the order.
    const bool write = static_cast<double>(splitmix64(seed ^ splitmix64(offset)) >> 11) * 0x1.0p-53 <
                       write_fraction;
    plan.push_back(PageTouch{offset, write ? Access::kReadThenWrite : Access::kRead});
  }
  return plan;
}

namespace {

bool reads(Access a) { return a != Access::kWrite; }
bool writes(Access a) { return a != Access::kRead; }

struct ThreadCounts {
  uint64_t reads = 0;
  uint64_t writes = 0;
};

// Writes the whole page from a per-thread buffer; the first store faults it in
// with a write fault if it is missing.
void write_page(uint8_t* page, uint64_t offset, uint64_t tag, std::vector<uint8_t>& buffer) {
  fill_write_pattern(tag, offset, buffer);
  std::memcpy(page, buffer.data(), buffer.size());
}

}  // namespace

Result<TouchResult> touch_pages(FirecrackerClient& client, Verifier& verifier,
                                std::span<const PageTouch> plan, const TouchOptions& options) {
  const uint64_t page_size = client.page_size();
  if (options.threads < 1) return fail("touch_pages needs at least one thread");
  if (options.write_tag == 0) return fail("the write tag must be non-zero");
  for (const PageTouch& t : plan) {
    if (t.offset % page_size != 0 || t.offset >= client.guest_size()) {
      return fail("touch offset " + std::to_string(t.offset) + " is not a page of guest memory");
    }
  }
  const uint64_t mismatches_before = verifier.mismatches();
  const int threads = options.threads;
  std::vector<ThreadCounts> counts(static_cast<size_t>(threads));
  const auto start = std::chrono::steady_clock::now();

  if (options.sharing == ThreadSharing::kDisjoint) {
    auto worker = [&](int index) {
      std::vector<uint8_t> buffer(page_size);
      const size_t begin = plan.size() * static_cast<size_t>(index) / static_cast<size_t>(threads);
      const size_t end = plan.size() * static_cast<size_t>(index + 1) / static_cast<size_t>(threads);
      ThreadCounts& c = counts[static_cast<size_t>(index)];
      for (size_t i = begin; i < end; ++i) {
        const PageTouch& t = plan[i];
        uint8_t* page = client.guest_ptr(t.offset);
        if (reads(t.access)) {
          verifier.verify_page(t.offset, page);
          ++c.reads;
        }
        if (writes(t.access)) {
          write_page(page, t.offset, options.write_tag, buffer);
          verifier.record_host_write(t.offset, options.write_tag);
          ++c.writes;
        }
      }
    };
    std::vector<std::jthread> pool;
    for (int i = 0; i < threads; ++i) pool.emplace_back(worker, i);
  } else {
    // All threads read everything, wait, then all write the same bytes to the
    // same pages, wait; only then does the record change (by one thread), so no
    // read ever races a write or a record of its page.
    std::barrier phase(threads);
    auto worker = [&](int index) {
      std::vector<uint8_t> buffer(page_size);
      ThreadCounts& c = counts[static_cast<size_t>(index)];
      for (const PageTouch& t : plan) {
        if (!reads(t.access)) continue;
        verifier.verify_page(t.offset, client.guest_ptr(t.offset));
        ++c.reads;
      }
      phase.arrive_and_wait();
      for (const PageTouch& t : plan) {
        if (!writes(t.access)) continue;
        write_page(client.guest_ptr(t.offset), t.offset, options.write_tag, buffer);
        ++c.writes;
      }
      phase.arrive_and_wait();
      if (index == 0) {
        for (const PageTouch& t : plan) {
          if (writes(t.access)) verifier.record_host_write(t.offset, options.write_tag);
        }
      }
    };
    std::vector<std::jthread> pool;
    for (int i = 0; i < threads; ++i) pool.emplace_back(worker, i);
  }

  TouchResult result;
  result.elapsed = std::chrono::steady_clock::now() - start;
  result.pages_touched = plan.size();
  for (const ThreadCounts& c : counts) {
    result.page_reads += c.reads;
    result.page_writes += c.writes;
  }
  result.mismatches = verifier.mismatches() - mismatches_before;
  return result;
}

Result<TouchResult> touch_pages(FirecrackerClient& client, Verifier& verifier,
                                std::span<const uint64_t> offsets, Access access,
                                const TouchOptions& options) {
  std::vector<PageTouch> plan;
  plan.reserve(offsets.size());
  for (uint64_t offset : offsets) plan.push_back(PageTouch{offset, access});
  return touch_pages(client, verifier, plan, options);
}

}  // namespace faultline::client
