// ImageChain: an image and all its ancestors, opened and checked, with a
// flattened page table that resolves any guest page in O(1).
//
// open() reads the named manifest and then its parent's, and so on to the
// base; every manifest is checksum-checked and parsed defensively, every
// child's pin on its parent (the SHA-256 of the parent's manifest) must match,
// and every layer must have the same page size and guest size. It then builds
// one table for the whole chain, applying the layers' page maps from the base
// up: afterwards a page is either zero or (layer, storage index), never "ask
// the parent". That table is what a serving PageSource will use: a fault
// resolves to (frame blob, index in frame) with one array lookup and one
// division, however long the chain. It costs 8 bytes per guest page
// (64 MiB for a 32 GiB guest of 4 KiB pages).
//
// Frames are fetched from the store, checked (against the manifest's XXH3
// checksum when the store is this host's disk, else against their SHA-256
// name; frame.h) and decompressed by read_frame(); no byte of an unchecked
// blob is returned.
//
// Thread-safety: after open(), const methods are safe from any thread as long
// as the Store is (read_frame() has no cache; ChainPageReader below adds one).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "common/error.h"
#include "image/frame_buffer.h"
#include "image/frame_cache.h"
#include "image/manifest.h"
#include "image/store.h"

namespace faultline::image {

struct Layer {
  std::string name;
  Manifest manifest;
  BlobId manifest_sha256;
  uint64_t manifest_bytes = 0;
};

// How load_frame() checks a frame's blob.
enum class FrameCheck {
  // As a server must before installing any byte: against the manifest's
  // XXH3 checksum when the blob is on this host's disk
  // (BlobStore::checksum_suffices) or its store has just checked it
  // (FetchedBlob::checked), else against its SHA-256 name.
  kToServe,
  // As `verify` does: always against its SHA-256 name (once: by the store
  // when it checked the read that way, FetchedBlob::checked, else here), and
  // (version 2) the manifest's checksum against the blob too, so that a
  // manifest whose checksum is wrong for a sound blob is found.
  kEverything,
};

// Fetches the blob of frame `f` (of an image of `page_size` pages) from
// `store`, checks its size and bytes as `check` says and decompresses it.
// Bytes that fail a check are fetched once more (they may have been damaged
// on the way); damaged twice, the error says so. `what` names the image in
// errors. A store's own error is returned as it is, prefixed with `what`.
Result<FrameBuffer> load_frame(BlobStore& store, const FrameRef& f, uint32_t page_size, const std::string& what,
                               FrameCheck check);

struct PageLocation {
  bool zero = true;
  uint32_t layer = 0;         // index into ImageChain::layers()
  uint64_t frame = 0;         // index into that layer's manifest.frames
  uint32_t index_in_frame = 0;
};

class ImageChain {
 public:
  // At most this many layers (a guard against a cycle or a runaway chain).
  static constexpr size_t kMaxDepth = 4096;

  static Result<ImageChain> open(Store& store, const std::string& name);

  // layers()[0] is the image itself, then its parent, ..., the base last.
  const std::vector<Layer>& layers() const { return layers_; }
  uint32_t page_size() const { return layers_[0].manifest.page_size; }
  uint64_t guest_bytes() const { return layers_[0].manifest.guest_bytes; }
  uint64_t guest_pages() const { return table_.size(); }

  // O(1). REQUIRES: page < guest_pages().
  PageLocation locate(uint64_t page) const;

  // Fetches, checks and decompresses frame `frame` of layer `layer`.
  Result<FrameBuffer> read_frame(uint32_t layer, uint64_t frame) const;
  // What a FrameCache holds that frame under.
  FrameKey frame_key(uint32_t layer, uint64_t frame) const {
    const Manifest& m = layers_[layer].manifest;
    const FrameRef& f = m.frames[frame];
    return FrameKey{f.id, store_tag_, static_cast<uint64_t>(f.pages) * m.page_size, f.checksum};
  }

  // For a layer, the guest page of each of its storage indexes (the inverse of
  // its page map): lets flatten decompress each frame once.
  std::vector<uint64_t> guest_pages_of_storage(uint32_t layer) const;

  // "image NAME (PATH)", the prefix of errors about a layer.
  std::string describe_layer(uint32_t layer) const;

  Store& store() const { return *store_; }

 private:
  // table_ entry: 0 = zero page, else (layer + 1) << 40 | storage index.
  static constexpr int kLayerShift = 40;
  Store* store_ = nullptr;
  uint64_t store_tag_ = 0;  // FrameCache::store_tag(store_->identity())
  std::vector<Layer> layers_;
  std::vector<uint64_t> table_;
};

// Reads single pages through a bounded cache of decompressed frames (so that
// reading a frame's pages one at a time decompresses it once).
// Not thread-safe: one owner.
class ChainPageReader {
 public:
  ChainPageReader(const ImageChain& chain, uint64_t cache_bytes) : chain_(chain), cache_limit_(cache_bytes) {}
  // Copies page `page` into `out` (page_size bytes).
  Status read_page(uint64_t page, uint8_t* out);

 private:
  const ImageChain& chain_;
  uint64_t cache_limit_;
  uint64_t cached_bytes_ = 0;
  std::map<std::pair<uint32_t, uint64_t>, FrameBuffer> cache_;
  std::deque<std::pair<uint32_t, uint64_t>> order_;  // insertion order, for FIFO eviction
};

}  // namespace faultline::image
