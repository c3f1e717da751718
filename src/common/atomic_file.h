// Writing a file so that readers see either the old one or the whole new
// one, and so that nobody who can write the directory can redirect the write.
//
// The bytes go to a temporary file created in the same directory with
// O_CREAT|O_EXCL|O_NOFOLLOW (a fresh random name, so neither a planted
// symlink nor a file planted under the temporary name is ever opened), are
// fsynced, and the file is renamed over the final name (rename replaces a
// symlink there, never follows it); then the directory is fsynced so the
// rename survives a crash. An interrupted write leaves at most a temporary
// file named ".NAME.tmp-XXXXXX", never a half-written NAME.
//
// Thread-safety: free functions with no shared state.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline {

// Checks that `name` is one plain file name: not empty, at most 255 bytes, no
// '/', no NUL, not "." or "..", and not starting with '.' (the temporary
// files are dot files; hidden names are refused so none can be clobbered).
Status check_plain_file_name(std::string_view name);

// 12 random hex digits (getrandom), for names no one can plant in advance.
Result<std::string> random_name_suffix();

// Creates the temporary ".FINAL_NAME.tmp-XXXXXXXXXXXX" (random suffix) in the
// directory open as `dir_fd`, with O_CREAT|O_EXCL|O_NOFOLLOW and exactly
// `mode`; returns its fd and its name relative to `dir_fd`. Every crash-safe
// writer uses it, so one naming covers gc's cleanup of interrupted writes.
Result<std::pair<UniqueFd, std::string>> create_temporary_file(int dir_fd, const std::string& final_name, mode_t mode);

// Opens `path` read-only with O_NOFOLLOW and `extra_flags` (e.g. O_DIRECT)
// and returns it with its size; anything but a regular file is refused.
Result<std::pair<UniqueFd, uint64_t>> open_regular_file(const std::string& path, int extra_flags = 0);

// The whole of a regular file (O_NOFOLLOW): what a reader of files written
// by the functions below sees. A file that shrinks while read gives what was read.
Result<std::string> read_whole_file(const std::string& path);

// pwrite()s all of `bytes` at `offset`, again after EINTR and short writes.
// The error's code is the errno (EIO for a write that made no progress); its
// message says only "write failed", so callers name the file.
Status pwrite_all(int fd, std::string_view bytes, uint64_t offset);

// What write_file_atomically() does when a file of that name exists: replace
// it, or fail with EEXIST (the rename is RENAME_NOREPLACE, so of two writers
// racing on one name exactly one succeeds).
enum class IfExists { kReplace, kFail };

// Writes `bytes` to `name` (checked with check_plain_file_name()) inside the
// directory open as `dir_fd`.
Status write_file_atomically(int dir_fd, std::string_view name, std::string_view bytes, mode_t mode = 0644,
                             IfExists if_exists = IfExists::kReplace);

// Same, for a path: its directory is opened (O_DIRECTORY) and the last
// component is the name. Trusted paths only (the operator's command line):
// directories along the path are followed as usual.
Status write_file_atomically(const std::string& path, std::string_view bytes, mode_t mode = 0644,
                             IfExists if_exists = IfExists::kReplace);

// A file too large to hold in memory, written the same way: the bytes go to a
// fresh temporary file beside `path` (pwrite at any offset, so a sparse file
// stays sparse), and commit() fsyncs it, renames it over `path` and fsyncs
// the directory. Destroying a writer that was not committed removes the
// temporary file: a failed write never leaves a file that looks whole.
//
// Not thread-safe: one owner writes and commits.
class AtomicFileWriter {
 public:
  // Creates the temporary file; `path` is trusted (the operator's command line).
  static Result<AtomicFileWriter> create(const std::string& path, mode_t mode = 0644);
  ~AtomicFileWriter();
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  Status pwrite_all(std::string_view bytes, uint64_t offset);
  // Sets the final size (the tail of a file whose last pages are zero is a hole).
  Status truncate(uint64_t size);
  Status commit();

 private:
  AtomicFileWriter(int dir_fd, int file_fd, std::string dir, std::string tmp, std::string name);
  int dir_fd_ = -1;
  int file_fd_ = -1;
  std::string dir_, tmp_, name_;
  bool committed_ = false;
};

}  // namespace faultline
