#include "source/file_watch.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <future>
#include <mutex>

namespace faultline {

namespace {

void ignore_signal(int) {}

// A signal that reaches a thread which does not block it runs its handler,
// and the default action of a real-time signal is to kill the process. The
// lease signal is directed at the watch thread only, so this never happens;
// the no-op handler makes sure that if it ever did, the daemon would live
// (SA_RESTART: an interrupted syscall restarts).
void install_harmless_disposition(int sig) {
  static std::once_flag once;
  std::call_once(once, [sig] {
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      struct sigaction sa {};
      sa.sa_handler = ignore_signal;
      sa.sa_flags = SA_RESTART;
      sigemptyset(&sa.sa_mask);
      ::sigaction(sig, &sa, nullptr);
    }
  });
}

std::string proc_fd_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

}  // namespace

int FileWatch::lease_signal() { return SIGRTMIN + 7; }

const char* to_string(FileWatch::Guard guard) {
  switch (guard) {
    case FileWatch::Guard::kLease: return "lease";
    case FileWatch::Guard::kInotify: return "inotify";
  }
  return "unknown";
}

Result<std::unique_ptr<FileWatch>> FileWatch::start(const MemoryFile& file, Callback callback) {
  std::unique_ptr<FileWatch> w(new FileWatch());
  w->callback_ = std::move(callback);
  w->path_ = file.describe();
  w->served_fd_.reset(::fcntl(file.watch_fd(), F_DUPFD_CLOEXEC, 0));
  if (!w->served_fd_) return fail_errno("cannot dup the memory file fd to watch it");
  w->stop_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!w->stop_fd_) return fail_errno("cannot create an eventfd for the memory file watch");

  std::string inotify_error;
  w->inotify_fd_.reset(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
  if (!w->inotify_fd_) {
    inotify_error = std::string("inotify_init1 failed: ") + std::strerror(errno);
  } else if (::inotify_add_watch(w->inotify_fd_.get(), proc_fd_path(w->served_fd_.get()).c_str(),
                                 IN_MODIFY | IN_ATTRIB | IN_MOVE_SELF) < 0) {
    // /proc/self/fd/N resolves to the open file's own inode, so the watch is
    // on the file being served even if its path now names another one.
    inotify_error = std::string("inotify_add_watch failed: ") + std::strerror(errno);
    w->inotify_fd_.reset();
  }

  const int sig = lease_signal();
  install_harmless_disposition(sig);
  const bool have_inotify = static_cast<bool>(w->inotify_fd_);
  std::promise<void> ready;
  auto ready_future = ready.get_future();
  FileWatch* self = w.get();
  try {
    // The thread owns the promise: set_value() may still be running when
    // start() returns.
    w->thread_ = std::thread([self, sig, ready = std::move(ready)]() mutable {
      // Block the lease signal in this thread before the lease can raise it,
      // and read it from a signalfd: thread-directed signals that the thread
      // blocks stay pending for it alone.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, sig);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      self->signal_fd_.reset(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
      // A lease belongs to an open file description: take it on a private
      // read-only open of the same inode (a lease needs O_RDONLY).
      UniqueFd lease(::open(proc_fd_path(self->served_fd_.get()).c_str(), O_RDONLY | O_CLOEXEC));
      struct stat a {}, b {};
      std::string note;
      if (!self->signal_fd_) {
        note = std::string("signalfd failed: ") + std::strerror(errno);
      } else if (!lease) {
        note = std::string("cannot reopen the memory file: ") + std::strerror(errno);
      } else if (::fstat(lease.get(), &a) != 0 || ::fstat(self->served_fd_.get(), &b) != 0 || a.st_dev != b.st_dev ||
                 a.st_ino != b.st_ino) {
        note = "reopening the memory file through /proc gave another file";
      } else {
        f_owner_ex owner{F_OWNER_TID, ::gettid()};
        if (::fcntl(lease.get(), F_SETOWN_EX, &owner) != 0 || ::fcntl(lease.get(), F_SETSIG, sig) != 0) {
          note = std::string("cannot direct the lease signal: ") + std::strerror(errno);
        } else if (::fcntl(lease.get(), F_SETLEASE, F_RDLCK) != 0) {
          // EAGAIN: some process has the file open for writing right now;
          // EACCES: neither its owner nor CAP_LEASE; EINVAL: the filesystem
          // has no leases (e.g. network filesystems).
          note = std::string("no read lease on the memory file (") + std::strerror(errno) +
                 (errno == EAGAIN ? ": it is open for writing" : "") + ")";
        }
      }
      if (note.empty()) {
        self->lease_fd_ = std::move(lease);
        self->guard_ = Guard::kLease;
      } else {
        self->guard_note_ = note;
      }
      ready.set_value();
      self->run();
    });
  } catch (const std::system_error& e) {
    return fail(std::string("cannot start the memory file watch thread: ") + e.what(), e.code().value());
  }
  ready_future.wait();
  if (w->guard_ != Guard::kLease && !have_inotify) {
    return fail("cannot watch memory file " + file.describe() + " for changes: " + w->guard_note_ + "; " +
                inotify_error);
  }
  if (!inotify_error.empty()) {
    w->guard_note_ += (w->guard_note_.empty() ? "" : "; ") + inotify_error;
  }
  return w;
}

