// Session, part two: installing ahead of faults (prefault(), the --prefetch
// threads) and the first-touch record (--record). Part one, session.cc: the
// session's life, the event reader and the install workers.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "server/session.h"
#include "server/session_threads.h"
#include "server/test_hooks.h"

namespace faultline {

using session_detail::hex;
using session_detail::name_this_thread;
using session_detail::start_thread;
using std::chrono::microseconds;
using std::chrono::milliseconds;

namespace {
// Gap filling for working-set prefetch (PrefaultOptions::max_gap_pages).
// Measured with faultline-bench scenario 2 (a 12 % dense random set): gaps
// of 8 were no faster than none (27-30 ms vs 17-24 ms for 4096 pages), the
// extra copying eating what fewer ioctls saved. Off until a denser set says
// otherwise.
constexpr uint64_t kPrefetchMaxGapPages = 0;
}  // namespace

Result<PrefaultReport> Session::prefault(std::span<const uint64_t> page_indexes, const PrefaultOptions& options) {
  std::lock_guard serial(prefault_mu_);
  // Called from threads that are not the session's (the control socket):
  // whatever goes wrong comes back as an error, never as an exception.
  try {
    return prefault_in_slot(page_indexes, options, workers_.size());  // the fence slot reserved for prefault()
  } catch (const std::exception& e) {
    return fail(std::string("prefault stopped on an unexpected exception: ") + e.what());
  }
}

Result<PrefaultReport> Session::prefault_in_slot(std::span<const uint64_t> page_indexes,
                                                 const PrefaultOptions& options, size_t slot) {
  using namespace std::chrono;
  PrefaultReport report;

  std::vector<uint64_t> pages(page_indexes.begin(), page_indexes.end());
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  if (!pages.empty() && pages.back() >= pages_->size()) {
    return fail("prefault: page " + std::to_string(pages.back()) + " is beyond the guest's " +
                std::to_string(pages_->size()) + " pages");
  }

  const uint64_t buffer_bytes = std::max<uint64_t>(options.max_run_bytes, kPageSize2M);
  std::unique_ptr<uint8_t, void (*)(void*)> buffer(static_cast<uint8_t*>(std::aligned_alloc(4096, buffer_bytes)),
                                                   std::free);
  if (!buffer) return fail("prefault: allocating its " + std::to_string(buffer_bytes) + "-byte buffer failed", ENOMEM);

  size_t i = 0;
  // Set after a run failed whole with ENOENT: the next run is its first page
  // alone (a run over two VMAs of one region cannot be installed in one copy).
  bool single_page = false;
  while (i < pages.size()) {
    if (stopping_.load(std::memory_order_acquire)) return fail("prefault: the session ended");
    // Demand faults first: a guest thread waiting on a fault matters more
    // than a page it may never touch.
    if (options.yield_to_demand) {
      while (demand_pending() && !stopping_.load(std::memory_order_acquire)) {
        const uint32_t seen = reader_progress_.value();
        reader_progress_.wait(seen, microseconds{200});
      }
    }
    // Build a run: contiguous page indexes of one region, all untouched.
    // The read slot of prefault_in_slot() is its fence slot.
    const PublishedLayout::Reader layout_view = layout_->read(slot);
    const GuestLayout& layout_now = *layout_view;
    const std::optional<PageLocation> located = layout_now.page(pages[i]);
    if (!located) {
      report.skipped_unmapped++;
      ++i;
      continue;
    }
    const PageLocation first = *located;
    const PageState first_state = pages_->state(pages[i]);
    if (first_state != PageState::kUntouched) {
      // Removed pages are never brought back; installed ones never overwritten.
      (PageStateTable::serves_zero(first_state) ? report.skipped_removed : report.skipped_present)++;
      ++i;
      continue;
    }
    // Runs are all-data or all-zero (zero index): zero runs are installed
    // without reading the file.
    const bool zero_run = snapshot_known_zero(first.file_offset, first.page_size);
    // Extend the run page by page while the pages stay untouched, of the same
    // zero class, in the same region and contiguous both in the client's
    // address space and in the file (two regions may sit side by side in
    // memory with their bytes apart in the file: one read serves one
    // region's pages only); a gap of up to
    // max_gap_pages unplanned pages is filled too, because one large copy
    // costs less than several small ones (the extra pages are snapshot bytes
    // the guest may or may not use, never a wrong byte).
    const uint64_t base = pages[i];
    uint64_t run = 1;  // pages in the run, gap fill included
    size_t next = i + 1;  // first entry of `pages` not covered by the run
    const uint64_t max_pages = single_page ? 1 : std::max<uint64_t>(1, options.max_run_bytes / first.page_size);
    single_page = false;
    while (next < pages.size() && pages[next] - base < max_pages &&
           pages[next] - (base + run - 1) - 1 <= (first.page_size == kPageSize4K ? options.max_gap_pages : 0)) {
      const uint64_t target = pages[next] - base + 1;  // run length that reaches pages[next]
      uint64_t k = run;
      for (; k < target; ++k) {
        const std::optional<PageLocation> at = layout_now.page(base + k);
        if (!at || at->region != first.region || at->address != first.address + k * first.page_size ||
            at->file_offset != first.file_offset + k * first.page_size ||
            pages_->state(base + k) != PageState::kUntouched ||
            snapshot_known_zero(first.file_offset + k * first.page_size, first.page_size) != zero_run) {
          break;
        }
      }
      if (k < target) {
        run = k;  // what stayed contiguous; trailing gap pages are dropped below
        break;
      }
      run = target;
      ++next;
    }
    // Drop a trailing stretch of gap pages: a run ends on a planned page.
    while (run > 1 && std::find(pages.begin() + static_cast<std::ptrdiff_t>(i),
                                pages.begin() + static_cast<std::ptrdiff_t>(next), base + run - 1) ==
                          pages.begin() + static_cast<std::ptrdiff_t>(next)) {
      --run;
    }
    const uint64_t len = run * first.page_size;
    // Storage I/O before the fence, in one large read.
    const bool use_zeropage = zero_run && !region_wp_[first.region] && first.page_size == kPageSize4K;
    if (zero_run) {
      if (!use_zeropage) std::memset(buffer.get(), 0, len);
    } else if (auto s = read_source(first.file_offset, {buffer.get(), len}); !s) {
      end(SessionEnd::kFatal, s.error().describe());
      return std::unexpected(s.error());
    }
    HookContext hook{first.address, first.page_index};
    FAULTLINE_HOOK(HookPoint::kBeforePrefaultInstall, hook);
    // Inside the fence the installer re-checks every page: a REMOVE recorded
    // since the run was built ends the run before that page.
    const PageInstaller::Result installed = installer_->install_run({.slot = slot,
                                                                     .first_page = base,
                                                                     .address = first.address,
                                                                     .page_size = first.page_size,
                                                                     .pages = run,
                                                                     .staged = use_zeropage ? nullptr : buffer.get(),
                                                                     .protect = region_wp_[first.region],
                                                                     .write = false,
                                                                     .demand = false,
                                                                     .inject_errno = hook.inject_errno});
    const kernel::IoctlResult r = installed.ioctl;
    const uint64_t done_pages = installed.installed;
    report.installed_pages += done_pages;
    report.bytes += done_pages * first.page_size;
    // Skip the planned pages the run installed; the loop looks at the rest
    // again (a page that stopped the run is skipped there with its reason).
    while (i < pages.size() && pages[i] < base + done_pages) ++i;
    if (options.progress) options.progress(i);
    switch (r.outcome) {
      case kernel::IoctlOutcome::kDone:
        break;
      case kernel::IoctlOutcome::kExists:
        // The guest (or a fault) got there first: leave that page alone.
        report.skipped_present++;
        if (i < pages.size() && pages[i] == base + done_pages) ++i;
        break;
      case kernel::IoctlOutcome::kRetry: {
        // A copy that installed some pages and then met a present one also
        // ends in EAGAIN (the kernel reports any partial copy so): the loop
        // goes on at that page, which it then skips as present. With nothing
        // installed, a REMOVE is pending: wait until the reader has read it,
        // then the loop re-checks every remaining page against it.
        if (done_pages > 0) break;
        report.retries++;
        const uint32_t seen = reader_progress_.value();
        reader_progress_.wait(seen, milliseconds{5});
        break;
      }
      case kernel::IoctlOutcome::kGone:
        end(SessionEnd::kPeerGone);
        return fail("prefault: the client process is gone", ESRCH);
      case kernel::IoctlOutcome::kUnmapped:
        if (run > 1 && done_pages == 0) {
          single_page = true;  // the same first page again, alone
          break;
        }
        report.skipped_unmapped++;
        if (i < pages.size() && pages[i] == base + done_pages) ++i;
        break;
      case kernel::IoctlOutcome::kFailed:
        return fail("prefault install at " + hex(first.address) + " failed", r.error);
    }
  }
  prefaulted_pages_.fetch_add(report.installed_pages, std::memory_order_relaxed);
  prefaulted_bytes_.fetch_add(report.bytes, std::memory_order_relaxed);
  return report;
}

}  // namespace faultline

