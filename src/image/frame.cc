#include "image/frame.h"

#include <sys/mman.h>
#include <unistd.h>
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

namespace {

// Maps in the whole pages of [p, p + size) for writing with one madvise
// instead of one page fault per page as zstd first writes each: a served
// frame is decompressed into memory the frame cache has never used, and on
// the nested VM the benchmarks run on a first write costs 10-25 us a page
// (docs/performance.md, "Image serving"), about 1.7x what populating the
// same pages costs.
// MADV_POPULATE_WRITE exists since Linux 5.14; on older kernels (EINVAL)
// the pages are simply faulted in as zstd writes them.
void populate_for_write(char* p, size_t size) {
#ifdef MADV_POPULATE_WRITE
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + size) & ~(page - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)size;
#endif
}

}  // namespace

Result<std::string> decode_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                 const std::string& what) {
  if (BlobId::of(blob) != id) {
    return fail(what + ": blob " + id.hex() + " is corrupt (its SHA-256 does not match its name)", EIO);
  }
  return decode_checked_frame(blob, id, expected_bytes, what);
}

Result<std::string> decode_checked_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                         const std::string& what) {
  const unsigned long long content = ZSTD_getFrameContentSize(blob.data(), blob.size());
  if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN || content != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " is not a zstd frame of " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  std::string out;
  size_t n = 0;
  out.resize_and_overwrite(expected_bytes, [&](char* p, size_t size) {
    populate_for_write(p, size);
    n = ZSTD_decompress(p, size, blob.data(), blob.size());
    return ZSTD_isError(n) ? 0 : n;
  });
  if (ZSTD_isError(n) || n != expected_bytes) {
    return fail(what + ": blob " + id.hex() + " does not decompress to " + std::to_string(expected_bytes) + " bytes",
                EIO);
  }
  return out;
}

}  // namespace faultline::image