FileWatch::~FileWatch() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stop_fd_.get(), &one, sizeof one);
    thread_.join();
  }
}

void FileWatch::report(Event event, const std::string& detail) {
  if (event == Event::kContentChange) {
    if (content_changed_.exchange(true, std::memory_order_acq_rel)) return;
  } else {
    if (replaced_reported_) return;
    replaced_reported_ = true;
  }
  try {
    callback_(event, detail);
  } catch (...) {
    // The callback is the owner's (it logs); nothing it throws may end this
    // thread without releasing the lease.
  }
}

void FileWatch::run() {
  for (;;) {
    pollfd fds[3] = {{stop_fd_.get(), POLLIN, 0},
                     {signal_fd_ ? signal_fd_.get() : -1, POLLIN, 0},
                     {inotify_fd_ ? inotify_fd_.get() : -1, POLLIN, 0}};
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[0].revents) break;
    if (fds[1].revents & POLLIN) {
      signalfd_siginfo info{};
      while (::read(signal_fd_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
        if (lease_fd_) {
          // The writer's open() is blocked until the lease goes: the owner
          // hears of the change first.
          report(Event::kContentChange,
                 "a process opened the memory file for writing or truncated it (read lease broken)");
          ::fcntl(lease_fd_.get(), F_SETLEASE, F_UNLCK);
          lease_fd_.reset();
        }
      }
    }
    if (fds[2].revents & POLLIN) {
      alignas(inotify_event) char buf[4096];
      ssize_t n;
      while ((n = ::read(inotify_fd_.get(), buf, sizeof buf)) > 0) {
        for (ssize_t at = 0; at < n;) {
          const auto* ev = reinterpret_cast<const inotify_event*>(buf + at);
          at += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
          if (ev->mask & IN_MODIFY) report(Event::kContentChange, "the memory file was written");
          if (ev->mask & (IN_MOVE_SELF | IN_ATTRIB)) {
            // Renamed, unlinked, or another file renamed over its path (its
            // link count changed): does the path still name this file?
            struct stat served {}, named {};
            if (::fstat(served_fd_.get(), &served) == 0 &&
                (::stat(path_.c_str(), &named) != 0 || named.st_dev != served.st_dev ||
                 named.st_ino != served.st_ino)) {
              report(Event::kReplaced, "the path " + path_ + " no longer names the memory file being served");
            }
          }
          if (ev->mask & IN_IGNORED) inotify_fd_.reset();  // the watch is gone (filesystem unmounted)
        }
        if (!inotify_fd_) break;
      }
    }
  }
  if (lease_fd_) ::fcntl(lease_fd_.get(), F_SETLEASE, F_UNLCK);
}

}  // namespace faultline
