#include "image/operations.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_set>

#include "common/atomic_file.h"
#include "common/mapping.h"
#include "common/unique_fd.h"
#include "image/frame.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "image/manifest.h"
#include "snapshot/working_set.h"

namespace faultline::image {
namespace {

bool all_zero(const uint8_t* p, size_t n) {
  // Pages are 8-byte aligned (offsets in an mmap), so compare words, eight
  // at a time: the OR of a 64-byte line has no branch inside, which the
  // compiler turns into vector code; a data page usually fails on its first
  // line.
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i + 8 <= n / 8; i += 8) {
    uint64_t line = 0;
    for (size_t k = 0; k < 8; ++k) line |= w[i + k];
    if (line != 0) return false;
  }
  return true;
}

// Marks the pages that hold data in a sparse file (SEEK_DATA/SEEK_HOLE): a
// Firecracker Diff snapshot writes only the pages dirtied since the last
// snapshot and leaves the rest holes. A page partly data and partly hole (a
// 2 MiB page of which some 4 KiB blocks were written) is refused: its holes
// mean "as in the parent", but read from the file they are zeros, and
// storing the page would replace the parent's bytes there with zeros.
Result<std::vector<bool>> data_pages(int fd, const std::string& path, uint64_t size, uint32_t page_size) {
  std::vector<bool> data(size / page_size, false);
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    const off_t start = ::lseek(fd, pos, SEEK_DATA);
    if (start < 0) {
      if (errno == ENXIO) break;  // no data after pos
      return fail_errno("SEEK_DATA on " + path + " failed (the file system must support it for --diff-file)");
    }
    off_t end = ::lseek(fd, start, SEEK_HOLE);
    if (end < 0) return fail_errno("SEEK_HOLE on " + path + " failed");
    if (static_cast<uint64_t>(end) > size) end = static_cast<off_t>(size);
    for (const off_t edge : {start, end}) {
      if (static_cast<uint64_t>(edge) % page_size != 0 && static_cast<uint64_t>(edge) != size) {
        const uint64_t page = static_cast<uint64_t>(edge) / page_size;
        return fail(path + ": page " + std::to_string(page) + " (" + std::to_string(page_size) + " bytes at offset " +
                        std::to_string(page * page_size) +
                        ") is partly data and partly hole; a diff file's holes mean \"as in the parent\", and "
                        "faultline does not merge the parent's bytes into a page: create the image from a Full "
                        "snapshot instead",
                    EINVAL);
      }
    }
    for (uint64_t p = static_cast<uint64_t>(start) / page_size; p * page_size < static_cast<uint64_t>(end); ++p) {
      data[p] = true;
    }
    pos = end;
  }
  return data;
}

constexpr uint8_t kKindZero = 0, kKindParent = 1, kKindStored = 2;

// A buffer for ReadPages that is never zero-filled: an input that returns a
// pointer of its own (a mapped file) never touches it, so its pages are
// never even faulted in.
class ReadBuffer {
 public:
  std::span<uint8_t> get(size_t bytes) {
    if (bytes > capacity_) {
      data_ = std::make_unique_for_overwrite<uint8_t[]>(bytes);
      capacity_ = bytes;
    }
    return {data_.get(), bytes};
  }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t capacity_ = 0;
};

struct CompressedFrame {
  std::string bytes;
  BlobId id;
  uint64_t checksum = 0;  // frame_checksum(bytes)
};

// Compresses and hashes (SHA-256 name, XXH3 checksum) frames 0..count-1 on
// worker threads, at most `window` frames ahead of the consumer (bounded
// memory), and hands them out in frame order through next(). A frame's blob
// depends only on its pages and the level (frame.h), so the output is the
// same for any number of threads.
// With one thread, next() does the work itself and no thread is started.
// The destructor stops and joins the workers (also after an error).
class FramePipeline {
 public:
  // Fills `scratch` with frame `f`'s pages (uncompressed); its error
  // becomes that frame's.
  using Gather = std::function<Status(uint64_t f, std::string& scratch)>;

