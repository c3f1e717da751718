#include "objstore/disk_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "common/atomic_file.h"
#include "common/unique_fd.h"
#include "image/frame.h"

namespace faultline::objstore {


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
    if (name[0] == '.') {
      ::unlink(path.c_str());  // a write a crash interrupted
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
  auto bytes = read_whole_file(path(id));
  const bool sound = bytes && (checksum ? image::frame_checksum(*bytes) == *checksum : image::BlobId::of(*bytes) == id);
  std::lock_guard lock(mu_);
  if (!sound) {
    // Gone (evicted meanwhile) or damaged: never returned; a damaged file goes.
    if (bytes) {
      ::unlink(path(id).c_str());
      ++counts_.damaged;
    }
    forget_locked(id);
    ++counts_.misses;
    return std::nullopt;
  }
  touch_locked(id);
  ::utimensat(AT_FDCWD, path(id).c_str(), nullptr, 0);  // the last use survives a restart
  ++counts_.hits;
  return std::move(*bytes);
}

Status DiskCache::put(const image::BlobId& id, std::string_view bytes) {
  if (bytes.size() > max_bytes_) return {};
  {
    std::lock_guard lock(mu_);
    if (entries_.contains(id)) {
      touch_locked(id);
      return {};
    }
    // Room first, so the directory never holds more than the bound; bytes
    // being written by other puts count as held.
    while (bytes_ + reserved_ + bytes.size() > max_bytes_ && !order_.empty()) {
      const image::BlobId victim = order_.front();
      ::unlink(path(victim).c_str());
      forget_locked(victim);
      ++counts_.evictions;
    }
    if (bytes_ + reserved_ + bytes.size() > max_bytes_) return {};  // the rest is being written: skip this one
    reserved_ += bytes.size();
  }
  // A put that fails gives its reservation back and leaves no temporary file.
  const auto failed = [&](Error e, int dir_fd = -1, const std::string& tmp_name = {}) -> Status {
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
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return failed(Error{errno, "cannot write to the frame cache " + dir_}, dir_fd.get(), tmp_name);
    done += static_cast<size_t>(n);
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
  return {};
}

DiskCache::Stats DiskCache::stats() const {
  std::lock_guard lock(mu_);
  Stats s = counts_;
  s.bytes = bytes_;
  s.blobs = entries_.size();
  return s;
}

Result<std::string> CachedStore::get(const image::BlobId& id) {
  auto blob = get_checked(id, std::nullopt);
  if (!blob) return std::unexpected(blob.error());
  return std::move(blob->bytes);
}

Result<image::FetchedBlob> CachedStore::get_checked(const image::BlobId& id, std::optional<uint64_t> checksum) {
  if (auto hit = cache_->get(id, checksum)) return image::FetchedBlob{std::move(*hit), true};  // get() checked it
  auto bytes = inner_->get(id);
  if (!bytes) return std::unexpected(bytes.error());
  // Bytes damaged on the way are not kept (the caller checks them and may
  // fetch again).
  const bool matches = image::BlobId::of(*bytes) == id;
  if (matches) {
    if (auto st = cache_->put(id, *bytes); !st) {
      if (!failing_.exchange(true) && on_cache_error_) on_cache_error_(st.error());
    } else {
      failing_.store(false);
    }
  }
  return image::FetchedBlob{std::move(*bytes), matches};
}

}  // namespace faultline::objstore
