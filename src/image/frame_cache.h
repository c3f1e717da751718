// FrameCache: decompressed frames kept in memory, bounded in bytes, shared by
// every image and every session of a daemon.
//
// Frames are keyed by their blob id (the SHA-256 of the compressed bytes) and
// by what their manifest expects of them and where they are read from
// (FrameKey), so a frame that several images or layers of one store share is
// decompressed and held once.
// A page fault on a compressed frame decompresses the whole frame once; the
// other pages of that frame are then served from here without I/O, which is
// what lets a session's event reader serve them itself (find() never loads).
//
// get() is single-flight: when several threads miss the same frame at once,
// one of them runs the loader and the others wait for its result (a failure
// too: it is handed to every waiter and not cached, so a later get() tries
// again). Eviction is least-recently-used over the whole cache: the capacity
// is one budget, however the frames spread over the shards (a cache of N
// bytes holds N bytes of frame memory), and the frame evicted is the one used
// longest ago of all. A frame counts the memory it holds (FrameBuffer::
// footprint(): its power-of-two slot, so a 300 KiB frame counts 512 KiB), and
// the free slots of partly used chunks beyond one chunk per slot size count
// too (FrameBuffer::free_slot_bytes(): memory only frames of their size can
// use, left behind when the frames held change size). A frame larger than
// the capacity is returned but not kept. Frames are handed out as shared
// pointers, so an evicted frame stays valid for whoever still holds it: the
// capacity bounds what the cache keeps, not what callers hold (each caller
// holds at most a few frames at a time). While a load is being inserted the
// cache may hold that one frame over the capacity; the inserting thread
// evicts back under it before it returns.
//
// Thread-safety: every method is safe from any thread. The key space is split
// into shards with a mutex each, so threads on different frames rarely meet;
// a hit allocates nothing. Evictions are serialized by one more mutex, taken
// before any shard's (never while holding one).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "image/blob_id.h"
#include "image/frame_buffer.h"

namespace faultline::image {

// What a frame is held under. Besides its blob id: the store it is read from
// (FrameCache::store_tag of BlobStore::identity) and what the manifest naming
// it expects (its decompressed size, its XXH3 checksum), each checked when
// the frame is loaded. Images share a held frame only when all of these
// agree, so a hit never hands out a frame of another size (which a copy of
// one of its pages would read past) or one another store's check let in.
struct FrameKey {
  BlobId id;
  uint64_t store = 0;
  uint64_t bytes = 0;
  std::optional<uint64_t> checksum;
  friend bool operator==(const FrameKey&, const FrameKey&) = default;
};

struct FrameKeyHash {
  size_t operator()(const FrameKey& k) const {
    return BlobIdHash{}(k.id) ^ (k.store * 0x9e3779b97f4a7c15ull) ^ (k.bytes << 1) ^ k.checksum.value_or(0);
  }
};

class FrameCache {
 public:
  using Frame = std::shared_ptr<const FrameBuffer>;
  using Loader = std::function<Result<FrameBuffer>()>;

  struct Stats {
    uint64_t hits = 0;    // get() or find() found the frame
    uint64_t misses = 0;  // get() ran the loader
    uint64_t waits = 0;   // get() waited for another thread's load of the same frame
    uint64_t loads_ahead = 0;  // load_ahead() ran the loader (also counted in misses)
    uint64_t load_failures = 0;
    uint64_t evictions = 0;
    uint64_t bytes = 0;   // memory the frames held now take (FrameBuffer::footprint)
    uint64_t frames = 0;  // frames held now
    uint64_t capacity = 0;
  };

  // `capacity_bytes`: most frame memory kept (0 keeps nothing: every
  // get() loads, concurrent ones still share one load).
  explicit FrameCache(uint64_t capacity_bytes);
  FrameCache(const FrameCache&) = delete;
  FrameCache& operator=(const FrameCache&) = delete;

  // A small number naming the store `identity` (BlobStore::identity), the
  // same for the same identity for the life of the process (never 0).
  static uint64_t store_tag(const std::string& identity);

  // The frame if it is held now; never loads, never waits for a load.
  Frame find(const FrameKey& key);
  // The frame, loading it with `load` (decompressed bytes) if it is not held.
  Result<Frame> get(const FrameKey& key, const Loader& load);
  // Read-ahead: loads the frame with `load` if it is neither held nor being
  // loaded, and returns it; returns null, having loaded nothing and waited
  // for nothing, when it is held (then marked recently used, so it stays as
  // long as what is read ahead after it) or another thread is loading it. A
  // get() of the frame while this load runs waits for it: one load, shared.
  Result<Frame> load_ahead(const FrameKey& key, const Loader& load);

  Stats stats() const;
  uint64_t capacity() const { return capacity_; }
  // The largest frame kept (the capacity): a larger one is handed out but
  // not kept, so loading it ahead is wasted.
  uint64_t largest_kept() const { return capacity_; }

 private:
  struct Load {
    bool done = false;
    Result<Frame> result = Frame{};
    std::condition_variable cv;
  };
  struct Entry {
    Frame frame;
    std::list<FrameKey>::iterator lru;  // position in Shard::lru (front: most recent)
    uint64_t last_use = 0;            // a tick of clock_: orders uses across shards
  };
  struct Shard {
    mutable std::mutex mu;
    std::unordered_map<FrameKey, Entry, FrameKeyHash> entries;
    std::unordered_map<FrameKey, std::shared_ptr<Load>, FrameKeyHash> loading;
    std::list<FrameKey> lru;
    uint64_t bytes = 0;
    uint64_t hits = 0, misses = 0, waits = 0, load_failures = 0, evictions = 0, loads_ahead = 0;
  };
  Shard& shard_of(const FrameKey& key) { return shards_[BlobIdHash{}(key.id) % shards_.size()]; }
  // Marks a held frame most recently used. REQUIRES: s.mu held.
  void touch(Shard& s, Entry& e);
  // REQUIRES: s.mu held. May leave the cache over its capacity: make_room().
  void insert(Shard& s, const FrameKey& key, const Frame& frame);
  // Frame memory kept beyond the capacity is over it: the frames held, and
  // the free slots of partly used chunks beyond kFreeSlotAllowance
  // (FrameBuffer::free_slot_bytes(), process-wide).
  bool over_budget() const;
  // Evicts the least recently used frames of the whole cache until it is not
  // over its budget, or holds nothing. REQUIRES: no shard's mu held.
  void make_room();
  // Runs `load` for a miss registered in s.loading as `mine`, keeps and
  // hands out the result. REQUIRES: s.mu not held.
  Result<Frame> finish_load(Shard& s, const FrameKey& key, const std::shared_ptr<Load>& mine, const Loader& load);

  // One 2 MiB chunk per slot size (64 KiB to 2 MiB, frame_buffer.h).
  static constexpr uint64_t kFreeSlotAllowance = 6 * FrameBuffer::kChunk;

  const uint64_t capacity_;
  std::vector<Shard> shards_;
  std::atomic<uint64_t> clock_{0};
  std::atomic<uint64_t> bytes_{0};  // held by every shard together
  std::mutex evict_mu_;
};

}  // namespace faultline::image
