// Frames: the unit in which stored pages are compressed and stored.
//
// A frame is N whole pages (the image's frame_pages, the last frame of an
// image may hold fewer), compressed as one independent zstd frame. The blob
// holding it is named by the SHA-256 of its compressed bytes. Compression is
// deterministic (one thread, the same level, the same zstd): the same pages
// in the same order give the same blob, which is what lets two images created
// independently from one memory file share their frames.
//
// Thread-safety: FrameCompressor is single-owner (it keeps a zstd context);
// decode_frame() is a pure function.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/error.h"
#include "image/blob_id.h"
#include "image/frame_buffer.h"

namespace faultline::image {

class FrameCompressor {
 public:
  explicit FrameCompressor(int level);
  ~FrameCompressor();
  FrameCompressor(const FrameCompressor&) = delete;
  FrameCompressor& operator=(const FrameCompressor&) = delete;

  // Compresses `pages` (whole pages) into one zstd frame.
  Result<std::string> compress(std::string_view pages);

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

// Checks `blob` against `id` (SHA-256) first, then decompresses it and checks
// that it holds exactly `expected_bytes`. `what` names the image and blob in
// errors. No byte of a blob whose hash does not match is ever decompressed.
// The frame is decompressed into frame memory (image/frame_buffer.h).
Result<FrameBuffer> decode_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                 const std::string& what);
// XXH3-64 of a blob's bytes: the checksum a version 2 manifest keeps for each
// frame (FrameRef::checksum). ~13.5 GB/s on the benchmark machine (2 MiB
// blobs), against 1.35-1.6 GB/s for SHA-256 with the CPU's SHA extensions.
uint64_t frame_checksum(std::string_view blob);
// decode_frame() checking `blob` against the manifest's `checksum` instead
// of its SHA-256 name: for a blob read from a store on this host's disk
// (BlobStore::checksum_suffices), where what can go wrong is damage, which a
// 64-bit checksum catches; a blob from anywhere else is checked by name.
Result<FrameBuffer> decode_frame_by_checksum(std::string_view blob, const BlobId& id, uint64_t checksum,
                                             uint64_t expected_bytes, const std::string& what);
// decode_frame() without the hash, for a blob its store has just checked
// against `id` (FetchedBlob::checked). REQUIRES: BlobId::of(blob) == id.
Result<FrameBuffer> decode_checked_frame(std::string_view blob, const BlobId& id, uint64_t expected_bytes,
                                         const std::string& what);

}  // namespace faultline::image
