#include "objstore/disk_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/atomic_file.h"
#include "common/unique_fd.h"
#include "image/frame.h"

namespace faultline::objstore {
namespace {

// Direct I/O moves whole blocks between disk and memory: the buffer's
// address, the file offset and the length must be multiples of the device's
// logical block size (512 or 4096 bytes; 4096 suits both).
constexpr size_t kDirectIoAlign = 4096;
// Blobs up to this size go through a buffer each thread keeps; a larger one
// (no frame is) gets a buffer of its own.
constexpr size_t kKeptBufferBytes = 4 << 20;

size_t round_up_to_block(size_t n) { return (n + kDirectIoAlign - 1) / kDirectIoAlign * kDirectIoAlign; }

// The name create_temporary_file gave a put or the O_DIRECT probe that a
// crash interrupted: ".BLOBHEX.tmp-SUFFIX" or ".direct-io-probe.tmp-SUFFIX".
// Only those are removed at open: a --cache-dir that holds other dot-files
// (a home directory by mistake, a .keep) keeps them.
bool is_interrupted_write(const std::string& name) {
  const size_t tmp = name.find(".tmp-");
  if (name.size() < 2 || name[0] != '.' || tmp == std::string::npos || tmp + 5 == name.size()) return false;
  const std::string final_name = name.substr(1, tmp - 1);
  return final_name == "direct-io-probe" || image::BlobId::from_hex(final_name).has_value();
}

// A block-aligned buffer for direct I/O. Each thread keeps one and reuses it
// for every blob it reads or writes: memory already faulted in, where a
// buffer per blob would be fresh pages every time (a fresh 4 KiB page costs
// 10-16 µs to fault in on the kvm-pvm hosts this was measured on).
class DirectIoBuffer {
 public:
  DirectIoBuffer() = default;
  DirectIoBuffer(const DirectIoBuffer&) = delete;
  DirectIoBuffer& operator=(const DirectIoBuffer&) = delete;
  ~DirectIoBuffer() { std::free(data_); }
  // REQUIRES: bytes is a multiple of kDirectIoAlign. nullptr when out of memory.
  char* reserve(size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      data_ = static_cast<char*>(std::aligned_alloc(kDirectIoAlign, bytes));
      capacity_ = data_ ? bytes : 0;
    }
    return data_;
  }

 private:
  char* data_ = nullptr;
  size_t capacity_ = 0;
};

// The calling thread's buffer, or `own` for a blob larger than a kept buffer.
char* direct_io_buffer(size_t bytes, DirectIoBuffer& own) {
  thread_local DirectIoBuffer kept;
  return bytes <= kKeptBufferBytes ? kept.reserve(bytes) : own.reserve(bytes);
}

}  // namespace

Result<std::shared_ptr<DiskCache>> DiskCache::open(const std::string& dir, uint64_t max_bytes) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return fail_errno("cannot create cache directory " + dir);
  DIR* d = ::opendir(dir.c_str());
  if (!d) return fail_errno("cannot open cache directory " + dir);
  struct Found {
    image::BlobId id;
    uint64_t bytes;
    int64_t mtime_ns;
  };
  std::vector<Found> found;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = dir + "/" + name;
    if (is_interrupted_write(name)) {
      ::unlink(path.c_str());
      continue;
    }
    auto id = image::BlobId::from_hex(name);
    struct stat st {};
    if (!id || ::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;  // not ours: left alone
    found.push_back({*id, static_cast<uint64_t>(st.st_size),
                     static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec});
  }
  ::closedir(d);
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) { return a.mtime_ns < b.mtime_ns; });
  auto cache = std::shared_ptr<DiskCache>(new DiskCache(dir, max_bytes));
  for (const Found& f : found) {
    cache->order_.push_back(f.id);
    cache->entries_[f.id] = {f.bytes, std::prev(cache->order_.end())};
    cache->bytes_ += f.bytes;
  }
  cache->probe_direct_io();
  // A smaller bound than last time: evict down to it now.
  std::lock_guard lock(cache->mu_);
  while (cache->bytes_ > max_bytes && !cache->order_.empty()) {
    const image::BlobId victim = cache->order_.front();
    ::unlink(cache->path(victim).c_str());
    cache->forget_locked(victim);
    ++cache->counts_.evictions;
  }
  return cache;
}

void DiskCache::touch_locked(const image::BlobId& id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  order_.splice(order_.end(), order_, it->second.in_order);
}

void DiskCache::forget_locked(const image::BlobId& id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  bytes_ -= it->second.bytes;
  order_.erase(it->second.in_order);
  entries_.erase(it);
}

