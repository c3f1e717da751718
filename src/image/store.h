// Where images live: blobs (content-addressed frames) and manifests (named
// images), behind interfaces: LocalStore (a directory, local_store.h), S3Store
// (a bucket, objstore/s3_store.h) and CachedStore (a disk cache of frames in
// front of another store, objstore/disk_cache.h) implement them.
//
// Contracts every implementation keeps:
//  - put() is all-or-nothing: a reader sees no blob or the whole blob, never
//    part of one, and a blob that exists already is not rewritten (its name
//    is its content, so rewriting could only lose it during the write).
//  - get() returns the bytes as stored; callers check them against the id
//    (frame.h) before using any of them, unless get_checked() says the
//    store has just done so.
//  - write_manifest() is atomic in the same way; manifests are written last,
//    after every blob they reference, so an interrupted create leaves no
//    image, only blobs that gc removes.
//
// Thread-safety: implementations are safe for concurrent use from several
// threads and processes (the guarantees above are what makes that so).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"
#include "image/blob_id.h"

namespace faultline::image {

// A blob as read by BlobStore::get_checked().
struct FetchedBlob {
  std::string bytes;
  // True when the store checked `bytes` on this read, against their id
  // (SHA-256) or against the checksum the reader passed, so the reader need
  // not check them a second time.
  bool checked = false;
};

// The deferred puts of one writer (BlobStore::put_deferred), until its
// sync(). Each writer has its own: a sync makes visible only the writer's
// own blobs, and a writer that fails before its sync (its batch destroyed
// unsynced) removes the temporaries it wrote instead of leaving them to the
// next writer's sync, which failed on the first one a gc had removed since.
// Thread-safety: add() and take() from any thread.
class DeferredPuts {
 public:
  DeferredPuts() = default;
  ~DeferredPuts();
  DeferredPuts(const DeferredPuts&) = delete;
  DeferredPuts& operator=(const DeferredPuts&) = delete;
  // A temporary file, and the path it is renamed to by sync().
  void add(std::string temporary, std::string final_path);
  std::vector<std::pair<std::string, std::string>> take();

 private:
  std::mutex mu_;
  std::vector<std::pair<std::string, std::string>> pending_;  // GUARDED_BY(mu_)
};

class BlobStore {
 public:
  virtual ~BlobStore() = default;
  virtual Result<std::string> get(const BlobId& id) = 0;
  // get() of a blob its reader knows the size of (`size` bytes; 0: unknown):
  // a store that receives blobs over a network stops receiving one that is
  // larger (EFBIG), so a wrong object cannot take the memory its size would.
  virtual Result<std::string> get_sized(const BlobId& id, uint64_t /*size*/) { return get(id); }
  // get_sized(), saying whether the store has checked the bytes on the way: a
  // store that must check what it reads anyway (a disk cache verifying what
  // it reads back, or what it fetched before keeping it) says so, and a frame
  // is then checked once per read instead of twice. `checksum`, when given,
  // is the manifest's XXH3 of the blob (frame.h), which such a store may
  // check a copy on this host's disk against instead of hashing it with
  // SHA-256.
  virtual Result<FetchedBlob> get_checked(const BlobId& id, std::optional<uint64_t> /*checksum*/, uint64_t size) {
    auto bytes = get_sized(id, size);
    if (!bytes) return std::unexpected(bytes.error());
    return FetchedBlob{std::move(*bytes), false};
  }
  // Stores `bytes` under `id` (REQUIRES: id == BlobId::of(bytes)), unless present.
  virtual Status put(const BlobId& id, std::string_view bytes) = 0;
  // Like put(), but the blob need not be visible or durable before
  // sync(batch): lets an implementation pay for durability once per batch
  // rather than once per blob. A blob is never visible under its name before
  // its bytes are durable.
  virtual Status put_deferred(const BlobId& id, std::string_view bytes, DeferredPuts& /*batch*/) {
    return put(id, bytes);
  }
  // Makes every blob put_deferred() added to `batch` visible and durable.
  virtual Status sync(DeferredPuts& /*batch*/) { return {}; }
  virtual Result<bool> exists(const BlobId& id) = 0;
  virtual Result<std::vector<BlobId>> list() = 0;
  virtual Status remove(const BlobId& id) = 0;
  // Where the blob is, for error messages (a path, a URL).
  virtual std::string describe(const BlobId& id) const = 0;
  // Which store this is (its directory; its endpoint, bucket and prefix): a
  // daemon's frame cache shares a frame between images of one store only
  // (FrameKey), so a store holding other bytes under a blob's name, or a
  // manifest naming a blob with another size or checksum, never hands its
  // bytes to the images of another.
  virtual std::string identity() const = 0;
  // How many get()s in flight at once still make loading frames faster; 0:
  // no limit of the store's own (a remote store, whose get()s wait on round
  // trips). A store on this host's disk says its CPU count: its get()s are
  // page-cache reads, each followed by a hash and a decompression, so loads
  // beyond one per core only contend with the installs they feed.
  virtual int useful_concurrent_gets() const { return 0; }
  // True when the store's blobs are files on this host's disk, where what can
  // happen to them is damage: a frame read from it is then checked against
  // its manifest's XXH3-64 checksum, not hashed with SHA-256 (frame.h).
  // Blobs from anywhere else (a bucket, through a network) are checked
  // against their SHA-256 name.
  virtual bool checksum_suffices() const { return false; }
};

// Held for as long as an operation must not overlap gc (see Store::lock_*),
// or for as long as a process serves an image (Store::lease).
class StoreLock {
 public:
  virtual ~StoreLock() = default;
};

// A live process's claim on an image it serves or reads (Store::lease).
struct ImageLease {
  std::string image;
  // What the holder does with the image, as a past participle for messages:
  // "served" (a daemon; also a lease written before leases said), "flattened",
  // "verified", "copied" (image push, or copy_image, reading it).
  std::string use = "served";
  int64_t pid = 0;
  std::string host;
  std::string since;  // UTC, ISO 8601
  std::string path;   // where the lease is kept, for messages
  // "pid 1234 on HOST since TIME (PATH)"
  std::string describe() const;
};

class Store : public BlobStore {
 public:
  // Image names are plain file names (common/atomic_file.h check_plain_file_name).
  virtual Result<std::string> read_manifest(const std::string& name) = 0;
  virtual Result<bool> manifest_exists(const std::string& name) = 0;
  // Fails with EEXIST when the image exists: images are immutable, children pin them.
  virtual Status write_manifest(const std::string& name, std::string_view bytes) = 0;
  virtual Result<std::vector<std::string>> list_manifests() = 0;
  // Removes the image's manifest (its blobs stay: gc removes those no image
  // references). ENOENT when there is no such image. Callers check that no
  // other image has it as its parent first (delete_image, operations.h).
  virtual Status remove_manifest(const std::string& name) = 0;
  virtual std::string describe_manifest(const std::string& name) const = 0;

