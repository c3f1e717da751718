#include "image/frame.h"

#include <xxhash.h>
#include <zstd.h>

#include <cstdint>

namespace faultline::image {

struct FrameCompressor::Context {
  ZSTD_CCtx* cctx = nullptr;
  int level = 3;
  ~Context() { ZSTD_freeCCtx(cctx); }
};

FrameCompressor::FrameCompressor(int level) : context_(std::make_unique<Context>()) {
  context_->cctx = ZSTD_createCCtx();
  context_->level = level;
}

FrameCompressor::~FrameCompressor() = default;

Result<std::string> FrameCompressor::compress(std::string_view pages) {
  if (context_->cctx == nullptr) return fail("cannot allocate a zstd compression context", ENOMEM);
  std::string out;
  size_t n = 0;
  // ZSTD_compressCCtx resets every parameter but the level on each call, so
  // the output depends only on the input, the level and the zstd version.
  // resize_and_overwrite: no zero-filling of a buffer that zstd overwrites.
  out.resize_and_overwrite(ZSTD_compressBound(pages.size()), [&](char* p, size_t bound) {
    n = ZSTD_compressCCtx(context_->cctx, p, bound, pages.data(), pages.size(), context_->level);
    return ZSTD_isError(n) ? 0 : n;
  });
  if (ZSTD_isError(n)) return fail(std::string("zstd compression failed: ") + ZSTD_getErrorName(n));
  return out;
}

Result<FrameBuffer> decode_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                 const std::string& what) {
  if (BlobId::of(blob) != id) {
    return fail(what + ": blob " + id.hex() + " is corrupt (its SHA-256 does not match its name)", EIO);
  }
  return decode_checked_frame(blob, id, expected_bytes, what);
}

uint64_t frame_checksum(std::string_view blob) { return XXH3_64bits(blob.data(), blob.size()); }

Result<FrameBuffer> decode_frame_by_checksum(std::string_view blob, const BlobId& id, uint64_t checksum,
                                             uint64_t expected_bytes, const std::string& what) {
  if (frame_checksum(blob) != checksum) {
    return fail(what + ": blob " + id.hex() + " is corrupt (its checksum does not match the manifest's)", EIO);
  }
  return decode_checked_frame(blob, id, expected_bytes, what);
}

Result<FrameBuffer> decode_checked_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                         const std::string& what) {
  const unsigned long long content = ZSTD_getFrameContentSize(blob.data(), blob.size());
  if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN || content != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " is not a zstd frame of " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  // Into frame memory (image/frame_buffer.h): huge pages where the kernel
  // has them, reused slots of evicted frames where it has them.
  FrameBuffer out = FrameBuffer::allocate(expected_bytes);
  const size_t n = ZSTD_decompress(out.data(), out.size(), blob.data(), blob.size());
  if (ZSTD_isError(n) || n != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " does not decompress to " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  return out;
}

}  // namespace faultline::image