std::optional<std::string> DiskCache::get(const image::BlobId& id, std::optional<uint64_t> checksum) {
  {
    std::lock_guard lock(mu_);
    if (!entries_.contains(id)) {
      ++counts_.misses;
      return std::nullopt;
    }
  }
  auto bytes = read_blob(path(id));
  const bool sound = bytes && (checksum ? image::frame_checksum(*bytes) == *checksum : image::BlobId::of(*bytes) == id);
  std::lock_guard lock(mu_);
  if (!sound) {
    // Never returned. A damaged file goes; one that could not be read for
    // now (out of fds, of memory, an I/O error) stays held, so the bound
    // still counts it; one evicted meanwhile is forgotten, unless a put has
    // written it again since.
    if (bytes) {
      ::unlink(path(id).c_str());
      ++counts_.damaged;
      forget_locked(id);
    } else if (bytes.error().code == ENOENT && ::access(path(id).c_str(), F_OK) != 0) {
      forget_locked(id);
    }
    ++counts_.misses;
    return std::nullopt;
  }
  touch_locked(id);
  ::utimensat(AT_FDCWD, path(id).c_str(), nullptr, 0);  // the last use survives a restart
  ++counts_.hits;
  return std::move(*bytes);
}

Result<bool> DiskCache::put(const image::BlobId& id, std::string_view bytes) {
  if (bytes.size() > max_bytes_) return false;
  {
    std::lock_guard lock(mu_);
    if (entries_.contains(id)) {
      touch_locked(id);
      return false;
    }
    // Room first, so the directory never holds more than the bound; bytes
    // being written by other puts count as held.
    while (bytes_ + reserved_ + bytes.size() > max_bytes_ && !order_.empty()) {
      const image::BlobId victim = order_.front();
      ::unlink(path(victim).c_str());
      forget_locked(victim);
      ++counts_.evictions;
    }
    if (bytes_ + reserved_ + bytes.size() > max_bytes_) return false;  // the rest is being written: skip this one
    reserved_ += bytes.size();
  }
  // A put that fails gives its reservation back and leaves no temporary file.
  const auto failed = [&](Error e, int dir_fd = -1, const std::string& tmp_name = {}) -> Result<bool> {
    if (!tmp_name.empty()) ::unlinkat(dir_fd, tmp_name.c_str(), 0);
    std::lock_guard lock(mu_);
    reserved_ -= bytes.size();
    ++counts_.put_failures;
    return std::unexpected(std::move(e));
  };
  // No fsync: a torn file after a crash fails verification on read and is
  // dropped; the rename keeps readers from ever seeing a partial one.
  UniqueFd dir_fd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return failed(Error{errno, "cannot open cache directory " + dir_});
  auto tmp = create_temporary_file(dir_fd.get(), id.hex(), 0600);
  if (!tmp) return failed(tmp.error());
  auto& [fd, tmp_name] = *tmp;
  if (auto written = write_blob(fd.get(), bytes); !written) {
    return failed(
        Error{written.error().code, "cannot write to the frame cache " + dir_ + " (" + written.error().message + ")"},
        dir_fd.get(), tmp_name);
  }
  if (::renameat(dir_fd.get(), tmp_name.c_str(), dir_fd.get(), id.hex().c_str()) != 0) {
    return failed(Error{errno, "cannot rename into the frame cache " + dir_}, dir_fd.get(), tmp_name);
  }
  std::lock_guard lock(mu_);
  reserved_ -= bytes.size();
  if (!entries_.contains(id)) {
    order_.push_back(id);
    entries_[id] = {bytes.size(), std::prev(order_.end())};
    bytes_ += bytes.size();
  }
  return true;
}

// One block written with O_DIRECT into a temporary file: write_blob turns
// direct I/O off when the file system refuses it.
void DiskCache::probe_direct_io() {
  UniqueFd dir_fd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return;  // the puts will say what is wrong
  auto tmp = create_temporary_file(dir_fd.get(), "direct-io-probe", 0600);
  if (!tmp) return;
  auto& [fd, name] = *tmp;
  (void)write_blob(fd.get(), std::string(kDirectIoAlign, '\0'));
  ::unlinkat(dir_fd.get(), name.c_str(), 0);
}

