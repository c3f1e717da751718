#include "common/atomic_file.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <utility>

#include "common/unique_fd.h"

namespace faultline {

Status check_plain_file_name(std::string_view name) {
  if (name.empty()) return fail("the file name is empty", EINVAL);
  if (name.size() > 255) return fail("the file name is longer than 255 bytes", ENAMETOOLONG);
  if (name.find('/') != std::string_view::npos) return fail("a file name may not contain '/'", EINVAL);
  if (name.find('\0') != std::string_view::npos) return fail("a file name may not contain a NUL byte", EINVAL);
  if (name.front() == '.') return fail("a file name may not start with '.'", EINVAL);
  return {};
}

Result<std::string> random_name_suffix() {
  uint64_t r = 0;
  if (::getrandom(&r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) return fail_errno("getrandom failed");
  char suffix[24];
  std::snprintf(suffix, sizeof suffix, "%012llx", static_cast<unsigned long long>(r & 0xffffffffffffull));
  return std::string(suffix);
}

Result<std::pair<UniqueFd, std::string>> create_temporary_file(int dir_fd, const std::string& final_name, mode_t mode) {
  // A random suffix: a name someone planted in advance is never ours, and
  // O_EXCL refuses it instead of writing through it.
  std::string tmp;
  UniqueFd file;
  for (int attempt = 0; attempt < 8 && !file; ++attempt) {
    auto suffix = random_name_suffix();
    if (!suffix) return std::unexpected(suffix.error());
    tmp = "." + final_name + ".tmp-" + *suffix;
    file.reset(::openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
    if (!file && errno != EEXIST) return fail_errno("cannot create " + tmp);
  }
  if (!file) return fail("cannot find a free temporary name for " + final_name, EEXIST);
  // The mode passed to openat is filtered by the umask; set it exactly.
  if (::fchmod(file.get(), mode) != 0) {
    auto e = fail_errno("cannot set the mode of " + tmp);
    ::unlinkat(dir_fd, tmp.c_str(), 0);
    return e;
  }
  return std::make_pair(std::move(file), tmp);
}

namespace {
// Renames `tmp` to `final_name` in `dir_fd`, failing with EEXIST when
// `final_name` exists and `if_exists` says so.
int rename_into_place(int dir_fd, const std::string& tmp, const std::string& final_name, IfExists if_exists) {
  if (if_exists == IfExists::kReplace) return ::renameat(dir_fd, tmp.c_str(), dir_fd, final_name.c_str());
  if (::renameat2(dir_fd, tmp.c_str(), dir_fd, final_name.c_str(), RENAME_NOREPLACE) == 0) return 0;
  if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) return -1;
  // A file system (EINVAL, EOPNOTSUPP) or a kernel or sandbox (ENOSYS) without
  // RENAME_NOREPLACE: a hard link is just as exclusive (EEXIST), and the
  // temporary name then goes.
  if (::linkat(dir_fd, tmp.c_str(), dir_fd, final_name.c_str(), 0) != 0) return -1;
  ::unlinkat(dir_fd, tmp.c_str(), 0);
  return 0;
}
}  // namespace

Status write_file_atomically(int dir_fd, std::string_view name, std::string_view bytes, mode_t mode,
                             IfExists if_exists) {
  if (auto st = check_plain_file_name(name); !st) return st;
  const std::string final_name(name);
  auto created = create_temporary_file(dir_fd, final_name, mode);
  if (!created) return std::unexpected(created.error());
  UniqueFd file = std::move(created->first);
  const std::string tmp = created->second;
  auto abandon = [&](std::unexpected<Error> e) {
    ::unlinkat(dir_fd, tmp.c_str(), 0);
    return e;
  };
  if (auto st = pwrite_all(file.get(), bytes, 0); !st) {
    return abandon(fail("writing " + tmp + " failed", st.error().code));
  }
  if (::fsync(file.get()) != 0) return abandon(fail_errno("fsync of " + tmp + " failed"));
  if (::close(file.release()) != 0) return abandon(fail_errno("closing " + tmp + " failed"));
  if (rename_into_place(dir_fd, tmp, final_name, if_exists) != 0) {
    if (errno == EEXIST) return abandon(fail(final_name + " exists already", EEXIST));
    return abandon(fail_errno("renaming " + tmp + " to " + final_name + " failed"));
  }
  // The rename is durable only once the directory is.
  if (::fsync(dir_fd) != 0) return fail_errno("fsync of the directory holding " + final_name + " failed");
  return {};
}

Status write_file_atomically(const std::string& path, std::string_view bytes, mode_t mode, IfExists if_exists) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return fail_errno("cannot open directory " + dir);
  auto st = write_file_atomically(dir_fd.get(), name, bytes, mode, if_exists);
  if (!st) return fail(path + ": " + st.error().message, st.error().code);
  return {};
}

namespace {
std::pair<std::string, std::string> split_path(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  return {dir, name};
}
}  // namespace

Result<AtomicFileWriter> AtomicFileWriter::create(const std::string& path, mode_t mode) {
  auto [dir, name] = split_path(path);
  if (auto st = check_plain_file_name(name); !st) return fail(path + ": " + st.error().message, st.error().code);
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return fail_errno("cannot open directory " + dir);
  auto created = create_temporary_file(dir_fd.get(), name, mode);
  if (!created) return fail(path + ": " + created.error().message, created.error().code);
  return AtomicFileWriter(dir_fd.release(), created->first.release(), dir, created->second, name);
}

AtomicFileWriter::AtomicFileWriter(int dir_fd, int file_fd, std::string dir, std::string tmp, std::string name)
    : dir_fd_(dir_fd), file_fd_(file_fd), dir_(std::move(dir)), tmp_(std::move(tmp)), name_(std::move(name)) {}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& o) noexcept
    : dir_fd_(std::exchange(o.dir_fd_, -1)),
      file_fd_(std::exchange(o.file_fd_, -1)),
      dir_(std::move(o.dir_)),
      tmp_(std::move(o.tmp_)),
      name_(std::move(o.name_)),
      committed_(std::exchange(o.committed_, true)) {}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_fd_ >= 0) ::close(file_fd_);
  if (!committed_ && dir_fd_ >= 0) ::unlinkat(dir_fd_, tmp_.c_str(), 0);
  if (dir_fd_ >= 0) ::close(dir_fd_);
}

