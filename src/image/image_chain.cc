#include "image/image_chain.h"

#include <cstring>
#include <new>
#include <set>

#include "image/frame.h"

namespace faultline::image {

Result<ImageChain> ImageChain::open(Store& store, const std::string& name) {
  ImageChain chain;
  chain.store_ = &store;
  chain.store_tag_ = FrameCache::store_tag(store.identity());
  std::set<std::string> seen;
  std::string next = name;
  std::optional<BlobId> pinned;  // what the child says its parent's manifest hashes to
  std::string child;
  for (;;) {
    if (chain.layers_.size() >= kMaxDepth || !seen.insert(next).second) {
      return fail("image " + name + ": its chain of parents loops or is deeper than " + std::to_string(kMaxDepth),
                  ELOOP);
    }
    auto bytes = store.read_manifest(next);
    if (!bytes) {
      if (!child.empty()) {
        // Keeps whether it may pass: a store that timed out is not a
        // missing parent.
        Error e = bytes.error();
        e.message = "image " + child + ": its parent " + next +
                    (e.code == ENOENT ? " is missing: " : " cannot be read: ") + e.message;
        return std::unexpected(std::move(e));
      }
      return std::unexpected(bytes.error());
    }
    const std::string what = "image " + next + " (" + store.describe_manifest(next) + ")";
    auto m = parse_manifest(*bytes, what);
    if (!m) return std::unexpected(m.error());
    Layer layer{next, std::move(*m), BlobId::of(*bytes), bytes->size()};
    if (pinned && layer.manifest_sha256 != *pinned) {
      return fail("image " + child + ": its parent " + next +
                      " is not the image it was created on (the parent's manifest changed)",
                  EINVAL);
    }
    if (!chain.layers_.empty()) {
      const Manifest& top = chain.layers_[0].manifest;
      if (layer.manifest.page_size != top.page_size || layer.manifest.guest_bytes != top.guest_bytes) {
        return fail("image " + child + ": its parent " + next + " has another page size or guest size", EINVAL);
      }
    }
    std::optional<ParentRef> parent = layer.manifest.parent;
    chain.layers_.push_back(std::move(layer));
    if (!parent) break;
    child = next;
    next = parent->name;
    pinned = parent->manifest_sha256;
  }

  // Base first, each child over it: afterwards no entry says "parent".
  try {
    chain.table_.assign(chain.layers_[0].manifest.guest_pages(), 0);
  } catch (const std::bad_alloc&) {
    return fail("image " + name + ": no memory for the page table of its " +
                    std::to_string(chain.layers_[0].manifest.guest_bytes) + "-byte guest (8 bytes per page)",
                ENOMEM);
  }
  for (size_t li = chain.layers_.size(); li-- > 0;) {
    uint64_t page = 0;
    for (const PageRun& r : chain.layers_[li].manifest.runs) {
      if (r.kind == PageKind::kZero) {
        std::fill_n(chain.table_.begin() + static_cast<ptrdiff_t>(page), r.pages, 0);
      } else if (r.kind == PageKind::kStored) {
        const uint64_t tag = static_cast<uint64_t>(li + 1) << kLayerShift;
        for (uint64_t i = 0; i < r.pages; ++i) chain.table_[page + i] = tag | (r.first_stored + i);
      }
      page += r.pages;
    }
  }
  return chain;
}

PageLocation ImageChain::locate(uint64_t page) const {
  const uint64_t entry = table_[page];
  if (entry == 0) return {};
  PageLocation loc;
  loc.zero = false;
  loc.layer = static_cast<uint32_t>((entry >> kLayerShift) - 1);
  const uint64_t storage = entry & ((1ull << kLayerShift) - 1);
  const uint32_t frame_pages = layers_[loc.layer].manifest.frame_pages;
  loc.frame = storage / frame_pages;
  loc.index_in_frame = static_cast<uint32_t>(storage % frame_pages);
  return loc;
}

std::string ImageChain::describe_layer(uint32_t layer) const {
  return "image " + layers_[layer].name + " (" + store_->describe_manifest(layers_[layer].name) + ")";
}

Result<FrameBuffer> load_frame(BlobStore& store, const FrameRef& f, uint32_t page_size, const std::string& what,
                               FrameCheck check) {
  const uint64_t bytes = static_cast<uint64_t>(f.pages) * page_size;
  // Bytes that do not match the blob's address (or size) may have been
  // damaged on the way (a proxy, a flaky network card): fetched once more.
  // Damaged twice, they are damaged where they are stored.
  for (int attempt = 1;; ++attempt) {
    // kEverything passes no checksum: a store that checks what it reads
    // (a disk cache) then checks it against its SHA-256 name, the check
    // verify makes, and the blob is not hashed a second time here.
    Result<FetchedBlob> blob = store.get_checked(
        f.id, check == FrameCheck::kToServe ? f.checksum : std::optional<uint64_t>(), f.compressed_bytes);
    if (!blob) {
      Error e = blob.error();
      e.message = what + ": " + e.message;
      return std::unexpected(std::move(e));  // keeps code and retryable: the store's to say
    }
    bool manifest_wrong = false;  // a sound blob, a wrong checksum: fetching again cannot help
    Result<FrameBuffer> frame = [&]() -> Result<FrameBuffer> {
      if (blob->bytes.size() != f.compressed_bytes) {
        return fail(what + ": blob " + f.id.hex() + " has " + std::to_string(blob->bytes.size()) +
                        " bytes, the manifest says " + std::to_string(f.compressed_bytes),
                    EIO);
      }
      if (check == FrameCheck::kEverything) {
        auto decoded = blob->checked ? decode_checked_frame(blob->bytes, f.id, bytes, what)
                                     : decode_frame(blob->bytes, f.id, bytes, what);
        if (decoded && f.checksum && frame_checksum(blob->bytes) != *f.checksum) {
          // Served from a local store, this frame would be refused.
          manifest_wrong = true;
          return fail(what + ": the manifest's checksum of blob " + f.id.hex() + " does not match the blob", EIO);
        }
        return decoded;
      }
      // Checked against its id by the store on this read: not hashed again.
      if (blob->checked) return decode_checked_frame(blob->bytes, f.id, bytes, what);
      // From this host's disk: the manifest's checksum catches damage.
      if (f.checksum && store.checksum_suffices()) {
        return decode_frame_by_checksum(blob->bytes, f.id, *f.checksum, bytes, what);
      }
      return decode_frame(blob->bytes, f.id, bytes, what);
    }();
    if (frame || manifest_wrong) return frame;
    // A blob whose bytes match its name is sound where it is stored: what
    // failed is the manifest's description of it (its size, page count or
    // checksum). Fetching it again cannot help, and "damaged" would blame
    // the storage.
    if (BlobId::of(blob->bytes) == f.id) {
      frame.error().message += " (the blob itself is sound: its SHA-256 matches its name; the manifest is wrong)";
      return frame;
    }
    if (attempt == 2) {
      frame.error().message += " (fetched twice, damaged both times)";
      return frame;
    }
  }
}

Result<FrameBuffer> ImageChain::read_frame(uint32_t layer, uint64_t frame) const {
  const Manifest& m = layers_[layer].manifest;
  return load_frame(*store_, m.frames[frame], m.page_size, describe_layer(layer), FrameCheck::kToServe);
}

std::vector<uint64_t> ImageChain::guest_pages_of_storage(uint32_t layer) const {
  const Manifest& m = layers_[layer].manifest;
  std::vector<uint64_t> out(m.stored_pages);
  uint64_t page = 0;
  for (const PageRun& r : m.runs) {
    if (r.kind == PageKind::kStored) {
      for (uint64_t i = 0; i < r.pages; ++i) out[r.first_stored + i] = page + i;
    }
    page += r.pages;
  }
  return out;
}

Status ChainPageReader::read_page(uint64_t page, uint8_t* out) {
  const uint32_t page_size = chain_.page_size();
  const PageLocation loc = chain_.locate(page);
  if (loc.zero) {
    std::memset(out, 0, page_size);
    return {};
  }
  const auto key = std::make_pair(loc.layer, loc.frame);
  auto it = cache_.find(key);
  if (it == cache_.end()) {
    auto frame = chain_.read_frame(loc.layer, loc.frame);
    if (!frame) return std::unexpected(frame.error());
    while (!order_.empty() && cached_bytes_ + frame->size() > cache_limit_) {
      auto victim = cache_.find(order_.front());
      cached_bytes_ -= victim->second.size();
      cache_.erase(victim);
      order_.pop_front();
    }
    cached_bytes_ += frame->size();
    order_.push_back(key);
    it = cache_.emplace(key, std::move(*frame)).first;
  }
  std::memcpy(out, it->second.data() + static_cast<uint64_t>(loc.index_in_frame) * page_size, page_size);
  return {};
}

}  // namespace faultline::image