// Measured on the 2-core kvm-pvm host (7 Dec 2026): 463 puts of 512 KiB
// through the page cache cost 0.44-0.57 s of system time when the page cache
// had to take memory the host had reclaimed (free page reporting), 0.16-0.18 s
// when it reused pages just freed; with O_DIRECT the data goes from the
// buffer to the device and the page cache takes nothing. A read of what was
// written that way goes to the disk (O_DIRECT again: no page cache filled
// either); a frame in use is in the daemon's frame cache.
Result<std::string> DiskCache::read_blob(const std::string& path) {
  if (direct_io()) {
    auto opened = open_regular_file(path, O_DIRECT);
    if (!opened && opened.error().code != EINVAL) return std::unexpected(opened.error());
    if (opened) {
      const auto& [fd, file_size] = *opened;
      const size_t size = static_cast<size_t>(file_size);
      if (size == 0) return std::string();
      const size_t padded = round_up_to_block(size);
      DirectIoBuffer own;
      char* buffer = direct_io_buffer(padded, own);
      if (!buffer) return fail("out of memory reading " + path, ENOMEM);
      size_t done = 0;
      bool refused = false;
      while (done < padded) {
        const ssize_t n = ::pread(fd.get(), buffer + done, padded - done, static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EINVAL && done == 0) {
          refused = true;  // the file system takes O_DIRECT opens but not the reads
          break;
        }
        if (n < 0) return fail_errno("reading " + path + " failed");
        if (n == 0) break;  // shrank under us: what we got is what the checks see
        done += static_cast<size_t>(n);
        if (done % kDirectIoAlign != 0) break;  // end of file inside a block
      }
      if (!refused) return std::string(buffer, std::min(done, size));
    }
    direct_io_.store(false, std::memory_order_relaxed);
  }
  return read_whole_file(path);
}

Status DiskCache::write_blob(int fd, std::string_view bytes) {
  if (bytes.empty()) return {};
  const int flags = ::fcntl(fd, F_GETFL);
  if (direct_io() && flags >= 0) {
    if (::fcntl(fd, F_SETFL, flags | O_DIRECT) == 0) {
      // The blob padded with zeros to whole blocks, written from a buffer
      // aligned to them, then cut back to its size.
      const size_t padded = round_up_to_block(bytes.size());
      DirectIoBuffer own;
      char* buffer = direct_io_buffer(padded, own);
      if (!buffer) return fail("no memory for a direct I/O buffer", ENOMEM);
      std::memcpy(buffer, bytes.data(), bytes.size());
      std::memset(buffer + bytes.size(), 0, padded - bytes.size());
      size_t done = 0;
      int error = 0;
      while (done < padded) {
        const ssize_t n = ::pwrite(fd, buffer + done, padded - done, static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          error = n < 0 ? errno : EIO;  // 0 bytes written of a whole block: no progress to wait for
          break;
        }
        done += static_cast<size_t>(n);
        if (done % kDirectIoAlign != 0) break;  // a short write inside a block: the rest through the page cache
      }
      if (error != 0 && !(error == EINVAL && done == 0)) return fail("write", error);
      if (error != 0) direct_io_.store(false, std::memory_order_relaxed);  // EINVAL: O_DIRECT taken, writes refused
      if (done < padded) {
        if (::fcntl(fd, F_SETFL, flags) != 0) return fail_errno("fcntl turning O_DIRECT off");
        if (auto rest = pwrite_all(fd, std::string_view(buffer + done, padded - done), done); !rest) return rest;
      }
      if (::ftruncate(fd, static_cast<off_t>(bytes.size())) != 0) return fail_errno("ftruncate");
      return {};
    }
    if (errno == EINVAL) direct_io_.store(false, std::memory_order_relaxed);  // no O_DIRECT on this file system
  }
  return pwrite_all(fd, bytes, 0);
}

DiskCache::Stats DiskCache::stats() const {
  std::lock_guard lock(mu_);
  Stats s = counts_;
  s.bytes = bytes_;
  s.blobs = entries_.size();
  return s;
}

Result<std::string> CachedStore::get(const image::BlobId& id) { return get_sized(id, 0); }

Result<std::string> CachedStore::get_sized(const image::BlobId& id, uint64_t size) {
  auto blob = get_checked(id, std::nullopt, size);
  if (!blob) return std::unexpected(blob.error());
  return std::move(blob->bytes);
}

Result<image::FetchedBlob> CachedStore::get_checked(const image::BlobId& id, std::optional<uint64_t> checksum,
                                                    uint64_t size) {
  if (auto hit = cache_->get(id, checksum)) return image::FetchedBlob{std::move(*hit), true};  // get() checked it
  auto bytes = inner_->get_sized(id, size);
  if (!bytes) return std::unexpected(bytes.error());
  // Bytes damaged on the way are not kept (the caller checks them and may
  // fetch again).
  const bool matches = image::BlobId::of(*bytes) == id;
  if (matches) {
    // Reported once per episode of failures, for every image of the
    // daemon together; a put that skipped the blob says nothing either way.
    if (auto st = cache_->put(id, *bytes); !st) {
      if (cache_->failure_starts_episode() && on_cache_error_) on_cache_error_(st.error());
    } else if (*st) {
      cache_->put_worked();
    }
  }
  return image::FetchedBlob{std::move(*bytes), matches};
}

}  // namespace faultline::objstore