namespace faultline {

// --- record and prefetch ---------------------------------------------------

uint64_t Session::recorded_pages() const {
  std::lock_guard lock(record_mu_);
  return first_touches_.size();
}

Status Session::write_record(const std::string& path) const { return write_working_set(path, recorded_working_set()); }

WorkingSet Session::recorded_working_set() const {
  WorkingSet set;
  set.page_size = static_cast<uint32_t>(layout()->regions().front().page_size);
  set.memory_file_size = source_->size();
  {
    std::lock_guard lock(record_mu_);
    set.offsets = first_touches_;
  }
  return set;
}

void Session::prefetch_loop() {
  const auto started = std::chrono::steady_clock::now();
  std::vector<uint64_t> plan;
  if (config_.prefetch_all) {
    plan.resize(pages_->size());
    for (uint64_t i = 0; i < plan.size(); ++i) plan[i] = i;
  } else {
    // This thread's read slot is that of prefetch thread 0.
    const PublishedLayout::Reader l = layout_->read(workers_.size() + 1);
    plan.reserve(config_.prefetch->offsets.size());
    for (uint64_t off : config_.prefetch->offsets) {
      if (auto idx = l->page_at_offset(off)) plan.push_back(*idx);
    }
  }
  constexpr size_t kChunk = 4096;
  {
    // Each page once, at its first touch; then each chunk sorted as
    // prefault_in_slot() installs it (which leaves it as it is), so that
    // plan positions are install positions: what the read-ahead is told.
    std::vector<bool> seen(pages_->size());
    std::erase_if(plan, [&](uint64_t p) { return seen[p] ? true : (seen[p] = true, false); });
  }
  for (size_t at = 0; at < plan.size(); at += kChunk) {
    std::sort(plan.begin() + static_cast<std::ptrdiff_t>(at),
              plan.begin() + static_cast<std::ptrdiff_t>(std::min(at + kChunk, plan.size())));
  }
  for (uint64_t p : plan) pages_->mark_planned(p);
  // The source may load ahead of the installs (an image: frames from its
  // store, many at once). Stopped and joined before this function returns,
  // after the install threads (which report to it) are; it starts no load
  // once the session is stopping.
  std::unique_ptr<ReadAhead> read_ahead;
  if (config_.prefetch_fetches > 0 && !plan.empty()) {
    std::vector<SourceRange> ranges(plan.size());
    {
      const PublishedLayout::Reader l = layout_->read(workers_.size() + 1);
      for (size_t k = 0; k < plan.size(); ++k) {
        if (auto loc = l->page(plan[k])) ranges[k] = {loc->file_offset, loc->page_size};
      }
    }
    read_ahead = source_->read_ahead(
        std::move(ranges),
        {.fetches = config_.prefetch_fetches, .cancelled = &stopping_, .load_deadline = config_.source_retry_deadline});
  }
  // In first-touch order, a chunk at a time: each chunk is sorted and
  // coalesced into large runs by prefault(), so the pages the guest needs
  // first come first and the file is still read in large sequential pieces.
  // prefetch_threads threads take the next chunk as they finish one.
  std::atomic<size_t> next_chunk{0};
  std::mutex mu;  // guards total and error
  PrefaultReport total;
  std::string error;
  auto install = [&](size_t thread_index) {
    const size_t slot = workers_.size() + 1 + thread_index;
    for (;;) {
      const size_t at = next_chunk.fetch_add(kChunk, std::memory_order_relaxed);
      if (at >= plan.size() || stopping_.load(std::memory_order_acquire)) return;
      const size_t n = std::min(kChunk, plan.size() - at);
      // Working sets are scattered: fill small gaps so that copies stay large.
      PrefaultOptions options;
      options.max_gap_pages = config_.prefetch_all ? 0 : kPrefetchMaxGapPages;
      size_t reported = 0;  // pages of this chunk told to the read-ahead
      if (read_ahead) {
        options.progress = [&](size_t done) {
          read_ahead->consumed(at + reported, at + done);
          reported = std::max(reported, done);
        };
      }
      auto r = prefault_in_slot(std::span<const uint64_t>(plan.data() + at, n), options, slot);
      if (read_ahead) read_ahead->consumed(at + reported, at + n);
      std::lock_guard lock(mu);
      if (!r) {
        if (!stopping_.load(std::memory_order_acquire) && error.empty()) error = r.error().describe();
        next_chunk.store(plan.size(), std::memory_order_relaxed);  // the others stop too
        return;
      }
      total.installed_pages += r->installed_pages;
      total.bytes += r->bytes;
      total.skipped_present += r->skipped_present;
      total.skipped_removed += r->skipped_removed;
      total.skipped_unmapped += r->skipped_unmapped;
      total.retries += r->retries;
    }
  };
  int threads = std::max(1, config_.prefetch_threads);
  {
    std::vector<std::thread> helpers;
    // Joined on every path: if this thread's own share throws, the helpers
    // stop after their current chunk before the exception ends the session.
    struct JoinHelpers {
      std::vector<std::thread>& threads;
      std::atomic<size_t>& next_chunk;
      size_t plan_size;
      ~JoinHelpers() {
        next_chunk.store(plan_size, std::memory_order_relaxed);
        for (auto& t : threads) {
          if (t.joinable()) t.join();
        }
      }
    } join_helpers{helpers, next_chunk, plan.size()};
    helpers.reserve(static_cast<size_t>(threads));
    for (int k = 1; k < threads; ++k) {
      try {
        helpers.push_back(start_thread("prefetch thread", [&, k] {
          run_guarded("prefetch thread", [&] {
            name_this_thread("fl-p" + std::to_string(config_.id) + "." + std::to_string(k));
            install(static_cast<size_t>(k));
          });
        }));
      } catch (const std::system_error& e) {
        // Prefetch only makes restores faster: go on with the threads there are.
        log_.warn("prefetch_thread_failed",
                  {{"session", config_.id}, {"threads", k}, {"error", std::string(e.what())}});
        threads = k;
        break;
      }
    }
    install(0);
  }
  // Stopped and joined here, after the installs: its counts are final.
  if (read_ahead) read_ahead->stop();
  const ReadAheadStats ahead = read_ahead ? read_ahead->stats() : ReadAheadStats{};
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  log_.info("prefetch_done", {{"session", config_.id},
                              {"mode", config_.prefetch_all ? "all" : "working_set"},
                              {"planned_pages", plan.size()},
                              {"threads", threads},
                              {"prefetched_pages", total.installed_pages},
                              {"bytes", total.bytes},
                              {"already_present", total.skipped_present},
                              {"skipped_removed", total.skipped_removed},
                              {"retries", total.retries},
                              {"late_faults", prefetch_late_.load(std::memory_order_relaxed)},
                              {"read_ahead_fetches", ahead.fetches},
                              {"read_ahead_frames", ahead.loaded},
                              {"read_ahead_used", ahead.used},
                              {"read_ahead_evicted_unused", ahead.evicted_unused},
                              {"read_ahead_failed", ahead.failed},
                              {"seconds", seconds},
                              {"error", error}});
}

}  // namespace faultline
