// Copying an image and its whole chain of parents from one store to another:
// `faultline image push` (local directory to bucket) and `pull` (bucket to
// local directory) are this one operation.
//
// Only blobs the destination lacks are copied (content addressing makes that
// dedup across every image a fleet has pushed), several at once; every blob
// is checked against its address as it is read, so a damaged or truncated
// object is never stored under a name that lies. Manifests go last, the
// base's first, each after every blob it references: an interrupted copy
// leaves no image that looks whole in the destination. A manifest already
// in the destination must be byte-identical (images are immutable).
//
// The destination's shared lock (a directory store's gc protocol, store.h)
// is held from before the first blob is looked for until the last manifest
// is written, as `create` holds it: a gc or delete in the destination waits,
// so it never removes a blob the copy wrote or found there before the
// manifest that references it exists.
//
// Thread-safety: each call is independent; it runs `threads` threads of its own.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "image/operations.h"
#include "image/store.h"

namespace faultline::image {

struct CopyOptions {
  unsigned threads = 8;  // blobs in flight at once
  Progress progress;     // (bytes copied, bytes to copy)
  // The destination's lock is held by another process (a gc): waiting.
  std::function<void()> on_lock_wait;
};

struct CopyReport {
  uint64_t layers = 0;            // images in the chain
  uint64_t manifests_written = 0; // layers the destination did not have
  uint64_t blobs = 0;             // distinct blobs the chain references
  uint64_t blobs_copied = 0;      // of those, the destination lacked
  uint64_t bytes_copied = 0;
};

Result<CopyReport> copy_image(Store& from, Store& to, const std::string& name, const CopyOptions& options);

}  // namespace faultline::image
