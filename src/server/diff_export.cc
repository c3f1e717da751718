#include "server/diff_export.h"

#include <algorithm>
#include <mutex>
#include <vector>

#include "image/blob_id.h"
#include "image/manifest.h"

namespace faultline {
namespace {

std::string refuse_prefix(const Session& session, const ExportOptions& o) {
  return "export of session " + std::to_string(session.summary().id) + " as image " + o.name + " refused";
}

// The three lists of a page map, for comparing two scans.
bool same_pages(const PageMap& a, const PageMap& b) {
  return a.dirty == b.dirty && a.zero == b.zero && a.removed == b.removed;
}

// Every dirty page's SHA-256 at its first read, to compare later reads with.
class ReadDigests {
 public:
  explicit ReadDigests(std::vector<uint64_t> pages) : pages_(std::move(pages)), digests_(pages_.size()),
                                                      seen_(pages_.size(), false) {}
  // Records the first read of `page`, or compares a later read with it.
  // Returns false when a later read differs, or when `page` is not dirty
  // (create reads only the pages it was told are candidates: never).
  bool check(uint64_t page, std::string_view bytes) {
    const auto it = std::lower_bound(pages_.begin(), pages_.end(), page);
    if (it == pages_.end() || *it != page) return false;
    const size_t k = static_cast<size_t>(it - pages_.begin());
    const image::BlobId digest = image::BlobId::of(bytes);
    if (!seen_[k]) {
      seen_[k] = true;
      digests_[k] = digest;
      ++first_reads_;
      return true;
    }
    return digests_[k] == digest;
  }
  bool all_read_once() const { return first_reads_ == pages_.size(); }
  const std::vector<uint64_t>& pages() const { return pages_; }

