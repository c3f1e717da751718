// LocalStore: a store directory on a local file system.
//
//   DIR/lock                       the gc lock file (flock: shared = create and a daemon opening
//                                  an image, exclusive = gc and delete)
//   DIR/blobs/sha256/ab/<64 hex>   one blob per file, fanned out by the first byte
//   DIR/images/<NAME>              one manifest per image
//   DIR/leases/lease-<PID>-<RAND>  a lease: a live process serves an image
//                                  (text: image, pid, host, since); its holder
//                                  keeps it flocked exclusively, so a lease
//                                  nobody holds is stale
//
// Every file is written to a fresh temporary file in its final directory,
// fsynced, renamed into place and the directory fsynced (common/atomic_file.h),
// so a crash leaves whole files or dot-named temporaries that gc removes.
//
// Thread-safety: safe for concurrent use by threads and processes.
#pragma once

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "image/store.h"

namespace faultline::image {

class LocalStore final : public Store {
 public:
  // Opens DIR, creating it and its subdirectories if `create` is true.
  static Result<std::unique_ptr<LocalStore>> open(const std::string& dir, bool create);

  Result<std::string> get(const BlobId& id) override;
  Status put(const BlobId& id, std::string_view bytes) override;
  // Writes a temporary file without fsync; sync() runs syncfs(), renames
  // every temporary of the batch into place, and runs syncfs() again: two
  // flushes per batch instead of two fsyncs per blob, and a name still only
  // ever appears over durable bytes.
  Status put_deferred(const BlobId& id, std::string_view bytes, DeferredPuts& batch) override;
  Status sync(DeferredPuts& batch) override;
  Result<bool> exists(const BlobId& id) override;
  Result<std::vector<BlobId>> list() override;
  Status remove(const BlobId& id) override;
  std::string describe(const BlobId& id) const override;
  std::string identity() const override { return dir_; }
  // The CPUs this process may run on (sched_getaffinity).
  int useful_concurrent_gets() const override;
  bool checksum_suffices() const override { return true; }

  Result<std::string> read_manifest(const std::string& name) override;
  Result<bool> manifest_exists(const std::string& name) override;
  Status write_manifest(const std::string& name, std::string_view bytes) override;
  Result<std::vector<std::string>> list_manifests() override;
  // Unlinks DIR/images/NAME and fsyncs DIR/images: the removal is durable when this returns.
  Status remove_manifest(const std::string& name) override;
  std::string describe_manifest(const std::string& name) const override;

  Result<std::unique_ptr<StoreLock>> lock_shared(const std::function<void()>& on_wait) override;
  Result<std::unique_ptr<StoreLock>> lock_exclusive(const std::function<void()>& on_wait) override;
  // Writes DIR/leases/lease-PID-RAND (creating leases/ in a store made before
  // it existed), flocked before it gets its name; the handle unlinks it.
  Result<std::unique_ptr<StoreLock>> lease(const std::string& name, std::string_view use) override;
  Result<std::vector<ImageLease>> live_leases(bool remove_stale, uint64_t* removed) override;

  // Removes temporary files left by interrupted writes. REQUIRES: the
  // exclusive lock (no writer can be mid-write). Returns how many it removed.
  Result<uint64_t> remove_temporaries();

  const std::string& dir() const { return dir_; }

 private:
  explicit LocalStore(std::string dir) : dir_(std::move(dir)) {}
  std::string blob_dir(const BlobId& id) const;
  Result<std::unique_ptr<StoreLock>> lock(int operation, const std::function<void()>& on_wait);
  std::string dir_;
};

}  // namespace faultline::image