  // The gc protocol: writers (create) hold a shared lock from before they
  // read a parent or write a blob until their manifest is written; gc holds
  // the exclusive lock while it lists manifests and removes blobs. So gc
  // never sees a blob whose manifest is yet to come, and a create never
  // relies on a blob that gc is removing. `on_wait` runs (once) if the lock is
  // not free at once, before blocking: tests use it to order threads.
  virtual Result<std::unique_ptr<StoreLock>> lock_shared(const std::function<void()>& on_wait = {}) = 0;
  virtual Result<std::unique_ptr<StoreLock>> lock_exclusive(const std::function<void()>& on_wait = {}) = 0;

  // Leases: a process serving an image holds a lease on it for as long as
  // it may read the image's frames (the returned handle; a process that dies
  // releases it too). delete_image refuses a leased image, so a gc after it
  // can never take frames from under a running VM. Take it while holding
  // lock_shared() and before reading the manifests: a delete (exclusive)
  // then either sees the lease or ran first, and the image is gone.
  // ENOTSUP: the store keeps no leases (a bucket, where gc is refused anyway).
  virtual Result<std::unique_ptr<StoreLock>> lease(const std::string& name, std::string_view use);
  // The live leases of the store, every image's. A lease whose holder is gone
  // is stale: skipped, and removed when `remove_stale` (REQUIRES: the
  // exclusive lock); `removed`, if given, counts those. A store that keeps
  // no leases has none.
  virtual Result<std::vector<ImageLease>> live_leases(bool remove_stale, uint64_t* removed);
};

// What hold_image() holds: the store's shared lock (drop it once the image's
// manifests are read: while held, a delete or gc waits) and the lease (keep
// it for as long as the image is read: while held, a delete is refused).
// Either is null where the store has none.
struct ImageHold {
  std::unique_ptr<StoreLock> lock;
  std::unique_ptr<StoreLock> lease;
};

struct HoldOptions {
  std::function<void()> on_lock_wait;  // the lock is held by another process: waiting
  // A lock or lease the store could not give (not one it keeps none of): the
  // image is read anyway, unprotected from a delete. Default: ignored.
  std::function<void(const Error&)> on_unleased;
};

// Takes the store's shared lock, then a lease on image `name` for `use`
// (ImageLease::use), so that a delete either ran before (the image is gone
// when its manifests are read) or runs after and sees the lease. Never fails:
// what it could not take is null and reported to on_unleased.
ImageHold hold_image(Store& store, const std::string& name, std::string_view use, const HoldOptions& options = {});

}  // namespace faultline::image