 private:
  std::vector<uint64_t> pages_;  // sorted: the dirty pages
  std::vector<image::BlobId> digests_;
  std::vector<bool> seen_;
  uint64_t first_reads_ = 0;
};

}  // namespace

Result<ExportReport> export_session_diff(const Session& session, image::Store& store, const ExportOptions& o) {
  if (o.parent.empty()) return fail("an export needs the image the session serves as its parent", EINVAL);
  if (auto st = image::check_image_name(o.name); !st) {
    return fail("bad image name '" + o.name + "': " + st.error().message, EINVAL);
  }
  // Early, before any scan or read (create checks again under the store's lock).
  auto exists = store.manifest_exists(o.name);
  if (!exists) return std::unexpected(exists.error());
  if (*exists) return fail("image " + o.name + " exists already (images are immutable; pick another name)", EEXIST);

  // The parent's geometry: the new image has the same.
  auto parent_bytes = store.read_manifest(o.parent);
  if (!parent_bytes) return std::unexpected(parent_bytes.error());
  auto parent = image::parse_manifest(*parent_bytes, "image " + o.parent + " (" + store.describe_manifest(o.parent) + ")");
  if (!parent) return std::unexpected(parent.error());
  const uint64_t page_size = parent->page_size;
  const uint64_t pages = parent->guest_pages();

  const std::shared_ptr<const GuestLayout> layout = session.layout();
  std::vector<Segment> segments = layout->segments();
  std::sort(segments.begin(), segments.end(), [](const Segment& a, const Segment& b) { return a.offset < b.offset; });
  const std::string what = "session " + std::to_string(session.summary().id);
  for (const Segment& s : segments) {
    if (s.page_size != page_size || s.offset + s.size > parent->guest_bytes) {
      return fail(what + ": guest memory [file offset " + std::to_string(s.offset) + ", +" + std::to_string(s.size) +
                      ", pages of " + std::to_string(s.page_size) + ") does not fit the parent image " + o.parent +
                      " (" + std::to_string(parent->guest_bytes) + " bytes, pages of " + std::to_string(page_size) +
                      ")",
                  EINVAL);
    }
  }

  auto before = session.page_map(o.force_fallback);
  if (!before) return std::unexpected(before.error());
  if (!before->write_protect && session.prefetching()) {
    // Without WP every present page counts as written, and the prefetch
    // makes pages present with the VM paused: the two page maps would
    // differ, and the refusal would blame the VM.
    return fail(refuse_prefix(session, o) +
                    ": its prefetch is still installing pages, and without write-protect tracking every "
                    "present page counts as written: wait for its prefetch_done log line, then export",
                EBUSY);
  }
  const pid_t pid = before->pid;

  ExportReport report;
  report.write_protect = before->write_protect;
  report.method = before->method;
  report.dirty_pages = before->dirty_bytes / page_size;
  report.zero_pages = before->zero_bytes / page_size;
  report.removed_pages = before->removed_bytes / page_size;

  image::PagesCreateOptions in;
  in.name = o.name;
  in.parent = o.parent;
  in.source = what;
  in.page_size = static_cast<uint32_t>(page_size);
  in.guest_bytes = parent->guest_bytes;
  in.zstd_level = o.zstd_level;
  in.frame_pages = o.frame_pages;
  in.progress = o.progress;
  in.before_manifest = o.before_manifest;
  in.pages.assign(pages, image::PageInput::kAsParent);
  std::vector<uint64_t> dirty_pages;
  auto mark = [&](const std::vector<FileRange>& ranges, image::PageInput input) {
    for (const FileRange& r : ranges) {
      for (uint64_t p = r.offset / page_size; p < (r.offset + r.length) / page_size && p < pages; ++p) {
        in.pages[p] = input;
        if (input == image::PageInput::kCandidate) dirty_pages.push_back(p);
      }
    }
  };
  mark(before->zero, image::PageInput::kZero);
  mark(before->removed, image::PageInput::kZero);
  mark(before->dirty, image::PageInput::kCandidate);
  std::sort(dirty_pages.begin(), dirty_pages.end());
  dirty_pages.erase(std::unique(dirty_pages.begin(), dirty_pages.end()), dirty_pages.end());
  ReadDigests digests(std::move(dirty_pages));

  // Reads guest pages [first, first + count) (file order) from the VM: a run
  // may span segments, each one process_vm_readv. Every page read is checked
  // against its first read. Create calls it from its compression threads:
  // one read at a time (the digests and counts are shared; the VM's memory
  // is read faster than it is compressed anyway).
  bool hook_ran = false;
  std::mutex read_mutex;
  auto read_pages = [&](uint64_t first, uint64_t count, std::span<uint8_t> buffer) -> Result<const uint8_t*> {
    std::lock_guard lock(read_mutex);
    uint64_t offset = first * page_size;
    const uint64_t end = offset + count * page_size;
    uint8_t* out = buffer.data();
    while (offset < end) {
      auto seg = std::upper_bound(segments.begin(), segments.end(), offset,
                                  [](uint64_t off, const Segment& s) { return off < s.offset; });
      if (seg == segments.begin() || offset >= std::prev(seg)->offset + std::prev(seg)->size) {
        return fail(refuse_prefix(session, o) + ": the dirty page at memory-file offset " + std::to_string(offset) +
                        " is in no mapped guest region",
                    EINVAL);
      }
      --seg;
      const uint64_t chunk = std::min(end, seg->offset + seg->size) - offset;
      if (auto st = kernel::read_process_memory(pid, seg->base + (offset - seg->offset), {out, chunk}, o.read_method);
          !st) {
        return fail(what + ": reading the VM's memory failed: " + st.error().message, st.error().code);
      }
      report.bytes_read += chunk;
      out += chunk;
      offset += chunk;
    }
    for (uint64_t k = 0; k < count; ++k) {
      const std::string_view page(reinterpret_cast<const char*>(buffer.data()) + k * page_size, page_size);
      if (!digests.check(first + k, page)) {
        return fail(refuse_prefix(session, o) + ": the page at memory-file offset " +
                        std::to_string((first + k) * page_size) +
                        " changed between two reads: the VM is not paused (pause it, then export)",
                    EBUSY);
      }
    }
    if (!hook_ran && digests.all_read_once()) {
      hook_ran = true;
      if (o.after_first_read) o.after_first_read();
    }
    return buffer.data();
  };
  in.read = read_pages;

  // After every frame is written: every dirty page once more, then the page
  // map and the layout again. Any difference: no image.
  in.check_before_manifest = [&]() -> Status {
    const std::vector<uint64_t>& dirty = digests.pages();
    const uint64_t max_pages = std::max<uint64_t>(1, (8ull << 20) / page_size);
    std::vector<uint8_t> buffer;
    for (size_t i = 0; i < dirty.size();) {
      size_t j = i + 1;
      while (j < dirty.size() && j - i < max_pages && dirty[j] == dirty[j - 1] + 1) ++j;
      buffer.resize((j - i) * page_size);
      if (auto r = read_pages(dirty[i], j - i, buffer); !r) return std::unexpected(r.error());
      i = j;
    }
    auto after = session.page_map(o.force_fallback);
    if (!after) return std::unexpected(after.error());
    if (!same_pages(*before, *after)) {
      return fail(refuse_prefix(session, o) + ": the VM's memory changed while it was read (dirty " +
                      std::to_string(before->dirty_bytes) + " -> " + std::to_string(after->dirty_bytes) +
                      " bytes, zero " + std::to_string(before->zero_bytes) + " -> " +
                      std::to_string(after->zero_bytes) + ", removed " + std::to_string(before->removed_bytes) +
                      " -> " + std::to_string(after->removed_bytes) + "): the VM is not paused (pause it, then export)",
                  EBUSY);
    }
    if (session.layout()->segments() != layout->segments()) {
      return fail(refuse_prefix(session, o) + ": the guest's memory layout changed while it was read (munmap/mremap)",
                  EBUSY);
    }
    return {};
  };

  auto created = image::create_image_from_pages(store, in);
  if (!created) return std::unexpected(created.error());
  report.image = *created;
  return report;
}

}  // namespace faultline
