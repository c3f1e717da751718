// ImageSource: serves an image and its whole chain of parents as a
// PageSource, so the serving engine reads an image exactly as it reads a raw
// memory file (file offsets are guest-memory offsets in both).
//
// Every page resolves to zero or (layer, frame, index in frame) through the
// chain's flattened table: one lookup per page, however long the chain. A
// read of a stored page takes its whole frame from the daemon's shared
// FrameCache (loading it once: fetched, checked before any byte is used
// (ImageChain::read_frame), decompressed) and copies the page out of it; the other
// pages of that frame are then served from memory, which read_if_cached()
// does without ever loading. Zero pages are known from the manifests
// (extent(), known_zero()), so they are installed without reading.
//
// A prefetch's plan can be loaded ahead of its reads (read_ahead(): many
// frames in flight at once, image/frame_read_ahead.h).
//
// Errors name the image layer and the blob. A checksum mismatch or a missing
// blob is final; a store error that may pass (EAGAIN, ENOMEM, EMFILE, ENFILE,
// EINTR, ETIMEDOUT) is marked retryable.
//
// Thread-safety: after open(), every method is safe from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "common/error.h"
#include "image/frame_cache.h"
#include "image/image_chain.h"
#include "image/store.h"
#include "source/page_source.h"

namespace faultline::image {

// on_unleased (HoldOptions): the image cannot be leased (a store on a
// read-only file system, say): it is served anyway, but `image delete` will
// not know it is in use. on_lock_wait: a gc or delete holds the store's lock
// and open waits for it.
struct ImageOpenOptions : HoldOptions {
  // Test hook: runs with the lease taken and the store's shared lock held,
  // before any manifest is read.
  std::function<void()> after_lease;
};

class ImageSource final : public PageSource {
 public:
  // Opens image `name` of `store` with all its ancestors (ImageChain::open
  // checks every manifest and the pins between them). `cache` may be shared
  // with other sources. The source holds a lease on the image for its whole
  // life (Store::lease), taken under the store's shared lock before the
  // manifests are read: `image delete` refuses the image meanwhile.
  static Result<std::shared_ptr<ImageSource>> open(std::unique_ptr<Store> store, const std::string& name,
                                                   std::shared_ptr<FrameCache> cache,
                                                   const ImageOpenOptions& options = {});

  Status read(uint64_t offset, std::span<uint8_t> out) const override;
  // True (bytes copied) when every page of the range is zero or in a frame
  // the cache holds now; false otherwise, having loaded nothing.
  Result<bool> read_if_cached(uint64_t offset, std::span<uint8_t> out) const override;
  // The first page's frame is loaded if it must be; later pages are read
  // while they are zero, in that frame or in a frame the cache holds now.
  Result<uint64_t> read_window(uint64_t offset, std::span<uint8_t> out, uint64_t page_size,
                               bool cached_only) const override;
  SourceExtent extent(uint64_t offset) const override;
  bool known_zero(uint64_t offset, uint64_t length) const override;
  // Loads the frames the plan needs into the frame cache ahead of its reads
  // (image/frame_read_ahead.h), at most a quarter of the cache's capacity
  // ahead of the reader. Null when the cache keeps nothing.
  std::unique_ptr<ReadAhead> read_ahead(std::vector<SourceRange> plan, const ReadAheadOptions& options) const override;
  uint64_t size() const override { return chain_.guest_bytes(); }
  const std::string& describe() const override { return description_; }

  const ImageChain& chain() const { return chain_; }
  const std::string& name() const { return name_; }
  uint32_t page_size() const { return chain_.page_size(); }
  FrameCache& cache() const { return *cache_; }

 private:
  ImageSource(std::unique_ptr<Store> store, ImageChain chain, std::string name, std::shared_ptr<FrameCache> cache,
              std::unique_ptr<StoreLock> lease);
  // The frame holding `loc`, from the cache or loaded into it.
  Result<FrameCache::Frame> frame(const PageLocation& loc) const;
  // Copies [offset, offset + out.size()) page by page; `frame_of(loc)` gives
  // the frame of a stored page, or null: stop there. Returns the bytes
  // copied, out.size() unless frame_of stopped it.
  template <typename FrameOf>
  Result<uint64_t> copy_out(uint64_t offset, std::span<uint8_t> out, FrameOf&& frame_of) const;

  std::unique_ptr<Store> store_;  // the chain reads through it
  ImageChain chain_;
  std::string name_;
  std::string description_;
  std::shared_ptr<FrameCache> cache_;
  std::unique_ptr<StoreLock> lease_;  // null when the store keeps no leases or could not record one
};

}  // namespace faultline::image
