#include "image/local_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string_view>
#include <tuple>

#include "common/atomic_file.h"
#include "common/unique_fd.h"
#include "image/manifest.h"

namespace faultline::image {
namespace {

// Creates `path` unless it exists. A directory it creates is made durable
// in its parent (fsync of the parent), so that a blob or manifest written
// into it and fsynced afterwards cannot be lost with the directory's entry
// in a crash (a blob fan directory of put(), whose file's own fsync covers
// only the fan).
Status make_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0) {
    if (errno == EEXIST) return {};
    return fail_errno("cannot create directory " + path);
  }
  const std::string_view trimmed(path.data(), path.find_last_not_of('/') + 1);  // "store/" -> "store"
  const size_t slash = trimmed.find_last_of('/');
  const std::string parent = slash == std::string_view::npos ? "."
                             : slash == 0                    ? "/"
                                                             : std::string(trimmed.substr(0, slash));
  UniqueFd dir(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir || ::fsync(dir.get()) != 0)
    return fail_errno("fsync of " + parent + " (holding the new " + path + ") failed");
  return {};
}

Result<std::vector<std::string>> list_dir(const std::string& path) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(path.c_str()), ::closedir);
  if (!d) {
    if (errno == ENOENT) return std::vector<std::string>{};
    return fail_errno("cannot list " + path);
  }
  std::vector<std::string> names;
  errno = 0;
  while (dirent* e = ::readdir(d.get())) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  if (errno != 0) return fail_errno("cannot list " + path);
  return names;
}

class FlockLock final : public StoreLock {
 public:
  explicit FlockLock(UniqueFd fd) : fd_(std::move(fd)) {}
  // Closing the descriptor releases the flock.
 private:
  UniqueFd fd_;
};

// A lease file, exclusively flocked by its holder. Released by unlinking it
// and then closing it (a checker that opened it just before sees it held a
// moment longer; one that opens it after finds nothing).
class LeaseFile final : public StoreLock {
 public:
  LeaseFile(UniqueFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}
  ~LeaseFile() override { ::unlink(path_.c_str()); }

 private:
  UniqueFd fd_;
  std::string path_;
};

constexpr std::string_view kLeasePrefix = "lease-";

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// "image NAME\npid P\nhost H\nsince T\nuse U\n" -> the fields; unknown lines
// are skipped, and a lease without "use" (written before it existed) is "served".
ImageLease parse_lease(const std::string& text, std::string path) {
  ImageLease l;
  l.path = std::move(path);
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    const size_t space = line.find(' ');
    if (space == std::string::npos) continue;
    const std::string key = line.substr(0, space), value = line.substr(space + 1);
    if (key == "image") {
      l.image = value;
    } else if (key == "pid") {
      l.pid = std::strtoll(value.c_str(), nullptr, 10);
    } else if (key == "host") {
      l.host = value;
    } else if (key == "since") {
      l.since = value;
    } else if (key == "use" && !value.empty()) {
      l.use = value;
    }
  }
  return l;
}

}  // namespace