  FramePipeline(uint64_t count, unsigned threads, int level, Gather gather)
      : count_(count), level_(level), gather_(std::move(gather)), window_(std::max(1u, threads) * 4) {
    slots_.resize(window_);
    if (threads <= 1) {
      inline_compressor_.emplace(level_);
      return;
    }
    for (unsigned i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~FramePipeline() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    workers_.clear();  // jthread joins
  }
  FramePipeline(const FramePipeline&) = delete;
  FramePipeline& operator=(const FramePipeline&) = delete;

  // The next frame in order. REQUIRES: fewer than `count` calls so far.
  Result<CompressedFrame> next() {
    if (inline_compressor_) {
      if (auto st = gather_(consumed_++, inline_scratch_); !st) return std::unexpected(st.error());
      return compress(*inline_compressor_, inline_scratch_);
    }
    std::unique_lock lock(mutex_);
    Slot& slot = slots_[consumed_ % window_];
    changed_.wait(lock, [&] { return slot.value.has_value(); });
    Result<CompressedFrame> out = std::move(*slot.value);
    slot.value.reset();
    ++consumed_;
    lock.unlock();
    changed_.notify_all();  // a worker may claim the next frame of the window
    return out;
  }

 private:
  struct Slot {
    std::optional<Result<CompressedFrame>> value;
  };

  static Result<CompressedFrame> compress(FrameCompressor& compressor, const std::string& pages) {
    auto bytes = compressor.compress(pages);
    if (!bytes) return std::unexpected(bytes.error());
    const BlobId id = BlobId::of(*bytes);
    const uint64_t checksum = frame_checksum(*bytes);
    return CompressedFrame{std::move(*bytes), id, checksum};
  }

  void work() {
    FrameCompressor compressor(level_);
    std::string scratch;
    std::unique_lock lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stop_ || next_claim_ >= count_ || next_claim_ < consumed_ + window_; });
      if (stop_ || next_claim_ >= count_) return;
      const uint64_t f = next_claim_++;
      lock.unlock();
      const Status gathered = gather_(f, scratch);
      Result<CompressedFrame> r =
          gathered ? compress(compressor, scratch) : Result<CompressedFrame>(std::unexpected(gathered.error()));
      lock.lock();
      slots_[f % window_].value = std::move(r);
      changed_.notify_all();
    }
  }

  const uint64_t count_;
  const int level_;
  const Gather gather_;
  const uint64_t window_;
  std::optional<FrameCompressor> inline_compressor_;
  std::string inline_scratch_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Slot> slots_;  // frame f in slots_[f % window_]
  uint64_t next_claim_ = 0;  // guarded by mutex_
  uint64_t consumed_ = 0;    // guarded by mutex_ (inline mode: this thread only)
  bool stop_ = false;
  std::vector<std::jthread> workers_;  // last: joined before the rest is destroyed
};

}  // namespace

uint32_t default_frame_pages(uint32_t page_size) { return page_size == kHugePage ? 1 : 128; }

namespace {

// Pages of a guest of `size` bytes, or why an image cannot hold it.
Result<uint64_t> check_guest_size(const std::string& source, uint64_t size, uint32_t page_size) {
  if (size % page_size != 0) {
    return fail(source + ": size " + std::to_string(size) + " is not a multiple of the page size " +
                    std::to_string(page_size),
                EINVAL);
  }
  const uint64_t pages = size / page_size;
  if (size > kMaxGuestBytes) {
    return fail(source + " is " + std::to_string(size) + " bytes, larger than an image may be (" +
                    std::to_string(kMaxGuestBytes) + " bytes)",
                EFBIG);
  }
  return pages;
}

Status check_create_settings(const std::string& name, uint32_t page_size, uint32_t frame_pages_option,
                             int zstd_level) {
  if (auto st = check_image_name(name); !st) return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  if (page_size != kSmallPage && page_size != kHugePage) return fail("page size must be 4096 or 2097152", EINVAL);
  const uint32_t frame_pages = frame_pages_option == 0 ? default_frame_pages(page_size) : frame_pages_option;
  if (static_cast<uint64_t>(frame_pages) * page_size > kMaxFrameBytes) {
    return fail("a frame may hold at most " + std::to_string(kMaxFrameBytes / page_size) + " pages of this size",
                EINVAL);
  }
  if (zstd_level < 1 || zstd_level > ZSTD_maxCLevel()) {
    return fail("zstd level must be 1.." + std::to_string(ZSTD_maxCLevel()), EINVAL);
  }
  return {};
}

}  // namespace

