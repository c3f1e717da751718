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
#include <span>
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

// From a memory file: one user of create_image_from_pages() below, whose
// input reads the file's pages through a read-only mapping.
Result<CreateReport> create_image(Store& store, const CreateOptions& options);

// What the input of create_image_from_pages() says about one guest page
// before any byte of it is read.
enum class PageInput : uint8_t {
  kAsParent = 0,   // unchanged since the parent: nothing is read (REQUIRES a parent)
  kZero = 1,       // known zero (e.g. removed by the balloon): stored as zero, nothing is read
  kCandidate = 2,  // new bytes, maybe: read, then compared with the parent's page and with zero
};

// Reads the candidate bytes of the guest pages [first_page, first_page +
// count) (every one of them kCandidate): either fills `buffer` (count x page
// size bytes) and returns buffer.data(), or returns a pointer to the same
// bytes held elsewhere that stays valid until the next call (a mapping). An
// error aborts the create (nothing is written under the image's name).
// Thread-safety: REQUIRED. Frames are gathered on compression threads, and
// without a parent candidates are classified on several threads; calls for
// different pages may come at once.
using ReadPages = std::function<Result<const uint8_t*>(uint64_t first_page, uint64_t count, std::span<uint8_t> buffer)>;

struct PagesCreateOptions {
  std::string name;
  std::optional<std::string> parent;
  // Names the input in errors ("/path/mem", "session 3").
  std::string source;
  uint32_t page_size = kSmallPage;
  uint64_t guest_bytes = 0;  // with a parent, REQUIRES the parent's guest size and page size
  int zstd_level = 3;
  uint32_t frame_pages = 0;  // 0: default_frame_pages(page_size)
  // One entry per guest page (guest_bytes / page_size entries).
  std::vector<PageInput> pages;
  ReadPages read;
  // Largest run of candidate pages asked of `read` at once (at least one page).
  uint64_t max_read_bytes = 8ull << 20;
  std::optional<std::string> working_set_path;
  // Threads compressing frames (and, without a parent, classifying pages);
  // 0: one per CPU. The image is the same for any value.
  unsigned threads = 0;
  Progress progress;
  // Runs with the store's shared lock held, after every frame is written and
  // before the manifest: an error here (say, the input changed while it was
  // read) leaves no image, only blobs that gc removes.
  std::function<Status()> check_before_manifest;
  // Test hook: like CreateOptions::before_manifest (after check_before_manifest).
  std::function<void()> before_manifest;
};

// The core of every create: classifies each page (kAsParent and kZero as the
// input says; kCandidate by its bytes: equal to the parent's page, or zero
// where the parent reads zero, it is stored as "as in the parent"; else zero
// if all zero, else stored), packs the stored pages into frames (the working
// set's pages first), writes the frames, then the manifest. Candidate pages
// are read twice: once to classify them, and the stored ones again to pack
// them (so an input that must not change between the two reads has to check
// that itself; see check_before_manifest). Same store protocol as
// create_image(): shared lock from before the parent is read until the
// manifest is written, every blob durable before the manifest.
Result<CreateReport> create_image_from_pages(Store& store, const PagesCreateOptions& options);

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
  uint32_t version = 0;  // of its manifest (manifest_version)
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

// One image of a store as `image list` shows it: its own manifest, not its
// chain (inspect_image resolves the chain).
struct ImageListing {
  std::string name;
  std::optional<std::string> parent;
  uint32_t page_size = 0;
  uint64_t guest_bytes = 0;
  uint64_t stored_pages = 0;  // pages this image stores itself
  uint64_t frames = 0;        // its frames
  uint64_t stored_bytes = 0;  // their compressed bytes
  uint64_t manifest_bytes = 0;
  uint32_t version = 0;          // of its manifest (manifest_version)
  std::optional<Error> problem;  // its manifest could not be read or parsed (the counts above are then 0)
  std::vector<ImageLease> leases;  // the live processes serving it (Store::lease)
};
// Every image of the store, sorted by name; an image whose manifest cannot be
// read or parsed is listed with its problem. Fails only when the store cannot
// be listed.
Result<std::vector<ImageListing>> list_images(Store& store);

struct DeleteOptions {
  // Test hook: runs if delete has to wait for the store's lock.
  std::function<void()> on_lock_wait;
};
// Removes image `name` (its manifest; gc then removes the blobs no other
// image references). Refused with EBUSY, naming them, while other images of
// the store have it as their parent: their chains would break. Refused too,
// with the problem, when another image of the store cannot be read: it could
// be a child (the image itself may be unreadable: it is deleted). In a
// directory store it holds the gc lock exclusively, so no create (nor
// `faultline snapshot`) can take the image as a parent meanwhile; a bucket
// has no such lock (gc is refused there), so a child pushed while a delete
// runs is the caller's to avoid. Refused with EBUSY too, naming them, while
// live processes hold leases on it (a daemon serving it: Store::lease), so a
// gc after a delete never takes frames a running VM may still need; leases
// whose holder died are removed on the way. A bucket keeps no leases.
Status delete_image(Store& store, const std::string& name, const DeleteOptions& options = {});

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
  uint64_t removed_stale_leases = 0;  // leases whose holder had died
  uint64_t removed_temporaries = 0;
};
// REQUIRES: `store` is a LocalStore (it also removes interrupted writes).
// Refuses (removing nothing) if any manifest cannot be read and parsed: an
// image it cannot read may reference any blob.
Result<GcReport> gc_store(Store& store, const GcOptions& options);

}  // namespace faultline::image