Result<std::unique_ptr<LocalStore>> LocalStore::open(const std::string& dir, bool create) {
  if (dir.empty()) return fail("the store directory is empty", EINVAL);
  if (create) {
    for (const std::string& d : {dir, dir + "/blobs", dir + "/blobs/sha256", dir + "/images", dir + "/leases"}) {
      if (auto st = make_dir(d); !st) return std::unexpected(st.error());
    }
  }
  struct stat st {};
  if (::stat((dir + "/images").c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return fail(dir + " is not an image store (no images/ directory)", ENOENT);
  }
  return std::unique_ptr<LocalStore>(new LocalStore(dir));
}

std::string LocalStore::blob_dir(const BlobId& id) const {
  return dir_ + "/blobs/sha256/" + id.hex().substr(0, 2);
}

std::string LocalStore::describe(const BlobId& id) const { return blob_dir(id) + "/" + id.hex(); }

int LocalStore::useful_concurrent_gets() const {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  if (::sched_getaffinity(0, sizeof(cpus), &cpus) != 0) return 1;
  return std::max(1, CPU_COUNT(&cpus));
}

std::string LocalStore::describe_manifest(const std::string& name) const { return dir_ + "/images/" + name; }

Result<std::string> LocalStore::get(const BlobId& id) {
  auto bytes = read_whole_file(describe(id));
  if (!bytes && bytes.error().code == ENOENT) return fail("blob " + id.hex() + " is missing from the store", ENOENT);
  return bytes;
}

Result<bool> LocalStore::exists(const BlobId& id) {
  struct stat st {};
  if (::lstat(describe(id).c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return fail_errno("cannot stat " + describe(id));
}

Status LocalStore::put(const BlobId& id, std::string_view bytes) {
  auto present = exists(id);
  if (!present) return std::unexpected(present.error());
  if (*present) return {};
  if (auto st = make_dir(blob_dir(id)); !st) return st;
  return write_file_atomically(describe(id), bytes, 0444);
}

Status LocalStore::put_deferred(const BlobId& id, std::string_view bytes, DeferredPuts& batch) {
  auto present = exists(id);
  if (!present) return std::unexpected(present.error());
  if (*present) return {};
  const std::string dir = blob_dir(id);
  if (auto st = make_dir(dir); !st) return st;
  // The temporary naming of common/atomic_file.h, so gc's cleanup of
  // interrupted writes covers these too.
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return fail_errno("cannot open " + dir);
  auto created = create_temporary_file(dir_fd.get(), id.hex(), 0444);
  if (!created) return std::unexpected(created.error());
  UniqueFd file = std::move(created->first);
  const std::string tmp = dir + "/" + created->second;
  if (auto st = pwrite_all(file.get(), bytes, 0); !st) {
    ::unlink(tmp.c_str());
    return fail("writing " + tmp + " failed", st.error().code);
  }
  batch.add(tmp, describe(id));
  return {};
}

Status LocalStore::sync(DeferredPuts& pending) {
  // Taken: from here on, what fails to be renamed is reported, not removed
  // (a renamed one is in place, and may be another writer's too).
  const std::vector<std::pair<std::string, std::string>> batch = pending.take();
  UniqueFd dir_fd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return fail_errno("cannot open " + dir_);
  // Even with nothing of our own pending: a blob we found present may have
  // been renamed into place by a concurrent create that has yet to flush it.
  // First the bytes of every temporary, then the names: a crash in between
  // leaves temporaries (gc removes them), never a named blob with lost bytes.
  if (::syncfs(dir_fd.get()) != 0) return fail_errno("syncfs on " + dir_ + " failed");
  for (const auto& [tmp, final_path] : batch) {
    if (::rename(tmp.c_str(), final_path.c_str()) != 0) return fail_errno("renaming " + tmp + " to " + final_path + " failed");
  }
  if (::syncfs(dir_fd.get()) != 0) return fail_errno("syncfs on " + dir_ + " failed");
  return {};
}

Result<std::vector<BlobId>> LocalStore::list() {
  std::vector<BlobId> ids;
  auto fans = list_dir(dir_ + "/blobs/sha256");
  if (!fans) return std::unexpected(fans.error());
  for (const std::string& fan : *fans) {
    auto names = list_dir(dir_ + "/blobs/sha256/" + fan);
    if (!names) return std::unexpected(names.error());
    for (const std::string& name : *names) {
      // Temporaries (dot files) and strangers are not blobs.
      auto id = BlobId::from_hex(name);
      if (id && id->hex().substr(0, 2) == fan) ids.push_back(*id);
    }
  }
  return ids;
}

Status LocalStore::remove(const BlobId& id) {
  if (::unlink(describe(id).c_str()) != 0 && errno != ENOENT) return fail_errno("cannot remove " + describe(id));
  return {};
}

Result<std::string> LocalStore::read_manifest(const std::string& name) {
  if (auto st = check_image_name(name); !st) return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  auto bytes = read_whole_file(describe_manifest(name));
  if (!bytes && bytes.error().code == ENOENT) {
    return fail("image " + name + " does not exist (no " + describe_manifest(name) + ")", ENOENT);
  }
  return bytes;
}

Result<bool> LocalStore::manifest_exists(const std::string& name) {
  if (auto st = check_image_name(name); !st) return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  struct stat st {};
  if (::lstat(describe_manifest(name).c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return fail_errno("cannot stat " + describe_manifest(name));
}

Status LocalStore::write_manifest(const std::string& name, std::string_view bytes) {
  if (auto st = check_image_name(name); !st) return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  auto present = manifest_exists(name);
  if (!present) return std::unexpected(present.error());
  if (*present) return fail("image " + name + " exists already in " + dir_, EEXIST);
  // Checked again by the rename itself: of two writers of one name that
  // both passed the check above, the later one fails instead of replacing
  // the image the first one wrote.
  auto st = write_file_atomically(describe_manifest(name), bytes, 0444, IfExists::kFail);
  if (!st && st.error().code == EEXIST) return fail("image " + name + " exists already in " + dir_, EEXIST);
  return st;
}

Status LocalStore::remove_manifest(const std::string& name) {
  if (auto st = check_image_name(name); !st)
    return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  const std::string path = describe_manifest(name);
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return fail("image " + name + " does not exist (no " + path + ")", ENOENT);
    return fail_errno("cannot remove " + path);
  }
  // The name's removal survives a crash once its directory is synced.
  UniqueFd dir(::open((dir_ + "/images").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir || ::fsync(dir.get()) != 0) return fail_errno("fsync of " + dir_ + "/images failed");
  return {};
}

Result<std::vector<std::string>> LocalStore::list_manifests() {
  auto names = list_dir(dir_ + "/images");
  if (!names) return std::unexpected(names.error());
  std::vector<std::string> out;
  for (const std::string& n : *names) {
    if (check_plain_file_name(n)) out.push_back(n);  // skips temporaries
  }
  return out;
}

Result<std::unique_ptr<StoreLock>> LocalStore::lock(int operation, const std::function<void()>& on_wait) {
  const std::string path = dir_ + "/lock";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd && (errno == EROFS || errno == EACCES)) {
    // A store this process may only read (a read-only mount, another
    // owner's files): flock needs no write access to the file.
    fd.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  }
  if (!fd) return fail_errno("cannot open the store lock " + path);
  if (::flock(fd.get(), operation | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return fail_errno("cannot lock " + path);
    if (on_wait) on_wait();
    while (::flock(fd.get(), operation) != 0) {
      if (errno != EINTR) return fail_errno("cannot lock " + path);
    }
  }
  return std::unique_ptr<StoreLock>(new FlockLock(std::move(fd)));
}

Result<std::unique_ptr<StoreLock>> LocalStore::lock_shared(const std::function<void()>& on_wait) {
  return lock(LOCK_SH, on_wait);
}

Result<std::unique_ptr<StoreLock>> LocalStore::lock_exclusive(const std::function<void()>& on_wait) {
  return lock(LOCK_EX, on_wait);
}

Result<std::unique_ptr<StoreLock>> LocalStore::lease(const std::string& name, std::string_view use) {
  if (auto st = check_image_name(name); !st)
    return fail("bad image name '" + name + "': " + st.error().message, EINVAL);
  const std::string leases = dir_ + "/leases";
  // Stores made before leases existed have no leases/ directory yet.
  if (auto st = make_dir(leases); !st) return std::unexpected(st.error());
  UniqueFd dir(::open(leases.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) return fail_errno("cannot open " + leases);
  auto suffix = random_name_suffix();
  if (!suffix) return std::unexpected(suffix.error());
  const std::string final_name = std::string(kLeasePrefix) + std::to_string(::getpid()) + "-" + *suffix;
  auto tmp = create_temporary_file(dir.get(), final_name, 0644);
  if (!tmp) return std::unexpected(tmp.error());
  auto& [fd, tmp_name] = *tmp;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::string text = "image " + name + "\npid " + std::to_string(::getpid()) + "\nhost " + host + "\nsince " +
                           utc_now() + "\nuse " + std::string(use) + "\n";
  Status written = [&]() -> Status {
    if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
      return fail_errno("cannot write the lease " + leases + "/" + tmp_name);
    }
    // Held before the file has its name: a lease seen under its name is held
    // or its holder is gone, never "not yet held".
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      return fail_errno("cannot lock the lease " + leases + "/" + tmp_name);
    }
    if (::renameat(dir.get(), tmp_name.c_str(), dir.get(), final_name.c_str()) != 0) {
      return fail_errno("cannot rename the lease " + leases + "/" + tmp_name);
    }
    return {};
  }();
  if (!written) {
    ::unlinkat(dir.get(), tmp_name.c_str(), 0);
    return std::unexpected(written.error());
  }
  return std::unique_ptr<StoreLock>(new LeaseFile(std::move(fd), leases + "/" + final_name));
}

Result<std::vector<ImageLease>> LocalStore::live_leases(bool remove_stale, uint64_t* removed) {
  if (removed != nullptr) *removed = 0;
  const std::string leases = dir_ + "/leases";
  auto names = list_dir(leases);
  if (!names) return std::unexpected(names.error());
  std::vector<ImageLease> live;
  for (const std::string& n : *names) {
    if (!n.starts_with(kLeasePrefix)) continue;  // temporaries are dot files
    const std::string path = leases + "/" + n;
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      if (errno == ENOENT) continue;  // released meanwhile
      return fail_errno("cannot open the lease " + path);
    }
    if (::flock(fd.get(), LOCK_SH | LOCK_NB) == 0) {  // nobody holds it: its process is gone
      if (remove_stale && ::unlink(path.c_str()) == 0 && removed != nullptr) ++*removed;
      continue;
    }
    if (errno != EWOULDBLOCK) return fail_errno("cannot check the lease " + path);
    auto text = read_whole_file(path);
    if (!text) {
      if (text.error().code == ENOENT) continue;
      return std::unexpected(text.error());
    }
    live.push_back(parse_lease(*text, path));
  }
  std::sort(live.begin(), live.end(), [](const ImageLease& a, const ImageLease& b) {
    return std::tie(a.image, a.path) < std::tie(b.image, b.path);
  });
  return live;
}

Result<uint64_t> LocalStore::remove_temporaries() {
  uint64_t removed = 0;
  std::vector<std::string> dirs{dir_ + "/images", dir_ + "/leases"};
  auto fans = list_dir(dir_ + "/blobs/sha256");
  if (!fans) return std::unexpected(fans.error());
  for (const std::string& fan : *fans) dirs.push_back(dir_ + "/blobs/sha256/" + fan);
  for (const std::string& d : dirs) {
    auto names = list_dir(d);
    if (!names) return std::unexpected(names.error());
    for (const std::string& n : *names) {
      // Only our own temporaries: ".NAME.tmp-XXXXXXXXXXXX" (common/atomic_file.cc).
      if (n.front() != '.' || n.find(".tmp-") == std::string::npos) continue;
      if (::unlink((d + "/" + n).c_str()) == 0) ++removed;
    }
  }
  return removed;
}

}  // namespace faultline::image
