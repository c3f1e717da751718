// FileWatch: tells its owner when the memory file being served is about to be
// written, was written, or stopped being the file its path names.
//
// Why: facts derived from the file's content (the zero-page index) are only
// true while the content does not change. A snapshot rewritten in place while
// the daemon serves it would otherwise get zeros served where it now has data.
//
// How (on the open fd, never the path):
//   - A read lease (fcntl F_SETLEASE F_RDLCK) on a private read-only open of
//     the same inode. The kernel then blocks any process that opens the file
//     for writing (or truncates it) until the lease is released (at most
//     /proc/sys/fs/lease-break-time seconds, 45 by default), and signals the
//     holder first. The watch thread reports kContentChange and only then
//     releases the lease, so the owner has stopped trusting the content
//     before the first byte can change. The signal (kLeaseSignal) is directed
//     at the watch thread alone (F_SETOWN_EX F_OWNER_TID), which blocks it and
//     reads it with a signalfd; no other thread ever receives it.
//   - inotify on the same inode, for what a lease cannot see: IN_MODIFY from a
//     writer that had the file open before the lease was taken (then the
//     lease is refused, see guard()), and IN_ATTRIB / IN_MOVE_SELF (the link
//     count changed, or the file moved) to notice that the path the file was
//     opened by no longer names it (kReplaced).
// Limits: writes through a shared writable mapping made before the watch
// started raise no inotify event; a lease needs the file's owner or
// CAP_LEASE and a local filesystem. guard() says which protection holds.
//
// Thread-safety: the callback runs on the watch's own thread; every method
// is safe from any thread. The destructor stops and joins the thread and
// releases the lease (REQUIRES: not called from the callback).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "common/error.h"
#include "common/unique_fd.h"
#include "source/page_source.h"

namespace faultline {

class FileWatch {
 public:
  enum class Event {
    kContentChange,  // about to be written (lease break) or was written (inotify)
    kReplaced,       // its path names another file now, or none (swapped, moved, deleted)
  };
  enum class Guard {
    kLease,    // writers wait until the owner was told
    kInotify,  // writes are seen after they happened (no lease; see guard_note())
  };
  // Called at most once per Event kind, on the watch thread. `detail` is a
  // sentence for a log line.
  using Callback = std::function<void(Event, const std::string& detail)>;

  // The signal a lease break raises (blocked in the watch thread only).
  static int lease_signal();

  // Starts watching the file `file` serves. Fails only if the thread or
  // inotify cannot be set up; a refused lease falls back to kInotify.
  static Result<std::unique_ptr<FileWatch>> start(const MemoryFile& file, Callback callback);

  FileWatch(const FileWatch&) = delete;
  FileWatch& operator=(const FileWatch&) = delete;
  ~FileWatch();

  Guard guard() const { return guard_; }
  // Why there is no lease (empty with kLease).
  const std::string& guard_note() const { return guard_note_; }
  // Whether kContentChange was reported.
  bool content_changed() const { return content_changed_.load(std::memory_order_acquire); }

 private:
  FileWatch() = default;
  void run();
  void report(Event event, const std::string& detail);

  Callback callback_;
  std::string path_;    // the memory file's path, to see whether it still names it
  UniqueFd served_fd_;  // a dup of the served fd, for fstat (nlink)
  UniqueFd lease_fd_;   // owned by the watch thread once it runs
  UniqueFd signal_fd_;
  UniqueFd inotify_fd_;
  UniqueFd stop_fd_;
  Guard guard_ = Guard::kInotify;
  std::string guard_note_;
  std::atomic<bool> content_changed_{false};
  bool replaced_reported_ = false;  // watch thread only
  std::thread thread_;
};

const char* to_string(FileWatch::Guard guard);

}  // namespace faultline