Result<CreateReport> create_image_from_pages(Store& store, const PagesCreateOptions& o) {
  if (auto st = check_create_settings(o.name, o.page_size, o.frame_pages, o.zstd_level); !st) {
    return std::unexpected(st.error());
  }
  const uint32_t frame_pages = o.frame_pages == 0 ? default_frame_pages(o.page_size) : o.frame_pages;
  const uint64_t size = o.guest_bytes;
  auto guest_pages = check_guest_size(o.source, size, o.page_size);
  if (!guest_pages) return std::unexpected(guest_pages.error());
  const uint64_t pages = *guest_pages;
  if (o.pages.size() != pages) {
    return fail(o.source + ": the input describes " + std::to_string(o.pages.size()) + " pages, the guest has " +
                    std::to_string(pages),
                EINVAL);
  }
  if (!o.parent) {
    for (uint64_t p = 0; p < pages; ++p) {
      if (o.pages[p] == PageInput::kAsParent) {
        return fail(o.source + ": page " + std::to_string(p) + " is 'as in the parent' but the image has no parent",
                    EINVAL);
      }
    }
  }
  const uint64_t max_read_pages = std::max<uint64_t>(1, o.max_read_bytes / o.page_size);

  // Held until the manifest is written: gc cannot remove the parent's blobs
  // we compare against, nor our blobs before our manifest references them.
  auto lock = store.lock_shared();
  if (!lock) return std::unexpected(lock.error());
  auto exists = store.manifest_exists(o.name);
  if (!exists) return std::unexpected(exists.error());
  if (*exists) return fail("image " + o.name + " exists already (images are immutable; pick another name)", EEXIST);

  std::optional<ImageChain> parent;
  if (o.parent) {
    auto chain = ImageChain::open(store, *o.parent);
    if (!chain) return std::unexpected(chain.error());
    if (chain->page_size() != o.page_size || chain->guest_bytes() != size) {
      return fail(o.source + " (" + std::to_string(size) + " bytes, pages of " + std::to_string(o.page_size) +
                      ") does not match the parent image " + *o.parent + " (" + std::to_string(chain->guest_bytes()) +
                      " bytes, pages of " + std::to_string(chain->page_size()) + ")",
                  EINVAL);
    }
    parent = std::move(*chain);
  }

  // Pass 1: what each page is. Bytes are compared, never assumed: a page
  // written back to its old content is "as in the parent".
  CreateReport report;
  report.guest_pages = pages;
  std::vector<uint8_t> kind(pages, kKindZero);
  std::vector<uint8_t> parent_page(o.page_size);
  ReadBuffer read_buffer;
  std::optional<ChainPageReader> parent_reader;
  if (parent) parent_reader.emplace(*parent, 256ull * 1024 * 1024);
  const uint64_t progress_step = std::max<uint64_t>(1, (64ull << 20) / o.page_size);
  const unsigned threads = o.threads != 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  // Reads the candidates of [begin, end) in runs and hands each page's bytes
  // to `classify_page` (known-zero pages get null).
  auto walk = [&](uint64_t begin, uint64_t end, ReadBuffer& buffer, bool report_progress,
                  const std::function<Status(uint64_t, const uint8_t*)>& classify_page) -> Status {
    uint64_t next_progress = begin;
    for (uint64_t p = begin; p < end;) {
      if (report_progress && o.progress && p >= next_progress) {
        o.progress(p * o.page_size, size * 2);
        next_progress = p + progress_step;
      }
      if (o.pages[p] != PageInput::kCandidate) {
        if (auto st = classify_page(p, nullptr); !st) return st;
        ++p;
        continue;
      }
      // A run of candidates, read with one call.
      uint64_t q = p + 1;
      while (q < end && q - p < max_read_pages && o.pages[q] == PageInput::kCandidate) ++q;
      auto bytes = o.read(p, q - p, buffer.get((q - p) * o.page_size));
      if (!bytes) return std::unexpected(bytes.error());
      for (uint64_t k = p; k < q; ++k) {
        if (auto st = classify_page(k, *bytes + (k - p) * o.page_size); !st) return st;
      }
      p = q;
    }
    return {};
  };
  if (!parent) {
    // Nothing to compare against: only zero or not, which ranges of pages
    // can tell on several threads at once (each writes its own elements of
    // kind[]; `read` is thread-safe by contract). No kAsParent input here.
    if (o.progress) o.progress(0, size * 2);
    auto zero_or_stored = [&](uint64_t p, const uint8_t* bytes) -> Status {
      kind[p] = bytes == nullptr || all_zero(bytes, o.page_size) ? kKindZero : kKindStored;
      return {};
    };
    const uint64_t ranges = std::min<uint64_t>(threads, std::max<uint64_t>(1, pages / 1024));
    std::vector<Status> results(ranges);
    std::vector<ReadBuffer> buffers(ranges);
    {
      std::vector<std::jthread> classifiers;
      for (uint64_t r = 1; r < ranges; ++r) {
        classifiers.emplace_back([&, r] {
          results[r] = walk(pages * r / ranges, pages * (r + 1) / ranges, buffers[r], false, zero_or_stored);
        });
      }
      results[0] = walk(0, pages / ranges, buffers[0], false, zero_or_stored);
    }  // joins
    for (const Status& st : results) {
      if (!st) return std::unexpected(st.error());
    }
  } else {
    // With a parent: one thread (ChainPageReader is not thread-safe).
    auto against_parent = [&](uint64_t p, const uint8_t* bytes) -> Status {
      if (o.pages[p] == PageInput::kAsParent) {
        kind[p] = kKindParent;
        return {};
      }
      // `bytes` null: known zero, nothing read.
      const bool zero = bytes == nullptr || all_zero(bytes, o.page_size);
      if (parent->locate(p).zero) {
        if (zero) {
          kind[p] = kKindParent;
          return {};
        }
      } else if (!zero) {
        if (auto rd = parent_reader->read_page(p, parent_page.data()); !rd) return rd;
        if (std::memcmp(parent_page.data(), bytes, o.page_size) == 0) {
          kind[p] = kKindParent;
          return {};
        }
      }
      kind[p] = zero ? kKindZero : kKindStored;
      return {};
    };
    if (auto st = walk(0, pages, read_buffer, true, against_parent); !st) return std::unexpected(st.error());
  }
  parent_reader.reset();

  // Storage order: the working set's stored pages first, in first-touch
  // order, then every other stored page in guest order.
  std::vector<uint64_t> order;
  std::vector<uint64_t> storage_index(pages, UINT64_MAX);
  if (o.working_set_path) {
    auto ws = read_working_set(*o.working_set_path, size);
    if (!ws) return std::unexpected(ws.error());
    if (ws->page_size != o.page_size) {
      return fail(*o.working_set_path + ": recorded with pages of " + std::to_string(ws->page_size) +
                      " bytes, the image uses " + std::to_string(o.page_size),
                  EINVAL);
    }
    for (uint64_t offset : ws->offsets) {
      const uint64_t p = offset / o.page_size;
      if (kind[p] == kKindStored && storage_index[p] == UINT64_MAX) {
        storage_index[p] = order.size();
        order.push_back(p);
      }
    }
  }
  for (uint64_t p = 0; p < pages; ++p) {
    if (kind[p] == kKindStored && storage_index[p] == UINT64_MAX) {
      storage_index[p] = order.size();
      order.push_back(p);
    }
    report.zero_pages += kind[p] == kKindZero;
    report.parent_pages += kind[p] == kKindParent;
  }
  report.stored_pages = order.size();

  // Pass 2: frames, their pages read again in runs that are consecutive
  // both in storage and in the guest.
  Manifest m;
  m.page_size = o.page_size;
  m.guest_bytes = size;
  m.frame_pages = frame_pages;
  m.zstd_level = static_cast<uint32_t>(o.zstd_level);
  m.stored_pages = order.size();
  if (parent) m.parent = ParentRef{*o.parent, parent->layers()[0].manifest_sha256};
  // Compression and hashing run on worker threads, each gathering its
  // frame's pages through `read` (again) in runs consecutive both in storage
  // and in the guest; blobs are looked up and written here, in frame order.
  const uint64_t frame_count = (order.size() + frame_pages - 1) / frame_pages;
  FramePipeline pipeline(
      frame_count, static_cast<unsigned>(std::min<uint64_t>(frame_count, threads)), o.zstd_level,
      [&](uint64_t f, std::string& scratch) -> Status {
        const uint64_t first = f * frame_pages;
        const uint64_t n = std::min<uint64_t>(frame_pages, order.size() - first);
        scratch.resize(n * o.page_size);
        auto* frame = reinterpret_cast<uint8_t*>(scratch.data());
        for (uint64_t i = 0; i < n;) {
          uint64_t j = i + 1;
          while (j < n && order[first + j] == order[first + j - 1] + 1) ++j;
          const std::span<uint8_t> target(frame + i * o.page_size, (j - i) * o.page_size);
          auto bytes = o.read(order[first + i], j - i, target);
          if (!bytes) return std::unexpected(bytes.error());
          if (*bytes != target.data()) std::memcpy(target.data(), *bytes, target.size());
          i = j;
        }
        return {};
      });
  // This create's blobs, until its sync: on any failure before it, their
  // temporaries are removed when this goes.
  DeferredPuts deferred;
  for (uint64_t f = 0; f < frame_count; ++f) {
    if (o.progress && f % 16 == 0) {
      o.progress(size + static_cast<uint64_t>(static_cast<double>(size) * f / frame_count), size * 2);
    }
    const uint64_t n = std::min<uint64_t>(frame_pages, order.size() - f * frame_pages);
    auto frame = pipeline.next();
    if (!frame) return std::unexpected(frame.error());
    auto present = store.exists(frame->id);
    if (!present) return std::unexpected(present.error());
    if (!*present) {
      if (auto put = store.put_deferred(frame->id, frame->bytes, deferred); !put) return std::unexpected(put.error());
      ++report.frames_written;
    }
    m.frames.push_back(FrameRef{frame->id, frame->bytes.size(), static_cast<uint32_t>(n), frame->checksum});
    report.stored_bytes += frame->bytes.size();
  }
  report.frames = m.frames.size();

  // The page map: runs of one kind (stored runs also consecutive in storage).
  for (uint64_t p = 0; p < pages;) {
    uint64_t q = p + 1;
    while (q < pages && kind[q] == kind[p] &&
           (kind[p] != kKindStored || storage_index[q] == storage_index[q - 1] + 1)) {
      ++q;
    }
    PageRun run;
    run.kind = kind[p] == kKindZero ? PageKind::kZero : kind[p] == kKindParent ? PageKind::kParent : PageKind::kStored;
    run.pages = q - p;
    if (run.kind == PageKind::kStored) run.first_stored = storage_index[p];
    m.runs.push_back(run);
    p = q;
  }

  auto encoded = serialize_manifest(m);
  if (!encoded) return std::unexpected(encoded.error());
  report.manifest_bytes = encoded->size();
  // Every blob durable and in place before the manifest that names them.
  if (auto st = store.sync(deferred); !st) return std::unexpected(st.error());
  if (o.check_before_manifest) {
    if (auto st = o.check_before_manifest(); !st) return std::unexpected(st.error());
  }
  if (o.before_manifest) o.before_manifest();
  // Last: until this rename the image does not exist.
  if (auto w = store.write_manifest(o.name, *encoded); !w) return std::unexpected(w.error());
  if (o.progress) o.progress(size * 2, size * 2);
  return report;
}

