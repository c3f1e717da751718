// Touching guest memory from host threads, the way a restored guest's first
// accesses reach the memory server: every first read or write of a missing
// page blocks in the kernel until the server installs it.
//
// Every read is verified (Verifier::verify_page compares the guest page
// itself, so the comparison is the touch); every write stamps
// fill_write_pattern(tag, offset) over the whole page and records it.
//
// touch_pages() is safe to call from any thread; concurrent calls must touch
// disjoint pages (see Verifier). It owns the threads it starts and joins them
// before returning.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "client/firecracker_client.h"
#include "client/verifier.h"
#include "common/error.h"

namespace faultline::client {

enum class Access { kRead, kWrite, kReadThenWrite };
enum class PageOrder { kSequential, kRandom };

// kDisjoint: the pages are split into one contiguous slice per thread.
// kIdentical: every thread touches every page, so several threads fault on the
// same missing page at once (a server must wake them all). Reads and writes
// are then done in two barrier-separated phases, all reads first: a read racing
// another thread's write of the same page has no single right answer.
enum class ThreadSharing { kDisjoint, kIdentical };

struct PageTouch {
  uint64_t offset = 0;  // page-aligned guest offset
  Access access = Access::kRead;
};

struct TouchOptions {
  int threads = 1;
  ThreadSharing sharing = ThreadSharing::kDisjoint;
  // Non-zero; written as the first qword of each written page.
  uint64_t write_tag = 0x57524954455441ull;  // "ATETIRW"
};

struct TouchResult {
  uint64_t pages_touched = 0;  // distinct pages in the plan
  uint64_t page_reads = 0;     // verified reads, over all threads
  uint64_t page_writes = 0;    // page writes, over all threads
  uint64_t mismatches = 0;     // mismatching reads found by this call
  std::chrono::nanoseconds elapsed{0};
};

// Pages of `page_count` pages of `page_size` bytes: `fraction` of them, chosen
// with `seed`, as guest offsets in sequential or seeded random order.
std::vector<uint64_t> select_pages(uint64_t page_count, uint64_t page_size, double fraction,
                                   PageOrder order, uint64_t seed);

// Builds a plan from `offsets`, `write_fraction` of them (chosen with `seed`)
// with kReadThenWrite and the rest with kRead, order kept.
std::vector<PageTouch> plan_touches(std::span<const uint64_t> offsets, double write_fraction,
                                    uint64_t seed);

// Touches the pages of `plan` from options.threads host threads.
// REQUIRES: a server holds the client's uffd (else the threads block forever).
Result<TouchResult> touch_pages(FirecrackerClient& client, Verifier& verifier,
                                std::span<const PageTouch> plan, const TouchOptions& options = {});

// Convenience: every page of `offsets` with the same access.
Result<TouchResult> touch_pages(FirecrackerClient& client, Verifier& verifier,
                                std::span<const uint64_t> offsets, Access access,
                                const TouchOptions& options = {});

}  // namespace faultline::client
