#include "image/frame_read_ahead.h"

#include <pthread.h>

#include <algorithm>
#include <string>
#include <system_error>

#include "common/deadline.h"

namespace faultline::image {

FrameReadAhead::FrameReadAhead(const ImageChain& chain, FrameCache& cache, std::vector<SourceRange> plan,
                               const ReadAheadOptions& options, uint64_t window_bytes)
    : chain_(chain),
      cache_(cache),
      plan_(std::move(plan)),
      window_bytes_(window_bytes),
      cancelled_(options.cancelled),
      load_deadline_(options.load_deadline) {
  const int fetches = options.fetches;
  threads_.reserve(static_cast<size_t>(std::max(fetches, 0)));
  for (int k = 0; k < fetches; ++k) {
    try {
      threads_.emplace_back([this, k] {
        const std::string name = "fl-ra" + std::to_string(k);
        ::pthread_setname_np(::pthread_self(), name.c_str());
        fetch_loop();
      });
    } catch (const std::system_error&) {
      break;  // read-ahead only makes prefetch faster: go on with the threads
              // there are
    }
  }
  std::lock_guard lock(mu_);
  stats_.fetches = static_cast<int>(threads_.size());
}

FrameReadAhead::~FrameReadAhead() { stop(); }

void FrameReadAhead::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  abort_.store(true, std::memory_order_release);
  room_.notify_all();
  std::lock_guard join(join_mu_);
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

std::optional<FrameReadAhead::Candidate> FrameReadAhead::next_candidate() {
  const uint64_t page_size = chain_.page_size();
  while (entry_ < plan_.size()) {
    // Skip entries the reader is already done with: loading for them is late.
    if (const size_t done_to = consumed_until(entry_); done_to > entry_) {
      entry_ = done_to;
      entry_page_ = 0;
      continue;
    }
    const SourceRange& r = plan_[entry_];
    const uint64_t first = r.offset / page_size;
    const uint64_t end = r.length == 0 ? first : (r.offset + r.length - 1) / page_size + 1;
    const uint64_t page = first + entry_page_;
    if (page >= end || page >= chain_.guest_pages()) {
      ++entry_;
      entry_page_ = 0;
      continue;
    }
    ++entry_page_;
    const PageLocation loc = chain_.locate(page);
    if (loc.zero) continue;
    const FrameRef& ref = chain_.layers()[loc.layer].manifest.frames[loc.frame];
    const uint64_t bytes = static_cast<uint64_t>(ref.pages) * page_size;
    // Too large for the cache to keep: a load ahead would be fetched twice.
    if (bytes > cache_.largest_kept()) continue;
    if (!seen_.insert(ref.id).second) continue;
    return Candidate{entry_, loc.layer, loc.frame, ref.id, bytes};
  }
  return std::nullopt;
}

size_t FrameReadAhead::consumed_until(size_t position) const {
  auto c = consumed_.upper_bound(position);
  if (c == consumed_.begin() || std::prev(c)->second <= position) return position;
  return std::prev(c)->second;
}

void FrameReadAhead::release(std::map<AheadKey, Ahead>::iterator it) {
  ahead_bytes_ -= it->second.bytes;
  ahead_.erase(it);
}

void FrameReadAhead::fetch_loop() {
  // No exception leaves the thread: a read-ahead that fails only counts it
  // (the reader loads the frame itself).
  try {
    // Loads give up when the reader's flag is set too (its session
    // stopping), not only on stop().
    const ScopedDeadline reader_scope(std::chrono::steady_clock::time_point::max(), cancelled_);
    std::unique_lock lock(mu_);
    for (;;) {
      if (stopping_ || (cancelled_ != nullptr && cancelled_->load(std::memory_order_acquire))) return;
      if (!next_) next_ = next_candidate();
      if (!next_) return;  // the end of the plan
      if (consumed_until(next_->position) > next_->position) {
        next_.reset();  // the reader got there while this waited for room
        continue;
      }
      // Room in the window; with nothing ahead a frame always fits (a cache
      // of a few frames still gets one read ahead).
      if (ahead_bytes_ > 0 && ahead_bytes_ + next_->bytes > window_bytes_) {
        room_.wait(lock);
        continue;
      }
      const Candidate c = *next_;
      next_.reset();
      const AheadKey key{c.position, sequence_++};
      ahead_.emplace(key, Ahead{.bytes = c.bytes});
      ahead_bytes_ += c.bytes;
      lock.unlock();
      Result<FrameCache::Frame> got = [&] {
        const ScopedDeadline load_scope(deadline_in(load_deadline_), &abort_);
        return cache_.load_ahead(chain_.frame_key(c.layer, c.frame),
                                 [&] { return chain_.read_frame(c.layer, c.frame); });
      }();
      lock.lock();
      auto it = ahead_.find(key);
      if (!got || !*got) {
        // Failed, or held or loading already: nothing of ours to track.
        if (!got) ++stats_.failed;
        release(it);
        room_.notify_all();
        continue;
      }
      ++stats_.loaded;
      if (it->second.consumed_while_loading) {
        ++stats_.used;  // the reader waited for this very load
        release(it);
        room_.notify_all();
        continue;
      }
      it->second.loading = false;
      it->second.frame = *got;
    }
  } catch (const std::exception&) {
    std::lock_guard lock(mu_);
    ++stats_.failed;
  }
}

void FrameReadAhead::consumed(size_t from, size_t to) {
  if (from >= to) return;
  bool released = false;
  {
    std::lock_guard lock(mu_);
    // Merge [from, to) into the consumed intervals.
    auto it = consumed_.upper_bound(from);
    if (it != consumed_.begin() && std::prev(it)->second >= from) {
      --it;
      from = it->first;
      to = std::max(to, it->second);
      it = consumed_.erase(it);
    }
    while (it != consumed_.end() && it->first <= to) {
      to = std::max(to, it->second);
      it = consumed_.erase(it);
    }
    consumed_.emplace(from, to);
    for (auto a = ahead_.lower_bound({from, 0}); a != ahead_.end() && a->first.first < to;) {
      if (a->second.loading) {
        a->second.consumed_while_loading = true;  // counted when its load ends
        ++a;
        continue;
      }
      (a->second.frame.expired() ? stats_.evicted_unused : stats_.used)++;
      auto next = std::next(a);
      release(a);
      a = next;
      released = true;
    }
  }
  if (released) room_.notify_all();
}

ReadAheadStats FrameReadAhead::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace faultline::image
