// FrameReadAhead: an image's read-ahead (PageSource::read_ahead). It walks a
// plan of reads in order, resolves each to the frames it needs (each distinct
// frame once, at its first use) and loads them into the shared FrameCache
// with up to `fetches` loads in flight, so that a working-set prefetch from
// an object store waits on many GETs at once instead of one per installer.
//
// How far ahead: the frames loaded (or loading) and not yet consumed by the
// reader take at most `window_bytes` of decompressed bytes, a share of the
// cache's capacity, so what is read ahead is not pushed out by what is read
// ahead after it; the frame cache's capacity stays the hard memory bound.
// Frames are consumed when the reader reports the plan entry of their first
// use (ReadAhead::consumed). A frame the cache holds already, or that another
// thread is loading, is not loaded again (FrameCache::load_ahead); a get() of
// a frame while it loads ahead shares that one load.
//
// Counts: a frame loaded ahead is "used" when it is still in memory (the
// cache, or the reader) as the reader consumes its entry, "evicted unused"
// when it is not (the cache pushed it out first, and the reader loaded it
// again). A failed load is only counted: the reader loads the frame itself
// and meets the real error there.
//
// Stopping: no load starts once stop() was called or options.cancelled reads
// true, and a load in flight is cancelled then (its store request through
// a ScopedDeadline, common/deadline.h, which also ends it after
// options.load_deadline); stop() and the destructor join the fetch threads.
// A cancelled load fails retryable, so a fault that waited for it loads the
// frame itself.
//
// Thread-safety: every method is safe from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

#include "image/frame_cache.h"
#include "image/image_chain.h"
#include "source/page_source.h"

namespace faultline::image {

class FrameReadAhead final : public ReadAhead {
 public:
  // Starts `fetches` threads (fewer if some cannot be created). REQUIRES:
  // `chain` and `cache` outlive this object.
  FrameReadAhead(const ImageChain& chain, FrameCache& cache, std::vector<SourceRange> plan,
                 const ReadAheadOptions& options, uint64_t window_bytes);
  ~FrameReadAhead() override;
  FrameReadAhead(const FrameReadAhead&) = delete;
  FrameReadAhead& operator=(const FrameReadAhead&) = delete;

  void consumed(size_t from, size_t to) override;
  void stop() override;
  ReadAheadStats stats() const override;
  // Fetch threads running (for tests and the log).
  size_t threads() const { return threads_.size(); }

 private:
  // A frame to load: where it is first used in the plan.
  struct Candidate {
    size_t position = 0;
    uint32_t layer = 0;
    uint64_t frame = 0;
    BlobId id;
    uint64_t bytes = 0;
  };
  // A frame loading or loaded ahead, not yet consumed.
  struct Ahead {
    uint64_t bytes = 0;
    bool loading = true;
    bool consumed_while_loading = false;
    std::weak_ptr<const FrameBuffer> frame;  // expires when the cache and the reader dropped it
  };
  // Keyed by (first plan position, sequence): one entry of the plan may need
  // several frames (a 2 MiB page of a 4 KiB-page image).
  using AheadKey = std::pair<size_t, uint64_t>;

  void fetch_loop();
  // REQUIRES: mu_ held. The next frame of the plan that is not consumed,
  // not seen before and small enough for the cache to keep; nullopt at the
  // end of the plan.
  std::optional<Candidate> next_candidate();
  // REQUIRES: mu_ held. The end of the consumed interval holding
  // `position`, or `position` when it is not consumed.
  size_t consumed_until(size_t position) const;
  // REQUIRES: mu_ held. Frees the window share of `it` and forgets it.
  void release(std::map<AheadKey, Ahead>::iterator it);

  const ImageChain& chain_;
  FrameCache& cache_;
  const std::vector<SourceRange> plan_;
  const uint64_t window_bytes_;
  const std::atomic<bool>* const cancelled_;
  const std::chrono::milliseconds load_deadline_;
  std::atomic<bool> abort_{false};  // set by stop(): loads in flight give up

  mutable std::mutex mu_;
  std::condition_variable room_;                 // the window has room again, or stopping_
  bool stopping_ = false;                        // GUARDED_BY(mu_)
  size_t entry_ = 0;                             // GUARDED_BY(mu_): plan entry being resolved
  uint64_t entry_page_ = 0;                      // GUARDED_BY(mu_): next image page of that entry
  std::optional<Candidate> next_;                // GUARDED_BY(mu_): found, waiting for room
  std::unordered_set<BlobId, BlobIdHash> seen_;  // GUARDED_BY(mu_)
  std::map<size_t, size_t> consumed_;            // GUARDED_BY(mu_): consumed entries, [from, to) merged
  std::map<AheadKey, Ahead> ahead_;              // GUARDED_BY(mu_)
  uint64_t ahead_bytes_ = 0;                     // GUARDED_BY(mu_)
  uint64_t sequence_ = 0;                        // GUARDED_BY(mu_)
  ReadAheadStats stats_;                         // GUARDED_BY(mu_)
  std::mutex join_mu_;                           // stop() from two threads joins once
  std::vector<std::thread> threads_;
};

}  // namespace faultline::image