Result<CreateReport> create_image(Store& store, const CreateOptions& o) {
  if (auto st = check_create_settings(o.name, o.page_size, o.frame_pages, o.zstd_level); !st) {
    return std::unexpected(st.error());
  }
  if (o.diff_file && !o.parent) return fail("a Diff snapshot file needs --parent (its holes mean 'as in the parent')", EINVAL);
  UniqueFd fd(::open(o.memory_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno("cannot open " + o.memory_path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat " + o.memory_path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto guest_pages = check_guest_size(o.memory_path, size, o.page_size);
  if (!guest_pages) return std::unexpected(guest_pages.error());
  const uint64_t pages = *guest_pages;

  PagesCreateOptions in;
  in.name = o.name;
  in.parent = o.parent;
  in.source = o.memory_path;
  in.page_size = o.page_size;
  in.guest_bytes = size;
  in.zstd_level = o.zstd_level;
  in.frame_pages = o.frame_pages;
  in.working_set_path = o.working_set_path;
  in.threads = o.threads;
  in.progress = o.progress;
  in.before_manifest = o.before_manifest;
  // A raw file: every page is a candidate. A Diff file: its holes are "as
  // in the parent", its data extents candidates (new even if they hold zeros
  // or the parent's bytes: the comparison decides how they are stored).
  in.pages.assign(pages, PageInput::kCandidate);
  if (o.diff_file) {
    auto d = data_pages(fd.get(), o.memory_path, size, o.page_size);
    if (!d) return std::unexpected(d.error());
    for (uint64_t p = 0; p < pages; ++p) {
      if (!(*d)[p]) in.pages[p] = PageInput::kAsParent;
    }
  }
  Mapping map;
  if (size > 0) {
    auto m = Mapping::map(size, PROT_READ, MAP_SHARED, fd.get());
    if (!m) return fail(o.memory_path + ": " + m.error().message, m.error().code);
    map = std::move(*m);
    ::madvise(map.get(), size, MADV_SEQUENTIAL);  // a hint; failure changes nothing
  }
  // The pages are in the mapping already: no copy.
  in.read = [&](uint64_t first_page, uint64_t, std::span<uint8_t>) -> Result<const uint8_t*> {
    return map.bytes() + first_page * o.page_size;
  };
  in.max_read_bytes = 64ull << 20;
  return create_image_from_pages(store, in);
}

Status flatten_image(Store& store, const std::string& name, const std::string& out_path, const Progress& progress) {
  ImageHold hold = hold_image(store, name, "flattened");  // the lease, until the file is written
  auto chain = ImageChain::open(store, name);
  hold.lock.reset();
  if (!chain) return std::unexpected(chain.error());
  auto out = AtomicFileWriter::create(out_path);
  if (!out) return std::unexpected(out.error());
  // A fresh file of the guest's size reads zero everywhere: zero pages stay holes.
  if (auto st = out->truncate(chain->guest_bytes()); !st) return st;
  const uint32_t page_size = chain->page_size();
  uint64_t total_frames = 0, done_frames = 0;
  for (const Layer& l : chain->layers()) total_frames += l.manifest.frames.size();
  // Layer by layer, frame by frame: each frame still in use is fetched and
  // decompressed once, whatever order its pages are in.
  for (uint32_t li = 0; li < chain->layers().size(); ++li) {
    const Manifest& m = chain->layers()[li].manifest;
    const std::vector<uint64_t> guest_of = chain->guest_pages_of_storage(li);
    for (uint64_t f = 0; f < m.frames.size(); ++f, ++done_frames) {
      if (progress && done_frames % 16 == 0) progress(done_frames, total_frames);
      const uint64_t first = f * m.frame_pages;
      auto live = [&](uint64_t s) { return chain->locate(guest_of[s]).layer == li && !chain->locate(guest_of[s]).zero; };
      bool any = false;
      for (uint64_t s = first; s < first + m.frames[f].pages && !any; ++s) any = live(s);
      if (!any) continue;  // every page of it is overridden by a child
      auto frame = chain->read_frame(li, f);
      if (!frame) return std::unexpected(frame.error());
      for (uint64_t s = first; s < first + m.frames[f].pages;) {
        if (!live(s)) {
          ++s;
          continue;
        }
        // Coalesce pages that are consecutive both in the frame and in the guest.
        uint64_t e = s + 1;
        while (e < first + m.frames[f].pages && live(e) && guest_of[e] == guest_of[e - 1] + 1) ++e;
        const std::string_view bytes(frame->data() + (s - first) * page_size, (e - s) * page_size);
        if (auto st = out->pwrite_all(bytes, guest_of[s] * page_size); !st) return st;
        s = e;
      }
    }
  }
  if (progress) progress(total_frames, total_frames);
  return out->commit();
}

// Everything about one frame that verify checks (load_frame's kEverything):
// the blob is there, has the manifest's size, matches its SHA-256 name and
// (version 2) the manifest's checksum, and decompresses to the frame's pages.
// Null when all is well.
static std::optional<Error> check_frame(Store& store, const FrameRef& f, uint32_t page_size, const std::string& what) {
  auto frame = load_frame(store, f, page_size, what, FrameCheck::kEverything);
  if (frame) return std::nullopt;
  return frame.error();
}

Result<VerifyReport> verify_image(Store& store, const std::string& name, const Progress& progress) {
  VerifyReport report;
  ImageHold hold = hold_image(store, name, "verified");  // the lease, until every frame is checked
  auto chain = ImageChain::open(store, name);
  hold.lock.reset();
  if (!chain) {
    report.problems.push_back(chain.error());
    // The chain is broken (a missing or changed ancestor, say), but the
    // image's own frames can still be checked, so the report says all.
    auto bytes = store.read_manifest(name);
    if (!bytes) return report;
    const std::string what = "image " + name + " (" + store.describe_manifest(name) + ")";
    auto m = parse_manifest(*bytes, what);
    if (!m) return report;
    report.layers = 1;
    for (const FrameRef& f : m->frames) {
      if (auto problem = check_frame(store, f, m->page_size, what)) report.problems.push_back(std::move(*problem));
      ++report.frames_checked;
    }
    return report;
  }
  report.layers = chain->layers().size();
  uint64_t total = 0;
  for (const Layer& l : chain->layers()) total += l.manifest.frames.size();
  for (uint32_t li = 0; li < chain->layers().size(); ++li) {
    for (uint64_t f = 0; f < chain->layers()[li].manifest.frames.size(); ++f) {
      if (progress && report.frames_checked % 16 == 0) progress(report.frames_checked, total);
      const Manifest& m = chain->layers()[li].manifest;
      if (auto problem = check_frame(store, m.frames[f], m.page_size, chain->describe_layer(li))) {
        report.problems.push_back(std::move(*problem));
      }
      ++report.frames_checked;
    }
  }
  if (progress) progress(total, total);
  return report;
}

Result<InspectReport> inspect_image(Store& store, const std::string& name) {
  auto chain = ImageChain::open(store, name);
  if (!chain) return std::unexpected(chain.error());
  InspectReport r;
  r.page_size = chain->page_size();
  r.guest_bytes = chain->guest_bytes();
  std::unordered_set<BlobId, BlobIdHash> seen;
  for (const Layer& l : chain->layers()) {
    LayerInfo info;
    info.name = l.name;
    info.version = manifest_version(l.manifest);
    if (l.manifest.parent) info.parent = l.manifest.parent->name;
    for (const PageRun& run : l.manifest.runs) {
      (run.kind == PageKind::kZero ? info.zero_pages : run.kind == PageKind::kParent ? info.parent_pages
                                                                                      : info.stored_pages) += run.pages;
    }
    info.frames = l.manifest.frames.size();
    info.manifest_bytes = l.manifest_bytes;
    for (const FrameRef& f : l.manifest.frames) {
      info.stored_bytes += f.compressed_bytes;
      if (seen.insert(f.id).second) {
        r.unique_bytes += f.compressed_bytes;
        r.uncompressed_bytes += static_cast<uint64_t>(f.pages) * l.manifest.page_size;
      }
    }
    r.stored_bytes += info.stored_bytes;
    r.layers.push_back(std::move(info));
  }
  r.frames = seen.size();
  for (uint64_t p = 0; p < chain->guest_pages(); ++p) {
    (chain->locate(p).zero ? r.zero_pages : r.stored_pages) += 1;
  }
  r.compression_ratio = r.unique_bytes == 0 ? 0 : static_cast<double>(r.uncompressed_bytes) / r.unique_bytes;
  return r;
}

Result<std::vector<ImageListing>> list_images(Store& store) {
  auto names = store.list_manifests();
  if (!names) return std::unexpected(names.error());
  std::sort(names->begin(), names->end());
  std::vector<ImageListing> out;
  out.reserve(names->size());
  for (const std::string& name : *names) {
    ImageListing l;
    l.name = name;
    auto bytes = store.read_manifest(name);
    if (!bytes) {
      l.problem = bytes.error();
      out.push_back(std::move(l));
      continue;
    }
    auto m = parse_manifest(*bytes, "image " + name + " (" + store.describe_manifest(name) + ")");
    if (!m) {
      l.problem = m.error();
      out.push_back(std::move(l));
      continue;
    }
    if (m->parent) l.parent = m->parent->name;
    l.page_size = m->page_size;
    l.guest_bytes = m->guest_bytes;
    l.stored_pages = m->stored_pages;
    l.frames = m->frames.size();
    for (const FrameRef& f : m->frames) l.stored_bytes += f.compressed_bytes;
    l.manifest_bytes = bytes->size();
    l.version = manifest_version(*m);
    out.push_back(std::move(l));
  }
  auto leases = store.live_leases(/*remove_stale=*/false, nullptr);
  if (!leases) return std::unexpected(leases.error());
  for (ImageLease& lease : *leases) {
    auto it = std::ranges::find(out, lease.image, &ImageListing::name);
    if (it != out.end()) it->leases.push_back(std::move(lease));
  }
  return out;
}

Status delete_image(Store& store, const std::string& name, const DeleteOptions& options) {
  if (auto st = check_image_name(name); !st)
    return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  // Exclusive, as gc: no create holds a parent it read, or is about to read one.
  std::unique_ptr<StoreLock> lock;
  auto locked = store.lock_exclusive(options.on_lock_wait);
  if (locked) {
    lock = std::move(*locked);
  } else if (locked.error().code != ENOTSUP) {  // a bucket: no lock (see the contract)
    return std::unexpected(locked.error());
  }
  // One listing answers both questions: whether the image exists, and which
  // images name it as their parent.
  auto images = list_images(store);
  if (!images) return std::unexpected(images.error());
  if (std::ranges::none_of(*images, [&](const ImageListing& l) { return l.name == name; })) {
    return fail("image " + name + " does not exist (no " + store.describe_manifest(name) + ")", ENOENT);
  }
  std::vector<std::string> children;
  for (const ImageListing& l : *images) {
    if (l.problem && l.name != name) {  // an image unreadable itself can still be deleted
      return fail("image " + name +
                      " not deleted: another image of the store cannot be read, and could be its child: " +
                      l.problem->describe(),
                  l.problem->code);
    }
    if (l.parent == name) children.push_back(l.name);
  }
  if (!children.empty()) {
    std::string list;
    for (const std::string& c : children) list += (list.empty() ? "" : ", ") + c;
    return fail("image " + name + " not deleted: it is the parent of " + list + " (delete those first)", EBUSY);
  }
  // Under the exclusive lock (a directory store) a lease's holder cannot be
  // between taking it and reading the manifests: a server that is not listed
  // here will find no image.
  auto leases = store.live_leases(/*remove_stale=*/lock != nullptr, nullptr);
  if (!leases) return std::unexpected(leases.error());
  std::string users;
  for (const ImageLease& l : *leases) {
    if (l.image == name) users += (users.empty() ? "" : "; ") + l.use + " by " + l.describe();
  }
  if (!users.empty()) {
    return fail("image " + name + " not deleted: it is being " + users +
                    " (detach or stop what serves it, or let the reading command finish, first)",
                EBUSY);
  }
  return store.remove_manifest(name);
}

Result<GcReport> gc_store(Store& store, const GcOptions& options) {
  // Exclusive: no create is between its first blob and its manifest, so
  // every blob a finished or future image needs is referenced by a manifest
  // listed below, or will be written after we are done.
  auto lock = store.lock_exclusive(options.on_lock_wait);
  if (!lock) return std::unexpected(lock.error());
  GcReport report;
  auto names = store.list_manifests();
  if (!names) return std::unexpected(names.error());
  std::unordered_set<BlobId, BlobIdHash> referenced;
  for (const std::string& name : *names) {
    auto bytes = store.read_manifest(name);
    if (!bytes) return fail("gc refused (nothing removed): " + bytes.error().describe(), bytes.error().code);
    auto m = parse_manifest(*bytes, "image " + name + " (" + store.describe_manifest(name) + ")");
    if (!m) {
      return fail("gc refused (nothing removed): an image it cannot read may reference any blob: " +
                      m.error().describe(),
                  m.error().code);
    }
    for (const FrameRef& f : m->frames) referenced.insert(f.id);
    ++report.images;
  }
  auto blobs = store.list();
  if (!blobs) return std::unexpected(blobs.error());
  report.blobs = blobs->size();
  auto* local = dynamic_cast<LocalStore*>(&store);
  for (const BlobId& id : *blobs) {
    if (referenced.contains(id)) continue;
    struct stat st {};
    if (local != nullptr && ::stat(local->describe(id).c_str(), &st) == 0) report.removed_bytes += st.st_size;
    if (!options.dry_run) {
      if (auto rm = store.remove(id); !rm) return std::unexpected(rm.error());
    }
    ++report.removed_blobs;
  }
  if (local != nullptr && !options.dry_run) {
    auto stale = store.live_leases(/*remove_stale=*/true, &report.removed_stale_leases);
    if (!stale) return std::unexpected(stale.error());
    auto tmp = local->remove_temporaries();
    if (!tmp) return std::unexpected(tmp.error());
    report.removed_temporaries = *tmp;
  }
  return report;
}

}  // namespace faultline::image
