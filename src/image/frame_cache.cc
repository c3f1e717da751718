#include "image/frame_cache.h"

#include <algorithm>
#include <cerrno>
#include <exception>

#include "common/deadline.h"

namespace faultline::image {

namespace {
// Enough shards that concurrent sessions rarely share a lock, few enough that
// each keeps a useful share of the capacity (a shard holds frames of 512 KiB
// to 2 MiB).
size_t shard_count(uint64_t capacity) {
  return static_cast<size_t>(std::clamp<uint64_t>(capacity / (16ull << 20), 1, 16));
}
}  // namespace

uint64_t FrameCache::store_tag(const std::string& identity) {
  // Never destroyed: a daemon's threads may still open images while the
  // process exits.
  static auto* mu = new std::mutex;
  static auto* tags = new std::unordered_map<std::string, uint64_t>;
  std::lock_guard lock(*mu);
  return tags->try_emplace(identity, tags->size() + 1).first->second;
}

FrameCache::FrameCache(uint64_t capacity_bytes)
    : capacity_(capacity_bytes), shards_(shard_count(capacity_bytes)) {}

void FrameCache::touch(Shard& s, Entry& e) {
  s.lru.splice(s.lru.begin(), s.lru, e.lru);
  e.last_use = clock_.fetch_add(1, std::memory_order_relaxed) + 1;
}

FrameCache::Frame FrameCache::find(const FrameKey& key) {
  Shard& s = shard_of(key);
  std::lock_guard lock(s.mu);
  auto it = s.entries.find(key);
  if (it == s.entries.end()) return {};
  touch(s, it->second);
  ++s.hits;
  return it->second.frame;
}

Result<FrameCache::Frame> FrameCache::get(const FrameKey& key, const Loader& load) {
  Shard& s = shard_of(key);
  std::shared_ptr<Load> mine;
  {
    std::unique_lock lock(s.mu);
    if (auto it = s.entries.find(key); it != s.entries.end()) {
      touch(s, it->second);
      ++s.hits;
      return it->second.frame;
    }
    if (auto it = s.loading.find(key); it != s.loading.end()) {
      // Another thread is loading this frame: share its result, waiting no
      // longer than the calling thread's deadline (common/deadline.h: a
      // session's store deadline) for a load that may be stuck on a store.
      std::shared_ptr<Load> theirs = it->second;
      ++s.waits;
      const auto done = [&] { return theirs->done; };
      if (const std::optional<ThreadDeadline> deadline = current_deadline()) {
        if (!wait_unless_given_up(theirs->cv, lock, *deadline, done)) {
          return std::unexpected(Error{deadline->cancelled() ? ECANCELED : ETIMEDOUT,
                                       "waited for another thread's load of frame " + key.id.hex() +
                                           (deadline->cancelled() ? " until asked to stop" : " until the deadline"),
                                       /*retryable=*/true});
        }
      } else {
        theirs->cv.wait(lock, done);
      }
      return theirs->result;
    }
    mine = std::make_shared<Load>();
    s.loading.emplace(key, mine);
    ++s.misses;
  }
  return finish_load(s, key, mine, load);
}

Result<FrameCache::Frame> FrameCache::load_ahead(const FrameKey& key, const Loader& load) {
  Shard& s = shard_of(key);
  std::shared_ptr<Load> mine;
  {
    std::lock_guard lock(s.mu);
    if (auto it = s.entries.find(key); it != s.entries.end()) {
      touch(s, it->second);
      return Frame{};
    }
    if (s.loading.contains(key)) return Frame{};
    mine = std::make_shared<Load>();
    s.loading.emplace(key, mine);
    ++s.misses;
    ++s.loads_ahead;
  }
  return finish_load(s, key, mine, load);
}

Result<FrameCache::Frame> FrameCache::finish_load(Shard& s, const FrameKey& key, const std::shared_ptr<Load>& mine,
                                                  const Loader& load) {
  // The load (storage read, checksum, decompression) runs with no lock held.
  // A loader that throws (bad_alloc) must still release the waiters, or they
  // would wait forever.
  Result<Frame> result = Frame{};
  try {
    Result<FrameBuffer> bytes = load();
    if (bytes && key.bytes != 0 && bytes->size() != key.bytes) {
      // The loader checks the size too; held under this key, a frame of
      // another size would make the copies of its pages read past it.
      bytes = fail("frame " + key.id.hex() + " decompressed to " + std::to_string(bytes->size()) +
                       " bytes, its manifest says " + std::to_string(key.bytes),
                   EIO);
    }
    result = bytes ? Result<Frame>(std::make_shared<const FrameBuffer>(std::move(*bytes)))
                   : Result<Frame>(std::unexpected(bytes.error()));
  } catch (const std::exception& e) {
    result = std::unexpected(Error{ENOMEM, std::string("loading a frame failed: ") + e.what()});
  }
  {
    std::lock_guard lock(s.mu);
    s.loading.erase(key);
    if (result) {
      insert(s, key, *result);
    } else {
      ++s.load_failures;
    }
    mine->result = result;
    mine->done = true;
  }
  mine->cv.notify_all();
  if (result) make_room();
  return result;
}

void FrameCache::insert(Shard& s, const FrameKey& key, const Frame& frame) {
  // A frame counts the memory it holds (its slot), not only its bytes.
  if (frame->footprint() > capacity_) return;  // would evict everything and still not fit
  s.lru.push_front(key);
  s.entries.emplace(key, Entry{frame, s.lru.begin(), clock_.fetch_add(1, std::memory_order_relaxed) + 1});
  s.bytes += frame->footprint();
  bytes_.fetch_add(frame->footprint(), std::memory_order_relaxed);
}

bool FrameCache::over_budget() const {
  const uint64_t held = bytes_.load(std::memory_order_relaxed);
  if (held > capacity_) return true;
  // Free slots of partly used chunks are memory too, usable only by frames
  // of their size: past an allowance of one chunk per slot size (what a
  // steady mix of sizes leaves free), they count against the budget, and
  // the oldest frames go until chunks of the old size empty.
  const uint64_t free_slots = FrameBuffer::free_slot_bytes();
  return free_slots > kFreeSlotAllowance && held > 0 && held + free_slots > capacity_ + kFreeSlotAllowance;
}

void FrameCache::make_room() {
  if (!over_budget()) return;
  std::lock_guard evicting(evict_mu_);
  while (over_budget()) {
    // The least recently used frame of all is the oldest of the shards'
    // least recently used ones. Shard locks are taken one at a time; a frame
    // used meanwhile is no longer a tail, and the choice is made again.
    Shard* oldest = nullptr;
    uint64_t oldest_use = 0;
    for (Shard& s : shards_) {
      std::lock_guard lock(s.mu);
      if (s.lru.empty()) continue;
      const uint64_t use = s.entries.find(s.lru.back())->second.last_use;
      if (!oldest || use < oldest_use) {
        oldest = &s;
        oldest_use = use;
      }
    }
    if (!oldest) return;
    std::lock_guard lock(oldest->mu);
    if (oldest->lru.empty()) continue;
    auto victim = oldest->entries.find(oldest->lru.back());
    if (victim->second.last_use != oldest_use) continue;  // used since: look again
    const uint64_t size = victim->second.frame->footprint();
    oldest->bytes -= size;
    bytes_.fetch_sub(size, std::memory_order_relaxed);
    oldest->entries.erase(victim);
    oldest->lru.pop_back();
    ++oldest->evictions;
  }
}

FrameCache::Stats FrameCache::stats() const {
  Stats total;
  total.capacity = capacity_;
  for (const Shard& s : shards_) {
    std::lock_guard lock(s.mu);
    total.hits += s.hits;
    total.misses += s.misses;
    total.waits += s.waits;
    total.loads_ahead += s.loads_ahead;
    total.load_failures += s.load_failures;
    total.evictions += s.evictions;
    total.bytes += s.bytes;
    total.frames += s.entries.size();
  }
  return total;
}

}  // namespace faultline::image
