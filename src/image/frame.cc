#include "image/frame.h"

#include <zstd.h>

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
  std::string out(ZSTD_compressBound(pages.size()), '\0');
  // ZSTD_compressCCtx resets every parameter but the level on each call, so
  // the output depends only on the input, the level and the zstd version.
  const size_t n = ZSTD_compressCCtx(context_->cctx, out.data(), out.size(), pages.data(), pages.size(),
                                     context_->level);
  if (ZSTD_isError(n)) return fail(std::string("zstd compression failed: ") + ZSTD_getErrorName(n));
  out.resize(n);
  return out;
}

Result<std::string> decode_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                 const std::string& what) {
  if (BlobId::of(blob) != id) {
    return fail(what + ": blob " + id.hex() + " is corrupt (its SHA-256 does not match its name)", EIO);
  }
  const unsigned long long content = ZSTD_getFrameContentSize(blob.data(), blob.size());
  if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN || content != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " is not a zstd frame of " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  std::string out(expected_bytes, '\0');
  const size_t n = ZSTD_decompress(out.data(), out.size(), blob.data(), blob.size());
  if (ZSTD_isError(n) || n != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " does not decompress to " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  return out;
}

}  // namespace faultline::image