Status AtomicFileWriter::pwrite_all(std::string_view bytes, uint64_t offset) {
  if (auto st = faultline::pwrite_all(file_fd_, bytes, offset); !st) {
    return fail("writing " + dir_ + "/" + tmp_ + " failed", st.error().code);
  }
  return {};
}

Status AtomicFileWriter::truncate(uint64_t size) {
  if (::ftruncate(file_fd_, static_cast<off_t>(size)) != 0) return fail_errno("cannot size " + dir_ + "/" + tmp_);
  return {};
}

Status AtomicFileWriter::commit() {
  if (::fsync(file_fd_) != 0) return fail_errno("fsync of " + dir_ + "/" + tmp_ + " failed");
  const int fd = std::exchange(file_fd_, -1);
  if (::close(fd) != 0) return fail_errno("closing " + dir_ + "/" + tmp_ + " failed");
  if (::renameat(dir_fd_, tmp_.c_str(), dir_fd_, name_.c_str()) != 0) {
    return fail_errno("renaming " + tmp_ + " to " + name_ + " in " + dir_ + " failed");
  }
  committed_ = true;
  // The rename is durable only once the directory is.
  if (::fsync(dir_fd_) != 0) return fail_errno("fsync of the directory " + dir_ + " failed");
  return {};
}

Result<std::pair<UniqueFd, uint64_t>> open_regular_file(const std::string& path, int extra_flags) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | extra_flags));
  if (!fd) return fail_errno("cannot open " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat " + path);
  if (!S_ISREG(st.st_mode)) return fail(path + " is not a regular file", EINVAL);
  return std::make_pair(std::move(fd), static_cast<uint64_t>(st.st_size));
}

Result<std::string> read_whole_file(const std::string& path) {
  auto opened = open_regular_file(path);
  if (!opened) return std::unexpected(opened.error());
  const auto& [fd, size] = *opened;
  std::string out(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::read(fd.get(), out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("reading " + path + " failed");
    if (n == 0) break;  // shrank under us: what we got is what the checks see
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  return out;
}

Status pwrite_all(int fd, std::string_view bytes, uint64_t offset) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("write failed");
    if (n == 0) return fail("write failed", EIO);
    done += static_cast<size_t>(n);
  }
  return {};
}

}  // namespace faultline
