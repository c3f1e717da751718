#include "image/image_source.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "image/frame_read_ahead.h"

namespace faultline::image {

namespace {
bool retryable_errno(int code) {
  return code == EAGAIN || code == ENOMEM || code == EMFILE || code == ENFILE || code == EINTR || code == ETIMEDOUT;
}
}  // namespace

Result<std::shared_ptr<ImageSource>> ImageSource::open(std::unique_ptr<Store> store, const std::string& name,
                                                       std::shared_ptr<FrameCache> cache,
                                                       const ImageOpenOptions& options) {
  // The shared lock is held until the manifests are read (a delete either
  // ran before, and the image is gone, or runs after and sees the lease).
  ImageHold hold = hold_image(*store, name, "served", options);
  if (options.after_lease) options.after_lease();
  auto chain = ImageChain::open(*store, name);
  if (!chain) return std::unexpected(chain.error());
  if (chain->guest_bytes() == 0) return fail("image " + name + " holds no memory (guest size 0)", EINVAL);
  return std::shared_ptr<ImageSource>(
      new ImageSource(std::move(store), std::move(*chain), name, std::move(cache), std::move(hold.lease)));
}

ImageSource::ImageSource(std::unique_ptr<Store> store, ImageChain chain, std::string name,
                         std::shared_ptr<FrameCache> cache, std::unique_ptr<StoreLock> lease)
    : store_(std::move(store)),
      chain_(std::move(chain)),
      name_(std::move(name)),
      description_(store_->describe_manifest(name_)),
      cache_(std::move(cache)),
      lease_(std::move(lease)) {}

Result<FrameCache::Frame> ImageSource::frame(const PageLocation& loc) const {
  auto got =
      cache_->get(chain_.frame_key(loc.layer, loc.frame), [&] { return chain_.read_frame(loc.layer, loc.frame); });
  if (!got) {
    Error e = got.error();
    // A store that knows (an S3 client: timeouts, resets, 5xx) said so itself.
    e.retryable = e.retryable || retryable_errno(e.code);
    return std::unexpected(std::move(e));
  }
  return got;
}

template <typename FrameOf>
Result<uint64_t> ImageSource::copy_out(uint64_t offset, std::span<uint8_t> out, FrameOf&& frame_of) const {
  if (offset > size() || out.size() > size() - offset) {
    return fail("read of " + std::to_string(out.size()) + " bytes at offset " + std::to_string(offset) +
                    " is beyond the end of " + description_ + " (" + std::to_string(size()) + " bytes)",
                EINVAL);
  }
  const uint64_t page_size = chain_.page_size();
  // The frame of the previous page: consecutive pages of one frame (the
  // common case: a prefetch run, a 2 MiB page of a 2 MiB image) look it up
  // once.
  FrameCache::Frame held;
  const FrameRef* held_for = nullptr;
  uint64_t done = 0;
  while (done < out.size()) {
    const uint64_t at = offset + done;
    const uint64_t page = at / page_size;
    const uint64_t within = at % page_size;
    const uint64_t n = std::min<uint64_t>(page_size - within, out.size() - done);
    const PageLocation loc = chain_.locate(page);
    if (loc.zero) {
      std::memset(out.data() + done, 0, n);
    } else {
      const FrameRef& ref = chain_.layers()[loc.layer].manifest.frames[loc.frame];
      if (held_for != &ref) {
        auto f = frame_of(loc);
        if (!f) return std::unexpected(f.error());
        if (!*f) return done;
        held = std::move(*f);
        held_for = &ref;
      }
      std::memcpy(out.data() + done, held->data() + static_cast<uint64_t>(loc.index_in_frame) * page_size + within, n);
    }
    done += n;
  }
  return done;
}

Status ImageSource::read(uint64_t offset, std::span<uint8_t> out) const {
  auto r = copy_out(offset, out, [this](const PageLocation& loc) { return frame(loc); });
  if (!r) return std::unexpected(r.error());
  return {};
}

Result<bool> ImageSource::read_if_cached(uint64_t offset, std::span<uint8_t> out) const {
  auto r = copy_out(offset, out, [this](const PageLocation& loc) -> Result<FrameCache::Frame> {
    return cache_->find(chain_.frame_key(loc.layer, loc.frame));
  });
  if (!r) return std::unexpected(r.error());
  return *r == out.size();
}

Result<uint64_t> ImageSource::read_window(uint64_t offset, std::span<uint8_t> out, uint64_t page_size,
                                          bool cached_only) const {
  // Only the first page decides whether anything is loaded: a stored page
  // after it in another frame is read only if that frame is in memory (an
  // image laid out by a working set keeps a page's guest neighbours in
  // other frames, often ones the guest never needs: loading one for a
  // guess would make the fault wait for a second GET or decompression).
  const uint64_t first_page_end = std::min<uint64_t>(page_size, out.size());
  const PageLocation head = chain_.locate(offset / chain_.page_size());
  auto r = copy_out(offset, out, [&](const PageLocation& loc) -> Result<FrameCache::Frame> {
    const bool heads_frame = !head.zero && loc.layer == head.layer && loc.frame == head.frame;
    if (heads_frame && !cached_only) return frame(loc);
    return cache_->find(chain_.frame_key(loc.layer, loc.frame));
  });
  if (!r) return std::unexpected(r.error());
  const uint64_t whole = *r - *r % page_size;
  return whole < first_page_end ? 0 : whole;
}

SourceExtent ImageSource::extent(uint64_t offset) const {
  const uint64_t page_size = chain_.page_size();
  const uint64_t pages = chain_.guest_pages();
  uint64_t page = offset / page_size;
  const PageLocation first = chain_.locate(page);
  SourceExtent e;
  e.kind = first.zero ? SourceExtent::Kind::kZero : SourceExtent::Kind::kData;
  e.layer = first.zero ? 0 : first.layer;
  // Extend while the pages stay of one kind and (data) in one frame.
  uint64_t next = page + 1;
  while (next < pages) {
    const PageLocation loc = chain_.locate(next);
    if (loc.zero != first.zero) break;
    if (!first.zero && (loc.layer != first.layer || loc.frame != first.frame)) break;
    ++next;
  }
  e.length = next * page_size - offset;
  return e;
}

std::unique_ptr<ReadAhead> ImageSource::read_ahead(std::vector<SourceRange> plan,
                                                   const ReadAheadOptions& options) const {
  // A quarter of the cache: room for the frames the installers hold, demand
  // faults' frames and other sessions', so that a frame read ahead is still
  // held when its install comes (the LRU pushes out the oldest first).
  constexpr uint64_t kShareOfCache = 4;
  if (options.fetches <= 0 || cache_->capacity() == 0 || plan.empty()) return nullptr;
  // No more loads at once than the store can use: from a local store one per
  // CPU (measured in faultline-bench's image working-set restore on 2 CPUs:
  // 12 loads ahead made the realistic image's prefetch 1.25-1.38x the raw
  // file's, one per CPU 1.12-1.24x, on one corpus; docs/performance.md).
  ReadAheadOptions capped = options;
  if (const int useful = chain_.store().useful_concurrent_gets(); useful > 0) {
    capped.fetches = std::min(capped.fetches, useful);
  }
  return std::make_unique<FrameReadAhead>(chain_, *cache_, std::move(plan), capped,
                                          cache_->capacity() / kShareOfCache);
}

bool ImageSource::known_zero(uint64_t offset, uint64_t length) const {
  if (length == 0 || offset >= size() || length > size() - offset) return false;
  const uint64_t page_size = chain_.page_size();
  for (uint64_t page = offset / page_size; page <= (offset + length - 1) / page_size; ++page) {
    if (!chain_.locate(page).zero) return false;
  }
  return true;
}

}  // namespace faultline::image
