// DiskCache: a bounded directory of frames (blobs) fetched from a remote
// store, under the daemon's in-memory frame cache: a restart, or a second
// image sharing frames, reads them from local disk instead of the bucket.
//
//   DIR/<64 hex>          one file per blob, named by its SHA-256
//   DIR/.tmp-*            a write in progress (removed when the cache opens)
//
// - Bounded: at most `max_bytes` of blob files; putting a blob evicts the
//   least recently used ones first (use = put or a hit). A blob larger than
//   the whole cache is not cached.
// - Atomic: a blob is written to a temporary file and renamed into place, so
//   a name never shows a partial file.
// - Verified: every read checks the bytes, against the manifest's XXH3
//   checksum when the reader gives it, else against their name; a file that
//   does not match (a torn write after a crash, a bad disk) is deleted and
//   reported as a miss, never returned.
// - Persistent: open() indexes what DIR already holds (last use = the file's
//   modification time, which a hit refreshes), so a restarted daemon starts warm.
// - Outside the page cache where the file system allows (O_DIRECT): the frames
//   a daemon uses are in its in-memory frame cache already, so a second copy in
//   the page cache would be memory spent twice, and filling it is most of what
//   a put costs (see disk_cache.cc). Where O_DIRECT is refused (EINVAL: a file
//   system without it) the cache reads and writes through the page cache.
//
// Thread-safety: safe for concurrent use by the threads of one process. Two
// processes must not share one DIR (each keeps its own index and bound).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "image/blob_id.h"
#include "image/store.h"

namespace faultline::objstore {

class DiskCache {
 public:
  static Result<std::shared_ptr<DiskCache>> open(const std::string& dir, uint64_t max_bytes);

  // The blob's bytes, verified (against `checksum`, the blob's XXH3 from its
  // manifest, when given: the file is on this host's disk, where a checksum
  // catches damage; else against its name); nullopt on a miss (absent, or
  // damaged and now deleted).
  std::optional<std::string> get(const image::BlobId& id, std::optional<uint64_t> checksum = std::nullopt);
  // Stores the blob (REQUIRES: id == BlobId::of(bytes)), evicting as needed:
  // true when this call wrote it, false when it skipped it (held already,
  // larger than the bound, or no room while other puts write). An error (a
  // full disk) leaves the cache as it was, minus evicted blobs.
  Result<bool> put(const image::BlobId& id, std::string_view bytes);

  // The "writes are failing" episode every CachedStore of this cache shares
  // (one daemon, many images): true for the first failure of an episode,
  // the one to report; a put that wrote a file ends it.
  bool failure_starts_episode() { return !failing_.exchange(true); }
  void put_worked() { failing_.store(false); }

  struct Stats {
    uint64_t hits = 0, misses = 0, damaged = 0, evictions = 0, put_failures = 0;
    uint64_t bytes = 0, blobs = 0;
  };
  Stats stats() const;
  const std::string& dir() const { return dir_; }
  uint64_t max_bytes() const { return max_bytes_; }
  // Whether blob files are read and written with O_DIRECT (false once the
  // file system refused it; the cache then goes through the page cache).
  bool direct_io() const { return direct_io_.load(std::memory_order_relaxed); }

 private:
  DiskCache(std::string dir, uint64_t max_bytes) : dir_(std::move(dir)), max_bytes_(max_bytes) {}
  std::string path(const image::BlobId& id) const { return dir_ + "/" + id.hex(); }
  void touch_locked(const image::BlobId& id);
  void forget_locked(const image::BlobId& id);
  void probe_direct_io();  // direct_io() false when the file system refuses O_DIRECT
  Result<std::string> read_blob(const std::string& path);
  Status write_blob(int fd, std::string_view bytes);

  struct Entry {
    uint64_t bytes = 0;
    std::list<image::BlobId>::iterator in_order;
  };
  std::string dir_;
  uint64_t max_bytes_;
  mutable std::mutex mu_;
  std::list<image::BlobId> order_;  // least recently used first
  std::unordered_map<image::BlobId, Entry, image::BlobIdHash> entries_;
  uint64_t bytes_ = 0;
  uint64_t reserved_ = 0;  // bytes of puts being written
  Stats counts_;
  std::atomic<bool> direct_io_{true};
  std::atomic<bool> failing_{false};  // failure_starts_episode()
};

// A Store whose blob reads go through a DiskCache: a hit never reaches the
// inner store; a miss fetches from it and, when the bytes match their name,
// keeps them. Everything else is the inner store's. A cache that cannot
// write (a full disk) is reported once through `on_cache_error` (and again
// only after a put succeeded in between): serving goes on without caching.
//
// Thread-safety: as the inner store.
class CachedStore final : public image::Store {
 public:
  CachedStore(std::unique_ptr<image::Store> inner, std::shared_ptr<DiskCache> cache,
              std::function<void(const Error&)> on_cache_error = {})
      : inner_(std::move(inner)), cache_(std::move(cache)), on_cache_error_(std::move(on_cache_error)) {}

  Result<std::string> get(const image::BlobId& id) override;
  // Every blob this returns was checked once on the way (DiskCache::get
  // checks a hit, against `checksum` when given, else its name; a miss is
  // hashed before it is kept): checked, unless a fetched blob did not match
  // its name (returned unchecked, for the caller's error).
  Result<image::FetchedBlob> get_checked(const image::BlobId& id, std::optional<uint64_t> checksum,
                                         uint64_t size) override;
  Result<std::string> get_sized(const image::BlobId& id, uint64_t size) override;
  Status put(const image::BlobId& id, std::string_view bytes) override { return inner_->put(id, bytes); }
  Result<bool> exists(const image::BlobId& id) override { return inner_->exists(id); }
  Result<std::vector<image::BlobId>> list() override { return inner_->list(); }
  Status remove(const image::BlobId& id) override { return inner_->remove(id); }
  std::string describe(const image::BlobId& id) const override { return inner_->describe(id); }
  std::string identity() const override { return inner_->identity(); }
  Result<std::string> read_manifest(const std::string& name) override { return inner_->read_manifest(name); }
  Result<bool> manifest_exists(const std::string& name) override { return inner_->manifest_exists(name); }
  Status write_manifest(const std::string& name, std::string_view bytes) override {
    return inner_->write_manifest(name, bytes);
  }
  Result<std::vector<std::string>> list_manifests() override { return inner_->list_manifests(); }
  Status remove_manifest(const std::string& name) override { return inner_->remove_manifest(name); }
  std::string describe_manifest(const std::string& name) const override { return inner_->describe_manifest(name); }
  Result<std::unique_ptr<image::StoreLock>> lock_shared(const std::function<void()>& on_wait) override {
    return inner_->lock_shared(on_wait);
  }
  Result<std::unique_ptr<image::StoreLock>> lock_exclusive(const std::function<void()>& on_wait) override {
    return inner_->lock_exclusive(on_wait);
  }
  Result<std::unique_ptr<image::StoreLock>> lease(const std::string& name, std::string_view use) override {
    return inner_->lease(name, use);
  }
  Result<std::vector<image::ImageLease>> live_leases(bool remove_stale, uint64_t* removed) override {
    return inner_->live_leases(remove_stale, removed);
  }

 private:
  std::unique_ptr<image::Store> inner_;
  std::shared_ptr<DiskCache> cache_;
  std::function<void(const Error&)> on_cache_error_;
};

}  // namespace faultline::objstore
