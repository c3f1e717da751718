// The offline image operations behind `faultline image ...`: create, flatten,
// verify, inspect and gc. Each works on a Store and names images by name.
//
// Progress: long operations call `progress(done, total)` now and then (the
// command line draws a progress line from it); it may be empty.
//
// Thread-safety: each call is independent; several processes may run them
// on one store at once (see Store's gc protocol).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "image/manifest.h"
#include "image/store.h"

namespace faultline::image {

using Progress = std::function<void(uint64_t done, uint64_t total)>;

// Pages per frame when --frame-pages is not given: 512 KiB of 4 KiB pages,
// one 2 MiB page.
uint32_t default_frame_pages(uint32_t page_size);

struct CreateOptions {
  std::string memory_path;   // a raw memory file, or a Firecracker Diff file with diff_file
  std::string name;
  std::optional<std::string> parent;
  uint32_t page_size = kSmallPage;
  int zstd_level = 3;
  uint32_t frame_pages = 0;  // 0: default_frame_pages(page_size)
  // A Firecracker Diff snapshot (sparse: holes are "as in the parent", data
  // extents are the pages written since; REQUIRES parent).
  bool diff_file = false;
  std::optional<std::string> working_set_path;
  // Threads compressing frames; 0: one per CPU. The image is byte-for-byte
  // the same for any value (each frame is compressed on its own).
  unsigned threads = 0;
  Progress progress;
  // Test hook: runs after every blob is written, before the manifest (with
  // the store's shared lock held).
  std::function<void()> before_manifest;
};

struct CreateReport {
  uint64_t guest_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t parent_pages = 0;
  uint64_t stored_pages = 0;
  uint64_t frames = 0;
  uint64_t frames_written = 0;  // not already in the store
  uint64_t stored_bytes = 0;    // compressed, all frames of this image
  uint64_t manifest_bytes = 0;
};

Result<CreateReport> create_image(Store& store, const CreateOptions& options);

// Writes the chain's memory as a raw file at `out_path` (atomically: no file
// appears unless every frame checked out). Zero pages are left as holes.
Status flatten_image(Store& store, const std::string& name, const std::string& out_path, const Progress& progress);

struct VerifyReport {
  uint64_t layers = 0;
  uint64_t frames_checked = 0;
  std::vector<Error> problems;  // each names the image and blob
};
// Checks every manifest, every ancestor, every frame of every layer. Fails
// only when it cannot start (the store); problems are in the report.
Result<VerifyReport> verify_image(Store& store, const std::string& name, const Progress& progress);

struct LayerInfo {
  std::string name;
  std::optional<std::string> parent;
  uint64_t zero_pages = 0, parent_pages = 0, stored_pages = 0;
  uint64_t frames = 0;
  uint64_t stored_bytes = 0;  // compressed bytes of its frames
  uint64_t manifest_bytes = 0;
};
struct InspectReport {
  uint32_t page_size = 0;
  uint64_t guest_bytes = 0;
  std::vector<LayerInfo> layers;  // the image first, the base last
  // The whole chain resolved: pages that read zero, and pages held by some layer.
  uint64_t zero_pages = 0, stored_pages = 0;
  uint64_t frames = 0;             // distinct frames the chain references
  uint64_t stored_bytes = 0;       // compressed, summed over every layer's frames
  uint64_t unique_bytes = 0;       // compressed, each distinct blob once
  uint64_t uncompressed_bytes = 0; // page bytes of every stored page in the chain
  double compression_ratio = 0;    // uncompressed_bytes / unique_bytes
};
Result<InspectReport> inspect_image(Store& store, const std::string& name);

struct GcOptions {
  bool dry_run = false;
  // Test hook: runs if gc has to wait for the lock.
  std::function<void()> on_lock_wait;
};
struct GcReport {
  uint64_t images = 0;
  uint64_t blobs = 0;
  uint64_t removed_blobs = 0;
  uint64_t removed_bytes = 0;
  uint64_t removed_temporaries = 0;
};
// REQUIRES: `store` is a LocalStore (it also removes interrupted writes).
// Refuses (removing nothing) if any manifest cannot be read and parsed: an
// image it cannot read may reference any blob.
Result<GcReport> gc_store(Store& store, const GcOptions& options);

}  // namespace faultline::image
