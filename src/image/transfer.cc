#include "image/transfer.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <unordered_set>
#include <vector>

#include "image/manifest.h"

namespace faultline::image {

Result<CopyReport> copy_image(Store& from, Store& to, const std::string& name, const CopyOptions& options) {
  if (auto st = check_image_name(name); !st) return std::unexpected(st.error());
  // The source's lease (a directory store), until every blob is copied; its
  // lock only while the chain's manifests are read.
  ImageHold hold = hold_image(from, name, "copied");
  // The chain, image first, each manifest checked against its child's pin.
  struct Layer {
    std::string name;
    std::string bytes;
    Manifest manifest;
  };
  std::vector<Layer> chain;
  std::optional<BlobId> pinned;
  for (std::string next = name;;) {
    if (chain.size() > 1000) return fail("image " + name + ": a chain of more than 1000 layers (a loop?)", ELOOP);
    auto bytes = from.read_manifest(next);
    if (!bytes) return std::unexpected(bytes.error());
    if (pinned && BlobId::of(*bytes) != *pinned) {
      return fail("image " + next + " (" + from.describe_manifest(next) + ") is not the parent its child was made on: "
                  "its manifest's SHA-256 differs from the one the child pins",
                  EIO);
    }
    auto m = parse_manifest(*bytes, "image " + next + " (" + from.describe_manifest(next) + ")");
    if (!m) return std::unexpected(m.error());
    std::optional<ParentRef> parent = m->parent;
    chain.push_back({next, std::move(*bytes), std::move(*m)});
    if (!parent) break;
    pinned = parent->manifest_sha256;
    next = parent->name;
  }
  hold.lock.reset();
  // Until the last manifest is written: a gc in the destination would
  // otherwise remove the blobs copied (or found there) so far, none of which
  // a manifest references yet.
  auto lock = to.lock_shared(options.on_lock_wait);
  if (!lock) return std::unexpected(lock.error());

  CopyReport report;
  report.layers = chain.size();
  std::vector<FrameRef> blobs;
  {
    std::unordered_set<BlobId, BlobIdHash> seen;
    for (const Layer& l : chain) {
      for (const FrameRef& f : l.manifest.frames) {
        if (seen.insert(f.id).second) blobs.push_back(f);
      }
    }
  }
  report.blobs = blobs.size();
  uint64_t total = 0;
  for (const FrameRef& f : blobs) total += f.compressed_bytes;

  std::atomic<size_t> next_blob{0};
  std::atomic<uint64_t> copied{0}, copied_bytes{0}, bytes_done{0};
  std::mutex mu;
  std::optional<Error> first_error;
  auto work = [&] {
    for (;;) {
      {
        std::lock_guard lock(mu);
        if (first_error) return;
      }
      const size_t i = next_blob.fetch_add(1);
      if (i >= blobs.size()) return;
      const FrameRef& f = blobs[i];
      auto fail_with = [&](const Error& e) {
        std::lock_guard lock(mu);
        if (!first_error) first_error = e;
      };
      auto present = to.exists(f.id);
      if (!present) return fail_with(present.error());
      if (!*present) {
        auto bytes = from.get_sized(f.id, f.compressed_bytes);
        if (!bytes) return fail_with(bytes.error());
        if (BlobId::of(*bytes) != f.id) {
          return fail_with(Error{EIO, "blob " + from.describe(f.id) + " does not hold the bytes its name says "
                                      "(SHA-256 mismatch): damaged in the source store, not copied"});
        }
        if (auto st = to.put(f.id, *bytes); !st) return fail_with(st.error());
        copied.fetch_add(1);
        copied_bytes.fetch_add(bytes->size());
      }
      const uint64_t done = bytes_done.fetch_add(f.compressed_bytes) + f.compressed_bytes;
      if (options.progress) {
        std::lock_guard lock(mu);
        options.progress(done, total);
      }
    }
  };
  const unsigned threads = std::max(1u, std::min<unsigned>(options.threads, static_cast<unsigned>(blobs.size())));
  {
    std::vector<std::jthread> pool;
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back(work);
  }
  if (first_error) return std::unexpected(*first_error);
  report.blobs_copied = copied.load();
  report.bytes_copied = copied_bytes.load();

  // Manifests last, the base first: each one appears after all it needs.
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    auto present = to.manifest_exists(it->name);
    if (!present) return std::unexpected(present.error());
    if (*present) {
      auto theirs = to.read_manifest(it->name);
      if (!theirs) return std::unexpected(theirs.error());
      if (*theirs != it->bytes) {
        return fail("image " + it->name + " already exists in " + to.describe_manifest(it->name) +
                        " with other contents: images are immutable, give this one another name",
                    EEXIST);
      }
      continue;
    }
    if (auto st = to.write_manifest(it->name, it->bytes); !st) return std::unexpected(st.error());
    ++report.manifests_written;
  }
  return report;
}

}  // namespace faultline::image
