// Diff export: writes a new image, on top of the image a session serves,
// holding exactly what its (paused) VM changed since restore.
//
// Where each guest page comes from (Session::page_map(), the dirty query):
//  - dirty (written since restore; without WP tracking, every page present
//    in the VM: a write leaves no trace then) -> read from the VM's memory
//    (kernel/process_memory.h) and compared byte for byte with the parent:
//    a page written back to its old content is stored as "as in the
//    parent", an all-zero page as zero, anything else is stored;
//  - zero (installed zero after a REMOVE, not written since) and removed (the
//    balloon removed it, not touched since) -> zero;
//  - everything else (never installed, or installed and not written) -> "as
//    in the parent", nothing read. So the new image is exactly the memory the
//    VM holds, given that the session serves the parent image's memory
//    (REQUIRES: the caller names as parent the image whose memory the
//    session serves; a different image of the same size is not detected).
// Pages outside every mapped segment (the VM munmapped them: UNMAP events)
// are "as in the parent".
//
// The VM must be paused (its vCPUs stopped) for the whole export. The
// exporter cannot stop it, so it checks and refuses (an error, no image)
// when the memory changed while it was read:
//  - the page map is taken before the first read and again after the last
//    one; any difference (a page newly written under WP, newly present, newly
//    removed, or zero-installed) refuses. With WP that catches a write to any
//    page that was not dirty; without WP, a first touch of any page that was
//    not present, and every REMOVE;
//  - every dirty page is read at least twice (to classify it, to store it
//    when it is stored, and once more after every frame is written), and the
//    SHA-256 of its first read is compared with every later read: a change
//    to a dirty page between its first and its last read refuses;
//  - the guest layout (UNMAP/REMAP) must be the same before and after.
// Not detected (the image is then the memory as the last read saw it, which
// for a running VM is no single instant):
//  - a write to a dirty page before its first read or after its last read
//    that leaves the page map unchanged (with WP: a page already dirty;
//    without WP: any present page);
//  - a write between two reads that puts back the very bytes of the first
//    read (harmless: the bytes stored are the bytes it holds);
//  - changes after the final page-map scan (the VM resumed early).
//
// Crash safety is create's (image/operations.h): the store's shared lock from
// before the parent is read until the manifest is written, every frame
// durable before the manifest, the manifest renamed into place last; a
// refused or interrupted export leaves no image, only blobs that gc removes.
//
// Memory: create's ~18 bytes per guest page, plus 40 bytes per dirty page
// (its first read's SHA-256) and read buffers of 8 MiB.
//
// Thread-safety: safe from any thread while the session runs (it only reads
// the session: page_map(), layout()). Two exports of one session may run at
// once; they read the same memory.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "common/error.h"
#include "image/operations.h"
#include "image/store.h"
#include "kernel/pagemap_scan.h"
#include "kernel/process_memory.h"
#include "server/session.h"

namespace faultline {

struct ExportOptions {
  std::string parent;  // the image the session serves (REQUIRED)
  std::string name;    // the new image; refused if it exists
  int zstd_level = 3;
  uint32_t frame_pages = 0;  // 0: image::default_frame_pages(page size)
  // Dirty query from /proc/PID/pagemap instead of PAGEMAP_SCAN.
  bool force_fallback = false;
  // How the VM's memory is read (kAuto: process_vm_readv, /proc/PID/mem if refused).
  kernel::MemoryReadMethod read_method = kernel::MemoryReadMethod::kAuto;
  image::Progress progress;
  // Test hook: runs once every dirty page has been read once, before any is
  // read again (a test changes the VM here to prove the export refuses).
  std::function<void()> after_first_read;
  // Test hook: runs after every check passed, just before the manifest.
  std::function<void()> before_manifest;
};

struct ExportReport {
  image::CreateReport image;  // pages by kind as stored, frames, bytes
  // The page map the export used, in guest pages.
  uint64_t dirty_pages = 0;    // read from the VM
  uint64_t zero_pages = 0;     // installed zero since a REMOVE
  uint64_t removed_pages = 0;  // removed and not touched since
  bool write_protect = false;  // whether the dirty query had WP tracking
  kernel::ScanMethod method = kernel::ScanMethod::kPagemapScan;
  uint64_t bytes_read = 0;     // from the VM's memory, every read
};

// Writes image `options.name` with parent `options.parent` from the memory of
// `session`'s VM (see the file comment). REQUIRES: the VM is paused.
Result<ExportReport> export_session_diff(const Session& session, image::Store& store, const ExportOptions& options);

}  // namespace faultline
