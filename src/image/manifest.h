// The image manifest: what an image is, in one small checksummed file.
//
// An image maps every guest page to one of three kinds: zero, "as in the
// parent image", or stored (a page of one of the image's frames). The
// manifest names the parent (and pins the exact bytes of the parent's
// manifest by their SHA-256), the page size, the guest size, the frames
// (blob id, XXH3-64 checksum, compressed size, page count) and the page map. The byte layout
// is documented in docs/image-format.md; keep the two in step.
//
// Stored pages are numbered 0..stored_pages-1 in storage order (the order in
// which they were packed into frames): storage index s lives in frame
// s / frame_pages at index s % frame_pages. Every frame but the last holds
// exactly frame_pages pages, so that division is the whole lookup.
//
// The page map is a list of runs in guest order, each (kind, length) and, for
// stored runs, the storage index of its first page: either "sequential" (it
// continues where the previous sequential run ended, costing nothing) or
// explicit (a varint). Pages laid out in guest order are sequential; only
// pages moved to the front by a working set need explicit starts. This keeps
// a base image at most ~1 byte of map per guest page and a diff proportional
// to the runs it changes.
//
// parse_manifest() treats its input as hostile: every length, count and index
// is bounds-checked, and the checksum is checked before anything else.
//
// Thread-safety: plain values and pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "image/blob_id.h"

namespace faultline::image {

// Version 2 adds each frame's XXH3-64 checksum; version 1 manifests (no
// checksums) are still read, and their frames verified by SHA-256.
inline constexpr uint32_t kManifestVersion = 2;
inline constexpr uint32_t kOldestManifestVersion = 1;
inline constexpr uint32_t kSmallPage = 4096;
inline constexpr uint32_t kHugePage = 2 * 1024 * 1024;
// Frames decompress into memory; bound them (and the allocation a hostile
// manifest could ask for).
inline constexpr uint64_t kMaxFrameBytes = 64ull * 1024 * 1024;
// The largest guest an image holds: 1 TiB. A served image's page table costs
// 8 bytes per guest page (ImageChain), 2 GiB for 1 TiB of 4 KiB pages, so a
// manifest of a few bytes claiming more is refused before anything is
// allocated for it (it used to be 2^40 pages: a 91-byte manifest made
// inspect abort on an 8 TiB allocation).
inline constexpr uint64_t kMaxGuestBytes = 1ull << 40;

enum class PageKind : uint8_t { kZero = 0, kParent = 1, kStored = 2 };

struct FrameRef {
  BlobId id;
  uint64_t compressed_bytes = 0;
  uint32_t pages = 0;
  // XXH3-64 of the blob's bytes (manifest version 2; absent in version 1):
  // what a blob read from a local store is checked against (frame.h).
  std::optional<uint64_t> checksum;
  friend bool operator==(const FrameRef&, const FrameRef&) = default;
};

struct PageRun {
  PageKind kind = PageKind::kZero;
  uint64_t pages = 0;
  // kStored only: storage index of the run's first page.
  uint64_t first_stored = 0;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

struct ParentRef {
  std::string name;
  BlobId manifest_sha256;  // SHA-256 of the parent's whole manifest file
  friend bool operator==(const ParentRef&, const ParentRef&) = default;
};

struct Manifest {
  uint32_t page_size = kSmallPage;
  uint64_t guest_bytes = 0;
  uint32_t frame_pages = 0;
  uint32_t zstd_level = 3;  // informational: how the frames were made
  uint64_t stored_pages = 0;
  std::optional<ParentRef> parent;
  std::vector<FrameRef> frames;
  std::vector<PageRun> runs;  // guest order, covering every page exactly once

  uint64_t guest_pages() const { return page_size == 0 ? 0 : guest_bytes / page_size; }
  friend bool operator==(const Manifest&, const Manifest&) = default;
};

// Image names: plain file names (common/atomic_file.h check_plain_file_name:
// no '/', not "." or "..", no leading '.') without control bytes, since
// names are printed in errors and in inspect's output.
Status check_image_name(std::string_view name);

// Where the run code "stored, sequential" starts counting: the storage index
// of the first page laid out in guest order (after any working-set pages).
uint64_t sequential_start(const Manifest& m);

// Checks the invariants parse_manifest() checks (so that serialize never
// writes what parse would refuse).
Status validate_manifest(const Manifest& m);
// The version serialize_manifest() writes `m` as: 2 when its frames have
// checksums (or it has no frames), 1 when they have none (as older
// faultlines wrote); parse_manifest() of either gives back a manifest of
// the same version.
uint32_t manifest_version(const Manifest& m);
// Encodes `m` (which must pass validate_manifest()), as manifest_version(m).
Result<std::string> serialize_manifest(const Manifest& m);
// Decodes and validates. `what` (e.g. "image base (store/images/base)") starts every error.
Result<Manifest> parse_manifest(std::string_view bytes, const std::string& what);

}  // namespace faultline::image
