#include "server/server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <exception>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>

#include "common/atomic_file.h"
#include "common/deadline.h"
#include "common/text_escape.h"
#include "kernel/process.h"
#include "objstore/disk_cache.h"
#include "objstore/s3_client.h"
#include "objstore/s3_store.h"
#include "protocol/handshake_socket.h"
#include "server/control.h"
#include "server/diff_export.h"
#include "server/test_hooks.h"
#include "source/file_watch.h"

namespace faultline {

// What one attached socket serves; shared by the socket and every session
// that connected through it (a detached socket's sessions keep it).
struct Server::Served {
  std::string memory_path;  // exactly one of memory_path and image_path
  std::string image_path;
  std::string store;  // the image's store, as named in image_path
  std::shared_ptr<const PageSource> source;
  std::shared_ptr<const image::ImageSource> image;  // source, when it is an image
  std::shared_ptr<const WorkingSet> prefetch;
  bool prefetch_all = false;
  std::shared_ptr<const ZeroIndex> zero_index;
  const std::string& name() const { return image_path.empty() ? memory_path : image_path; }
};

// An attached socket. Owned by Server::bound_ (and, for one pass of its
// loop, by run()): the socket file is unlinked when the last owner drops it.
struct Server::Bound {
  Bound(uint64_t i, protocol::UnixListener l, std::shared_ptr<const Served> s)
      : id(i), listener(std::move(l)), served(std::move(s)) {}
  const uint64_t id;
  protocol::UnixListener listener;
  const std::shared_ptr<const Served> served;
  mutable std::atomic<uint64_t> connections{0};  // counted by accept_vm()
};

struct Server::Connection {
  uint64_t id = 0;
  UniqueFd fd;
  protocol::PeerIdentity peer;
  std::shared_ptr<const Served> served;
  std::string socket;
  std::thread thread;
  std::atomic<bool> done{false};
  bool serving = false;              // GUARDED_BY(Server::mu_): counted in serving_, else in handshaking_
  // GUARDED_BY(Server::mu_): Session::start is under way. The session serves
  // faults and logs session_start before the server publishes it in
  // `session`; lookups wait out this window (Server::session).
  bool starting = false;
  std::mutex mu;
  std::shared_ptr<Session> session;  // GUARDED_BY(mu)
};

namespace {

// Pages of each class (zero / data) whose content is checked when an index is
// loaded: 128 random 4 KiB reads, a few ms on an SSD. A file whose content no
// longer matches its index in a fraction f of its zero pages is caught with
// probability 1 - (1 - f)^64 (96 % for f = 5 %); smaller changes are left to
// the identity check (any write moves ctime).
constexpr uint64_t kSamplePagesPerClass = 64;

// The index and the watch that turns it off, kept alive together by every
// holder of the index (the server and each session).
struct WatchedZeroIndex {
  std::mutex mu;
  std::optional<ZeroIndex> index;  // GUARDED_BY(mu) until published
  bool changed = false;            // GUARDED_BY(mu)
  std::unique_ptr<FileWatch> watch;  // last: destroyed (joined) first
};

// Loads FILE.zeroidx, or builds it on first use (and when the snapshot
// changed), saving it beside the snapshot when the directory is writable.
// The index is bound to the open memory file: its identity comes from the
// fd, a loaded index has a sample of its pages checked against the file, and
// a FileWatch disables it if the file is written while it is in use. With no
// way to watch the file, there is no index (zero pages are read like others).
// `may_save`: an index built here is saved beside the memory file (the
// daemon's own --memory); an attach through the control socket, which writes
// no file, keeps the one it builds in memory only.
Result<std::shared_ptr<const ZeroIndex>> open_zero_index(const std::string& memory_path, const std::string& index_path,
                                                         const MemoryFile& memory, const Logger& log, bool may_save) {
  const std::string path = index_path.empty() ? memory_path + ".zeroidx" : index_path;
  auto state = std::make_shared<WatchedZeroIndex>();
  // Watch before reading anything: a write from here on is seen.
  WatchedZeroIndex* raw = state.get();  // the watch thread ends before *state does
  auto watch = FileWatch::start(memory, [raw, &log, path, memory_path](
                                            FileWatch::Event event, const std::string& detail) {
    if (event == FileWatch::Event::kReplaced) {
      log.warn("memory_file_replaced", {{"memory", memory_path},
                                        {"detail", detail},
                                        {"action", "sessions keep being served from the file opened at start; "
                                                   "restart faultline to serve the new one"}});
      return;
    }
    {
      std::lock_guard lock(raw->mu);
      raw->changed = true;
      if (raw->index) raw->index->disable();
    }
    log.error("zero_index_disabled", {{"path", path},
                                      {"memory", memory_path},
                                      {"reason", detail},
                                      {"action", "zero pages are read from the file from now on; sessions that "
                                                 "already ran read pages of the old content"}});
  });
  if (!watch) {
    log.warn("zero_index_off", {{"path", path}, {"reason", watch.error().describe()}});
    return std::shared_ptr<const ZeroIndex>();
  }
  state->watch = std::move(*watch);
  const std::string guard = to_string(state->watch->guard());
  const std::string guard_note = state->watch->guard_note();

  auto id = memory.identity();
  if (!id) return std::unexpected(id.error());
  std::optional<ZeroIndex> index;
  std::string rebuild_reason;
  if (auto loaded = ZeroIndex::load(path, *id); !loaded) {
    rebuild_reason = loaded.error().describe();
  } else {
    std::random_device seed;
    auto sample = loaded->check_sample(memory, kSamplePagesPerClass, (uint64_t{seed()} << 32) | seed());
    if (!sample) {
      rebuild_reason = sample.error().describe();
      log.warn("zero_index_mismatch", {{"path", path}, {"error", rebuild_reason}});
    } else {
      log.info("zero_index_loaded", {{"path", path},
                                     {"zero_pages", loaded->zero_pages()},
                                     {"pages", loaded->pages()},
                                     {"sampled_zero_pages", sample->zero_pages_read},
                                     {"sampled_data_pages", sample->data_pages_read},
                                     {"guard", guard},
                                     {"guard_note", guard_note}});
      index.emplace(std::move(*loaded));
    }
  }
  if (!index) {
    const auto started = std::chrono::steady_clock::now();
    auto built = ZeroIndex::build(memory, *id);
    if (!built) return std::unexpected(built.error());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    bool written;
    {
      std::lock_guard lock(state->mu);
      written = state->changed;
    }
    if (!written) {
      log.info("zero_index_built", {{"path", path},
                                    {"reason", rebuild_reason},
                                    {"zero_pages", built->zero_pages()},
                                    {"pages", built->pages()},
                                    {"seconds", seconds},
                                    {"guard", guard},
                                    {"guard_note", guard_note}});
      if (!may_save) {
        log.info("zero_index_not_saved",
                 {{"path", path}, {"reason", "attached through the control socket, which writes no files"}});
      } else if (auto st = built->save(path); !st) {
        log.warn("zero_index_not_saved", {{"path", path}, {"error", st.error().describe()}});
      }
    }
    index.emplace(std::move(*built));
  }
  std::lock_guard lock(state->mu);
  if (state->changed) {
    // Written while it was loaded, checked or built: the index may describe
    // neither the old nor the new content.
    log.warn("zero_index_off", {{"path", path}, {"reason", "the memory file was written while its index was read"}});
    return std::shared_ptr<const ZeroIndex>();
  }
  state->index.emplace(std::move(*index));
  return std::shared_ptr<const ZeroIndex>(state, &*state->index);
}

// The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+).
std::vector<gid_t> peer_groups(int fd) {
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 3; ++attempt) {
    socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
      groups.resize(len / sizeof(gid_t));
      return groups;
    }
    if (errno != ERANGE) break;
    groups.resize(len / sizeof(gid_t) + 1);  // the kernel said how much room it needs
  }
  return {};
}

std::string describe_access(const protocol::SocketAccess& a) {
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(a.mode & 07777));
  std::string s = mode;
  if (a.owner) s += " owner=" + std::to_string(*a.owner);
  if (a.group) s += " group=" + std::to_string(*a.group);
  return s;
}

}  // namespace

// "STORE/NAME": the image NAME of the store STORE (a directory or
// s3://BUCKET/PREFIX).
static Result<std::pair<std::string, std::string>> split_image_path(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos || slash + 1 == path.size()) {
    return fail(path + ": expected STORE/NAME (a store directory or s3://BUCKET/PREFIX, and an image name in it)",
                EINVAL);
  }
  return std::make_pair(slash == 0 ? std::string("/") : path.substr(0, slash), path.substr(slash + 1));
}

// The image at `path` (NAME in the store DIR) with its whole chain of
// parents (each manifest and pin checked now, so a damaged chain is refused
// here rather than failing a VM later), read through the daemon's frame
// cache and, for an object store, its disk cache.
static Result<std::shared_ptr<const image::ImageSource>> open_image(const std::string& path, const std::string& dir,
                                                                     const std::string& name,
                                                                     std::shared_ptr<objstore::DiskCache> disk,
                                                                     const std::string& cache_dir,
                                                                     std::shared_ptr<image::FrameCache> frames,
                                                                     const Logger& logger) {
  // A directory, or s3://BUCKET/PREFIX: frames are then fetched from the
  // bucket as faults need them (one GET per frame, shared by the faults
  // that wait for it through the frame cache).
  // Errors name the image, and keep whether they may pass (a store that did
  // not answer in time).
  const auto named = [&path](Error e) {
    e.message = path + ": " + e.message;
    return std::unexpected(std::move(e));
  };
  auto store = objstore::open_store(dir, /*create=*/false);
  if (!store) return named(store.error());
  if (disk && objstore::is_s3_url(dir)) {
    // A full disk (or any write error) does not stop serving: frames are
    // served without being kept, and the log says so once per episode.
    *store = std::make_unique<objstore::CachedStore>(
        std::move(*store), std::move(disk), [&logger, cache_dir](const Error& e) {
          logger.warn("disk_cache_write_failed",
                      {{"dir", cache_dir}, {"error", e.describe()}, {"effect", "serving without caching"}});
        });
  }
  image::ImageOpenOptions options;
  options.on_unleased = [&logger, &path](const Error& e) {
    logger.warn("image_unleased", {{"image", path},
                                   {"error", e.describe()},
                                   {"effect", "served, but image delete cannot see that it is in use"}});
  };
  options.on_lock_wait = [&logger, &path] {
    logger.info("image_open_waits", {{"image", path}, {"reason", "a gc or delete holds the store's lock"}});
  };
  auto source = image::ImageSource::open(std::move(*store), name, std::move(frames), options);
  if (!source) return named(source.error());
  return std::shared_ptr<const image::ImageSource>(std::move(*source));
}

Result<std::shared_ptr<const Server::Served>> Server::open_served(const std::string& memory_path,
                                                                  const std::string& image_path,
                                                                  const std::string& prefetch_path, bool prefetch_all,
                                                                  const std::string& zero_index_path,
                                                                  bool save_zero_index) const {
  auto served = std::make_shared<Served>();
  served->memory_path = memory_path;
  served->image_path = image_path;
  served->prefetch_all = prefetch_all;
  if (!image_path.empty()) {
    auto split = split_image_path(image_path);
    if (!split) return std::unexpected(split.error());
    served->store = split->first;
    auto opened =
        open_image(image_path, split->first, split->second, disk_cache_, config_.cache_dir, frame_cache_, log_);
    if (!opened) return std::unexpected(opened.error());
    served->image = *opened;
    served->source = std::move(*opened);
  } else {
    auto memory = MemoryFile::open(memory_path);
    if (!memory) return std::unexpected(memory.error());
    if (config_.zero_index) {
      auto z = open_zero_index(memory_path, zero_index_path, **memory, log_, save_zero_index);
      if (!z) return std::unexpected(z.error());
      served->zero_index = std::move(*z);
    }
    served->source = std::move(*memory);
  }
  if (!prefetch_path.empty()) {
    auto set = read_working_set(prefetch_path, served->source->size());
    if (!set) return std::unexpected(set.error());
    served->prefetch = std::make_shared<const WorkingSet>(std::move(*set));
  }
  return std::shared_ptr<const Served>(std::move(served));
}

Result<std::unique_ptr<Server>> Server::create(const ServerConfig& config, const Logger& logger) {
  if (config.max_handshakes == 0 || config.max_sessions == 0 || config.max_attachments == 0) {
    return fail("max_handshakes, max_sessions and max_attachments must be at least 1", EINVAL);
  }
  const bool startup_socket = !config.socket_path.empty();
  if (startup_socket && config.memory_path.empty() == config.image_path.empty()) {
    return fail("serve needs exactly one of a memory file and an image for its --socket", EINVAL);
  }
  if (!startup_socket) {
    if (!config.memory_path.empty() || !config.image_path.empty()) {
      return fail("--memory and --image name what the start-up --socket serves: give --socket too", EINVAL);
    }
    if (config.control_path.empty() || config.socket_dir.empty()) {
      return fail("a daemon without --socket serves only the images attached through its control socket: give "
                  "--control and --socket-dir",
                  EINVAL);
    }
  }
  if (!config.socket_dir.empty() && !std::filesystem::is_directory(config.socket_dir)) {
    return fail("--socket-dir " + config.socket_dir + " is not a directory", ENOTDIR);
  }
  if (!config.cache_dir.empty() && !config.image_path.empty()) {
    auto split = split_image_path(config.image_path);
    if (split && !objstore::is_s3_url(split->first) && config.socket_dir.empty()) {
      return fail("--cache-dir is for images in an object store (--image s3://...); " + split->first +
                      " is a local directory already",
                  EINVAL);
    }
  }
  UniqueFd record_dir;
  if (!config.record_dir.empty()) {
    record_dir.reset(::open(config.record_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!record_dir) return fail_errno("cannot open the record directory " + config.record_dir);
  }
  UniqueFd stop_efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_efd) return fail_errno("eventfd for the stop signal failed");
  UniqueFd wake_efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_efd) return fail_errno("eventfd for attach and detach failed");
  UniqueFd reserve(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!reserve) return fail_errno("cannot open /dev/null (the fd kept in reserve for EMFILE)");
  auto server = std::unique_ptr<Server>(
      new Server(config, logger, std::move(stop_efd), std::move(wake_efd), std::move(reserve)));
  server->frame_cache_ =
      config.frame_cache ? config.frame_cache : std::make_shared<image::FrameCache>(config.frame_cache_bytes);
  // Frame memory a dropped cache leaves is kept for the next frames, up to
  // what this cache may hold (image/frame_buffer.h).
  if (server->frame_cache_->capacity() > image::FrameBuffer::keep_empty_bytes()) {
    image::FrameBuffer::set_keep_empty_bytes(server->frame_cache_->capacity());
  }
  server->metrics_.set_frame_cache_source([cache = server->frame_cache_] {
    const image::FrameCache::Stats st = cache->stats();
    const image::FrameBuffer::Totals mem = image::FrameBuffer::totals();
    return metrics::FrameCacheCounts{st.hits,        st.misses,        st.waits,       st.load_failures,
                                     st.evictions,   st.bytes,         st.frames,      st.capacity,
                                     st.loads_ahead, mem.mapped_bytes, mem.fresh_bytes, mem.slot_reuses,
                                     mem.free_slot_bytes};
  });
  if (!config.cache_dir.empty()) {
    auto disk = objstore::DiskCache::open(config.cache_dir, config.cache_bytes);
    if (!disk) return fail("--cache-dir " + config.cache_dir + ": " + disk.error().message, disk.error().code);
    const auto held = (*disk)->stats();
    logger.info("disk_cache_open", {{"dir", config.cache_dir},
                                    {"max_bytes", config.cache_bytes},
                                    {"blobs", held.blobs},
                                    {"bytes", held.bytes},
                                    {"direct_io", (*disk)->direct_io()}});
    server->disk_cache_ = std::move(*disk);
  }
  server->metrics_.set_store_source([disk = server->disk_cache_] {
    const objstore::S3Client::Totals net = objstore::S3Client::process_totals();
    metrics::StoreCounts c{net.requests, net.gets, net.get_body_bytes, net.retries, std::nullopt};
    if (disk) {
      const objstore::DiskCache::Stats st = disk->stats();
      c.disk_cache = metrics::StoreCounts::DiskCache{st.hits,         st.misses, st.damaged, st.evictions,
                                                     st.put_failures, st.bytes,  st.blobs,   disk->max_bytes()};
    }
    return c;
  });
  server->record_dir_fd_ = std::move(record_dir);
  if (startup_socket) {
    // A store that does not answer fails the start-up at the store deadline,
    // as it would fail a fault (not after every timeout and retry of every
    // manifest's GET).
    const ScopedDeadline store_scope(deadline_in(config.store_deadline));
    auto served = server->open_served(config.memory_path, config.image_path, config.prefetch_path, config.prefetch_all,
                                      config.zero_index_path, /*save_zero_index=*/true);
    if (!served) {
      if (config.image_path.empty()) return std::unexpected(served.error());
      return fail("--image " + served.error().message, served.error().code);
    }
    auto listener = protocol::UnixListener::bind(config.socket_path, config.socket_access);
    if (!listener) return std::unexpected(listener.error());
    std::lock_guard op(server->attach_op_mu_);
    auto added = server->add_bound(std::move(*served), std::move(*listener));
    if (!added) return std::unexpected(added.error());
  }
  if (!config.control_path.empty()) {
    auto control = protocol::UnixListener::bind(config.control_path, config.control_access);
    if (!control) return std::unexpected(control.error());
    // Non-blocking: every control thread polls it, and those that lose the
    // race for a connection must not block in accept (they would miss a stop).
    if (::fcntl(control->fd(), F_SETFL, ::fcntl(control->fd(), F_GETFL) | O_NONBLOCK) != 0) {
      return fail_errno("cannot make the control socket non-blocking");
    }
    server->control_.emplace(std::move(*control));
  }
  return server;
}

Server::Server(ServerConfig config, const Logger& logger, UniqueFd stop_efd, UniqueFd wake_efd, UniqueFd reserve_fd)
    : config_(std::move(config)),
      log_(logger),
      wake_efd_(std::move(wake_efd)),
      stop_efd_(std::move(stop_efd)),
      reserve_fd_(std::move(reserve_fd)),
      metrics_({to_string(SessionEnd::kPeerExited), to_string(SessionEnd::kSocketClosed),
                to_string(SessionEnd::kPeerGone), to_string(SessionEnd::kStopped), to_string(SessionEnd::kFatal)}) {}

Server::~Server() {
  stop();
  join_control_threads();
  reap(true);
}

void Server::join_control_threads() {
  for (std::thread& t : control_threads_) {
    if (t.joinable()) t.join();
  }
}

void Server::stop() {
  stop_requested_.store(true, std::memory_order_release);
  uint64_t one = 1;
  (void)!::write(stop_efd_.get(), &one, sizeof one);
}

Status Server::run(int stop_signal_fd) {
  std::shared_ptr<Bound> first;
  {
    std::lock_guard lock(bound_mu_);
    if (!bound_.empty()) first = bound_.front();
  }
  const Served* served = first ? first->served.get() : nullptr;
  log_.info("server_start", {{"version", config_.version},
                             {"commit", config_.commit},
                             {"socket", config_.socket_path},
                             {"socket_access", describe_access(config_.socket_access)},
                             {"socket_dir", config_.socket_dir},
                             {"memory", config_.memory_path},
                             {"image", config_.image_path},
                             {"image_layers", served && served->image ? served->image->chain().layers().size() : 0},
                             {"frame_cache_bytes", frame_cache_->capacity()},
                             {"disk_cache", config_.cache_dir},
                             {"fault_around_pages", static_cast<uint64_t>(config_.fault_around_pages)},
                             {"fault_around_readahead", config_.fault_around_readahead},
                             {"memory_bytes", served ? served->source->size() : 0},
                             {"workers_per_session", config_.workers_per_session},
                             {"on_fatal", to_string(config_.on_fatal)},
                             {"max_handshakes", config_.max_handshakes},
                             {"max_sessions", config_.max_sessions},
                             {"control", config_.control_path},
                             {"record", config_.record_path},
                             {"record_dir", config_.record_dir},
                             {"prefetch", config_.prefetch_all ? std::string("all") : config_.prefetch_path},
                             {"prefetch_pages", served && served->prefetch ? served->prefetch->offsets.size() : 0},
                             {"prefetch_fetches", config_.prefetch_fetches},
                             {"zero_pages", served && served->zero_index ? served->zero_index->zero_pages() : 0}});
  first.reset();
  if (control_) {
    for (size_t i = 0; i < std::max<size_t>(config_.control_threads, 1); ++i) {
      try {
        control_threads_.emplace_back([this] { control_loop(); });
      } catch (const std::system_error& e) {
        if (control_threads_.empty()) {
          stop();  // the daemon will not run: nothing attaches from here on
          return fail(std::string("cannot start the control socket thread: ") + e.what(), e.code().value());
        }
        // Fewer requests served at once: said, not silent.
        log_.warn("control_threads_short", {{"started", control_threads_.size()},
                                            {"wanted", config_.control_threads},
                                            {"error", std::string(e.what())}});
        break;
      }
    }
  }
  Status status;
  std::vector<std::shared_ptr<Bound>> bound;
  std::vector<pollfd> fds;
  {
    std::lock_guard lock(bound_mu_);
    accepting_ = true;
  }
  for (;;) {
    {
      std::lock_guard lock(bound_mu_);
      bound = bound_;
    }
    // A negative fd is ignored by poll.
    fds.assign({{stop_efd_.get(), POLLIN, 0}, {wake_efd_.get(), POLLIN, 0}, {stop_signal_fd, POLLIN, 0}});
    for (const auto& b : bound) fds.push_back({b->listener.fd(), POLLIN, 0});
    // Wake up now and then to join the threads of sessions that ended.
    const int rc = ::poll(fds.data(), fds.size(), 200);
    if (rc < 0 && errno != EINTR) {
      status = fail_errno("poll on the listening sockets failed");
      break;
    }
    reap(false);
    if (fds[0].revents) break;
    if (fds[2].revents & (POLLNVAL | POLLERR)) {
      status = fail("the stop signal fd " + std::to_string(stop_signal_fd) + " cannot be polled", EBADF);
      break;
    }
    if ((fds[2].revents & POLLIN) && stopped_by_signal(stop_signal_fd)) break;
    if (fds[1].revents) {
      uint64_t drained;
      (void)!::read(wake_efd_.get(), &drained, sizeof drained);
    }
    for (size_t i = 0; rc > 0 && i < bound.size(); ++i) {
      if (!(fds[i + 3].revents & POLLIN)) continue;
      // Nothing a client does may take the daemon down: an exception here
      // (an allocation failing under memory pressure) refuses that client.
      try {
        accept_vm(*bound[i]);
      } catch (const std::exception& e) {
        log_.error("internal_error", {{"where", "accept"}, {"error", e.what()}});
      } catch (...) {
        log_.error("internal_error", {{"where", "accept"}, {"error", "unknown exception"}});
      }
    }
    // A detached socket is closed (and its file unlinked) by whoever drops
    // it last: detach() waits for this pass to let go of it.
    bound.clear();
    {
      std::lock_guard lock(bound_mu_);
      ++run_passes_;
    }
    bound_cv_.notify_all();
  }
  // At once, whatever ended the loop (a signal, a failed poll): from here on
  // no attach binds a socket nobody would accept on, and the control
  // threads (which watch the same eventfd) end.
  stop();
  bound.clear();
  {
    std::lock_guard lock(bound_mu_);
    accepting_ = false;
  }
  bound_cv_.notify_all();
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    for (auto& c : connections_) {
      std::lock_guard clock(c->mu);
      if (c->session) c->session->stop();
    }
  }
  join_control_threads();
  reap(true);
  log_.info("server_stop", {{"sessions", finished_total()}});
  return status;
}

// --- attach and detach -------------------------------------------------------

Result<std::string> Server::attach_socket_path(const std::string& socket) const {
  if (config_.socket_dir.empty()) {
    return fail("attach is off: start the daemon with --socket-dir DIR (the directory its VM sockets go in)", EPERM);
  }
  std::error_code ec;
  const std::filesystem::path dir = std::filesystem::canonical(config_.socket_dir, ec);
  if (ec) return fail("--socket-dir " + config_.socket_dir + ": " + ec.message(), ec.value());
  std::string name = socket;
  const size_t slash = socket.rfind('/');
  if (slash != std::string::npos) {
    const std::filesystem::path parent =
        std::filesystem::canonical(slash == 0 ? std::string("/") : socket.substr(0, slash), ec);
    if (ec || parent != dir) {
      return fail("socket \"" + escape_untrusted(socket, 256) + "\" is not directly inside --socket-dir " +
                      dir.string() + " (attach binds sockets only there)",
                  EPERM);
    }
    name = socket.substr(slash + 1);
  }
  if (auto st = check_plain_file_name(name); !st) {
    return fail("socket name \"" + escape_untrusted(name, 64) + "\" is refused: " + st.error().message, EINVAL);
  }
  return (dir / name).string();
}

Result<Server::Attachment> Server::add_bound(std::shared_ptr<const Served> served, protocol::UnixListener listener) {
  // Non-blocking: accept_or_shed() accepts holding reserve_mu_, which the
  // control threads' accepts wait for, so an accept must never block.
  if (::fcntl(listener.fd(), F_SETFL, ::fcntl(listener.fd(), F_GETFL) | O_NONBLOCK) != 0) {
    return fail_errno("cannot make " + listener.path() + " non-blocking");
  }
  std::shared_ptr<Bound> b;
  {
    std::lock_guard lock(bound_mu_);
    // A socket bound once run() has stopped polling would take connections
    // nobody accepts.
    if (auto st = check_not_stopping(); !st) return std::unexpected(st.error());
    if (bound_.size() >= config_.max_attachments) {
      return fail(std::to_string(bound_.size()) + " sockets are attached (--max-attachments " +
                      std::to_string(config_.max_attachments) + ")",
                  EMFILE);
    }
    b = std::make_shared<Bound>(next_attachment_id_++, std::move(listener), std::move(served));
    bound_.push_back(b);
  }
  uint64_t one = 1;
  (void)!::write(wake_efd_.get(), &one, sizeof one);
  Attachment a = describe(*b);
  log_.info("attached", {{"attachment", a.id},
                         {"socket", a.socket},
                         {"serves", a.serves},
                         {"memory_bytes", a.memory_bytes},
                         {"image_layers", a.image_layers},
                         {"prefetch_pages", a.prefetch_pages},
                         {"prefetch_all", a.prefetch_all}});
  return a;
}

Server::Attachment Server::describe(const Bound& b) const {
  Attachment a;
  a.id = b.id;
  a.socket = b.listener.path();
  a.serves = b.served->name();
  a.memory_bytes = b.served->source->size();
  a.image_layers = b.served->image ? b.served->image->chain().layers().size() : 0;
  a.prefetch_pages = b.served->prefetch ? b.served->prefetch->offsets.size() : 0;
  a.prefetch_all = b.served->prefetch_all;
  a.connections = b.connections.load(std::memory_order_relaxed);
  return a;
}

Result<Server::Attachment> Server::attach(const AttachRequest& request) {
  auto a = attach_unlogged(request);
  if (!a) {
    log_.warn("attach_failed",
              {{"socket", escape_untrusted(request.socket, 256)},
               {"serves", escape_untrusted(request.image.empty() ? request.memory : request.image, 256)},
               {"error", a.error().describe()}});
  }
  return a;
}

Status Server::check_not_stopping() const {
  if (stop_requested_.load(std::memory_order_acquire)) {
    return fail("the daemon is stopping: it binds no more sockets", ESHUTDOWN);
  }
  return {};
}

Result<Server::Attachment> Server::attach_unlogged(const AttachRequest& request) {
  auto path = attach_socket_path(request.socket);
  if (!path) return std::unexpected(path.error());
  if (request.image.empty() == request.memory.empty()) {
    return fail("attach needs exactly one of an image and a memory file", EINVAL);
  }
  // Never over a socket this daemon listens on (bind replaces a socket file).
  auto same_file = [&](const std::string& other) {
    std::error_code ec;
    return !other.empty() && std::filesystem::weakly_canonical(other, ec) == std::filesystem::path(*path) && !ec;
  };
  // REQUIRES: attach_op_mu_ held.
  auto check_free = [&]() -> Status {
    if (same_file(config_.control_path)) return fail(*path + " is this daemon's control socket", EEXIST);
    std::lock_guard lock(bound_mu_);
    if (auto st = check_not_stopping(); !st) return st;
    for (const auto& b : bound_) {
      if (same_file(b->listener.path())) {
        return fail(*path + " is attached already (to " + b->served->name() + "; detach it first)", EEXIST);
      }
    }
    if (bound_.size() >= config_.max_attachments) {
      return fail(std::to_string(bound_.size()) + " sockets are attached (--max-attachments " +
                      std::to_string(config_.max_attachments) + ")",
                  EMFILE);
    }
    return {};
  };
  {
    std::lock_guard op(attach_op_mu_);
    if (auto st = check_free(); !st) return std::unexpected(st.error());  // refused before any I/O
  }
  const bool prefetch_all = request.prefetch == "all";
  // Opened without attach_op_mu_, so that an image whose store is slow holds
  // up no other attach or detach. Reading its manifests waits for the store
  // no longer than a fault would, and not at all once the daemon stops.
  auto served = [&] {
    const ScopedDeadline store_scope(deadline_in(config_.store_deadline), &stop_requested_);
    return open_served(request.memory, request.image, prefetch_all ? std::string() : request.prefetch, prefetch_all,
                       /*zero_index_path=*/{}, /*save_zero_index=*/false);
  }();
  if (!served) {
    if (!request.image.empty()) return std::unexpected(served.error());  // it names the image already
    return fail(request.memory + ": " + served.error().message, served.error().code);
  }
  std::lock_guard op(attach_op_mu_);
  // Again: another attach may have taken the socket (or the last slot) meanwhile.
  if (auto st = check_free(); !st) return std::unexpected(st.error());
  auto listener = protocol::UnixListener::bind(*path, config_.socket_access);
  if (!listener) return std::unexpected(listener.error());
  return add_bound(std::move(*served), std::move(*listener));
}

Result<Server::Attachment> Server::detach(const std::string& socket) {
  std::lock_guard op(attach_op_mu_);
  std::shared_ptr<Bound> removed;
  uint64_t pass = 0;
  {
    std::lock_guard lock(bound_mu_);
    auto matches = [&](const std::shared_ptr<Bound>& b) { return b->listener.path() == socket; };
    auto it = std::find_if(bound_.begin(), bound_.end(), matches);
    if (it == bound_.end() && socket.find('/') == std::string::npos) {
      // A plain name: the socket of that name in --socket-dir.
      if (auto full = attach_socket_path(socket)) {
        it = std::find_if(bound_.begin(), bound_.end(), [&](const auto& b) { return b->listener.path() == *full; });
      }
    }
    if (it == bound_.end()) {
      return fail("no socket \"" + escape_untrusted(socket, 256) + "\" is attached", ENOENT);
    }
    removed = std::move(*it);
    bound_.erase(it);
    pass = run_passes_;
  }
  Attachment a = describe(*removed);
  // run()'s pass may hold a copy of the list: wake it and wait until that
  // pass ended (it drops its copy, closing the socket and unlinking its file,
  // before it counts the pass), so that the socket is gone when this
  // returns. A weak_ptr's expiry would not do: it is seen before the other
  // thread's destructor has run.
  removed.reset();
  uint64_t one = 1;
  (void)!::write(wake_efd_.get(), &one, sizeof one);
  {
    std::unique_lock lock(bound_mu_);
    if (!bound_cv_.wait_for(lock, std::chrono::seconds(5), [&] { return !accepting_ || run_passes_ > pass; })) {
      log_.warn("detach_slow", {{"socket", a.socket}, {"note", "the accept loop still held the socket after 5 s"}});
    }
  }
  log_.info("detached", {{"attachment", a.id}, {"socket", a.socket}, {"serves", a.serves},
                         {"connections", a.connections}});
  return a;
}

std::vector<Server::Attachment> Server::attachments() const {
  std::vector<std::shared_ptr<Bound>> bound;
  {
    std::lock_guard lock(bound_mu_);
    bound = bound_;
  }
  std::vector<Attachment> out;
  out.reserve(bound.size());
  for (const auto& b : bound) out.push_back(describe(*b));
  return out;
}

bool Server::accept_or_shed(int listener_fd, const char* socket, UniqueFd* out) {
  std::unique_lock lock(reserve_mu_);
  const int fd = ::accept4(listener_fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd >= 0) {
    out->reset(fd);
    shed_failing_ = false;
    return true;
  }
  const int err = errno;
  if (err == EINTR || err == EAGAIN || err == ECONNABORTED) return false;
  if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
    log_.error("accept_failed", {{"socket", socket}, {"error", std::string(std::strerror(err))}});
    return false;
  }
  // Out of fds: the connection stays queued and the listener readable, so
  // without this every poll would return at once. Free the reserved fd,
  // accept the connection on it and refuse it; then take the reserve back.
  reserve_fd_.reset();
  HookContext shed_hook;
  shed_hook.address = static_cast<uint64_t>(listener_fd);
  FAULTLINE_HOOK(HookPoint::kBeforeShedAccept, shed_hook);
  UniqueFd shed(::accept4(listener_fd, nullptr, nullptr, SOCK_CLOEXEC));
  const bool took = static_cast<bool>(shed);
  const int shed_err = took ? 0 : errno;
  protocol::PeerCredentials cred;
  bool uffd = false;
  if (shed) {
    if (auto c = protocol::peer_credentials(shed.get())) cred = *c;
    // With no free fd slot the kernel drops any fds the client sent
    // (MSG_CTRUNC): then it may have sent its uffd.
    uffd = std::string_view(socket) == "vm" && protocol::drain_pending_uffd(shed.get());
    shed.reset();
  }
  bool killed = false;
  if (uffd && config_.on_fatal == OnFatal::kKill && cred.pid > 0) {
    // The connection is closed, so one fd is free for a pidfd; the pid was
    // taken from the live connection a moment ago.
    if (auto peer = kernel::PeerProcess::open(cred.pid)) killed = peer->kill().has_value();
  }
  reserve_fd_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!took) {
    // Nothing was refused, so nothing is logged or counted as a refusal.
    // Nothing queued any more: another thread polling the same listener (the
    // control socket has several) took the connection, or its client gave up.
    if (shed_err == EAGAIN || shed_err == EWOULDBLOCK || shed_err == ECONNABORTED || shed_err == EINTR) return false;
    // The reserve was lost (another thread of the daemon took the slot it
    // freed) or freeing it freed nothing (ENOBUFS, ENOMEM): the connection
    // stays queued and the listener readable. Said once for the episode;
    // the caller's poll returns at once, so wait a little before it does.
    if (!shed_failing_) {
      shed_failing_ = true;
      log_.error("accept_failed",
                 {{"socket", socket},
                  {"error", std::string("no fd to shed the connection with: ") + std::strerror(shed_err)},
                  {"effect", "said once until an accept succeeds; retried every 10 ms"}});
    }
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return false;
  }
  shed_failing_ = false;
  // Counted before the line, noted as ended after it (as refuse() does): a
  // reader of the line then finds the refusal in the metrics.
  const bool vm = std::string_view(socket) == "vm";
  if (vm) count_refused(RefusalCause::kOutOfResources);
  log_.error("connection_refused", {{"socket", socket},
                                    {"reason", to_string(RefusalCause::kOutOfResources)},
                                    {"error", std::string(std::strerror(err))},
                                    {"pid", static_cast<int64_t>(cred.pid)},
                                    {"uid", static_cast<uint64_t>(cred.uid)},
                                    {"uffd_received", uffd},
                                    {"peer_killed", killed}});
  if (vm) note_rejected(std::string("out of resources: ") + std::strerror(err));
  return false;
}

bool Server::allowed(const PeerAllowList& list, int connection_fd, const protocol::PeerCredentials& cred) const {
  if (list.empty()) return true;
  if (std::find(list.uids.begin(), list.uids.end(), cred.uid) != list.uids.end()) return true;
  if (std::find(list.gids.begin(), list.gids.end(), cred.gid) != list.gids.end()) return true;
  for (gid_t g : peer_groups(connection_fd)) {
    if (std::find(list.gids.begin(), list.gids.end(), g) != list.gids.end()) return true;
  }
  return false;
}

void Server::refuse(UniqueFd connection, const protocol::PeerIdentity& peer, RefusalCause cause,
                    const std::string& why) {
  // A Firecracker sends its uffd right after connecting; if it is already
  // here the VM would resume with nobody serving it. If not, closing now
  // makes its sendmsg fail and its snapshot load fail cleanly.
  HookContext hook{static_cast<uint64_t>(connection.get()), 0, 0};
  FAULTLINE_HOOK(HookPoint::kServerBeforeRefuse, hook);
  const bool uffd = cause != RefusalCause::kPeerNotAllowed && protocol::drain_pending_uffd(connection.get());
  connection.reset();
  bool killed = false;
  if (uffd && peer.pidfd) {
    killed = kill_unserved_peer(peer);
  } else if (uffd && peer.cred.pid > 0 && config_.on_fatal == OnFatal::kKill) {
    // No pidfd was to be had when it connected (EMFILE); closing the
    // connection freed one fd for it now.
    if (auto p = kernel::PeerProcess::open(peer.cred.pid)) killed = p->kill().has_value();
  }
  // Counted before the log line: whoever reads the line (an operator, a
  // test) and then scrapes the metrics sees this refusal in them. Noted as
  // ended last: a wait for ended connections then sees both.
  count_refused(cause);
  log_.error("connection_refused", {{"socket", "vm"},
                                    {"reason", to_string(cause)},
                                    {"error", why},
                                    {"pid", static_cast<int64_t>(peer.cred.pid)},
                                    {"uid", static_cast<uint64_t>(peer.cred.uid)},
                                    {"gid", static_cast<uint64_t>(peer.cred.gid)},
                                    {"uffd_received", uffd},
                                    {"peer_killed", killed}});
  note_rejected(std::string(to_string(cause)) + ": " + why);
}

void Server::accept_vm(const Bound& bound) {
  UniqueFd conn;
  if (!accept_or_shed(bound.listener.fd(), "vm", &conn)) return;
  auto peer = protocol::identify_peer(conn.get());
  if (!peer) {
    // No pidfd for want of fds (or no credentials at all): refuse it, as
    // any new work under EMFILE.
    protocol::PeerIdentity who;
    if (auto cred = protocol::peer_credentials(conn.get())) who.cred = *cred;
    refuse(std::move(conn), who, RefusalCause::kOutOfResources, peer.error().describe());
    return;
  }
  if (!allowed(config_.allow, conn.get(), peer->cred)) {
    refuse(std::move(conn), *peer, RefusalCause::kPeerNotAllowed,
           "uid " + std::to_string(peer->cred.uid) + " gid " + std::to_string(peer->cred.gid) +
               " is not in the allow-list (--allow-uid/--allow-gid)");
    return;
  }
  // Limits are checked and the connection counted in one step, so that a
  // burst of connections cannot all pass the check.
  std::optional<RefusalCause> cause;
  std::string why;
  Connection* raw = nullptr;
  {
    std::lock_guard lock(mu_);
    if (handshaking_ >= config_.max_handshakes) {
      cause = RefusalCause::kTooManyHandshakes;
      why = std::to_string(handshaking_) + " connections are mid-handshake (--max-handshakes " +
            std::to_string(config_.max_handshakes) + ")";
    } else if (handshaking_ + serving_ >= config_.max_sessions) {
      cause = RefusalCause::kTooManySessions;
      why = std::to_string(serving_) + " VMs are being served and " + std::to_string(handshaking_) +
            " are connecting (--max-sessions " + std::to_string(config_.max_sessions) + ")";
    } else {
      auto c = std::make_unique<Connection>();
      c->id = next_id_++;
      c->fd = std::move(conn);
      c->peer = std::move(*peer);
      c->served = bound.served;
      c->socket = bound.listener.path();
      bound.connections.fetch_add(1, std::memory_order_relaxed);
      raw = c.get();
      connections_.push_back(std::move(c));
      ++handshaking_;
    }
  }
  if (cause) {
    refuse(std::move(conn), *peer, *cause, why);
    return;
  }
  try {
    raw->thread = std::thread([this, raw] { handle_connection_or_log(*raw); });
    connection_threads_.fetch_add(1, std::memory_order_acq_rel);
  } catch (const std::system_error& e) {
    // No thread (EAGAIN: the process or the system is at its thread limit).
    UniqueFd fd = std::move(raw->fd);
    protocol::PeerIdentity who = std::move(raw->peer);
    {
      std::lock_guard lock(mu_);
      --handshaking_;
      raw->done = true;  // reaped without a join
    }
    refuse(std::move(fd), who, RefusalCause::kOutOfResources, std::string("cannot start a thread: ") + e.what());
  }
}

bool Server::kill_unserved_peer(const protocol::PeerIdentity& peer) const {
  if (config_.on_fatal != OnFatal::kKill || !peer.pidfd) return false;
  // Through the pidfd taken at accept: if that process has exited, the kill
  // fails (ESRCH) instead of hitting whoever was given its pid since.
  return kernel::kill_through_pidfd(peer.pidfd.get(), peer.cred.pid).has_value();
}

void Server::note_rejected(std::string why) {
  std::lock_guard lock(mu_);
  rejected_.push_back(std::move(why));
  while (rejected_.size() > config_.ended_history) rejected_.pop_front();
  ++rejected_total_;
  ended_cv_.notify_all();
}

void Server::handle_connection_or_log(Connection& c) {
  // No exception may end the process from this thread: log it, end this
  // connection. (Sessions catch their own threads' exceptions.)
  std::string error;
  try {
    handle_connection(c);
    return;
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown exception";
  }
  if (!c.serving) count_refused(RefusalCause::kOutOfResources);  // before the line, as refuse()
  log_.error("internal_error", {{"where", "connection"}, {"session", c.id}, {"error", error}});
  std::lock_guard lock(mu_);
  if (!c.done) {
    (c.serving ? serving_ : handshaking_)--;
    c.done = true;
    c.starting = false;
    ++rejected_total_;
    ended_cv_.notify_all();
    published_cv_.notify_all();  // a lookup waiting for this start
  }
}

void Server::reject_session(Connection& c, RefusalCause cause, const std::string& error) {
  // We hold the VM's uffd and cannot serve it: the guest would hang.
  const bool killed = kill_unserved_peer(c.peer);
  count_refused(cause);  // before the line, as refuse()
  log_.error("session_rejected", {{"session", c.id},
                                  {"pid", static_cast<int64_t>(c.peer.cred.pid)},
                                  {"reason", to_string(cause)},
                                  {"error", error},
                                  {"peer_killed", killed},
                                  {"on_fatal", to_string(config_.on_fatal)}});
  {
    std::lock_guard lock(mu_);
    --handshaking_;
    c.done = true;
    c.starting = false;
  }
  published_cv_.notify_all();
  note_rejected(error);
}

void Server::handle_connection(Connection& c) {
  protocol::HandshakeOptions options;
  options.timeout = config_.handshake_timeout;
  options.max_regions = config_.max_regions;
  protocol::HandshakeFailure failure;
  auto hs = protocol::receive_handshake(std::move(c.fd), options, &failure);
  if (!hs) {
    // A client that already handed over its uffd (or fds the kernel had to
    // drop) may resume a VM nobody serves: it would hang on its first
    // fault. --on-fatal applies.
    const bool killed = (failure.uffd_received || failure.fds_lost) && kill_unserved_peer(c.peer);
    const RefusalCause cause = failure.over_region_limit       ? RefusalCause::kTooManyRegions
                               : hs.error().code == ETIMEDOUT ? RefusalCause::kHandshakeTimeout
                                                              : RefusalCause::kHandshakeFailed;
    count_refused(cause);  // before the line, as refuse()
    log_.error("handshake_failed", {{"session", c.id},
                                    {"pid", static_cast<int64_t>(c.peer.cred.pid)},
                                    {"reason", to_string(cause)},
                                    {"error", hs.error().describe()},
                                    {"uffd_received", failure.uffd_received},
                                    {"peer_killed", killed}});
    {
      std::lock_guard lock(mu_);
      --handshaking_;
      c.done = true;
    }
    note_rejected(hs.error().describe());
    return;
  }
  const pid_t pid = hs->peer.pid;
  // The session watches and signals its VM through the pidfd taken at
  // accept time; the connection keeps the original for the error path.
  if (c.peer.pidfd) {
    const int dup = ::fcntl(c.peer.pidfd.get(), F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
      reject_session(c, RefusalCause::kOutOfResources, std::string("no fd for the session's pidfd: ") +
                                                           std::strerror(errno));
      return;
    }
    hs->peer_pidfd.reset(dup);
  }
  if (pid == 0) {
    log_.warn("peer_pid_unknown",
              {{"session", c.id},
               {"pidfd", protocol::to_string(c.peer.source)},
               {"note", "the client is in a pid namespace this daemon cannot see: it cannot be killed, its "
                        "write-protect registration cannot be read from /proc (installs are not protected), "
                        "and its exit is seen through the pidfd if the kernel gave one, else through the socket"}});
  }
  const Served& served = *c.served;
  SessionConfig sc{.id = c.id,
                   .socket = c.socket,
                   .serves = served.name(),
                   .workers = config_.workers_per_session,
                   .on_fatal = config_.on_fatal,
                   .logger = &log_,
                   .record_path = config_.record_path,
                   .record_first_touches = !config_.record_dir.empty(),
                   .prefetch = served.prefetch,
                   .prefetch_all = served.prefetch_all,
                   .prefetch_threads = config_.prefetch_threads,
                   .prefetch_fetches = config_.prefetch_fetches,
                   .zero_index = served.zero_index,
                   .reader_serves_cached = config_.reader_serves_cached,
                   .busy_poll = config_.busy_poll,
                   .metrics = &metrics_,
                   .source_retry_deadline = config_.store_deadline,
                   .record_fault_latency = config_.record_fault_latency,
                   .fault_around_pages = config_.fault_around_pages,
                   .fault_around_readahead = config_.fault_around_readahead};
  {
    std::lock_guard lock(mu_);
    c.starting = true;
  }
  auto session = Session::start(std::move(*hs), served.source, sc);
  if (!session) {
    reject_session(c, RefusalCause::kSessionRejected, session.error().describe());
    return;
  }
  std::shared_ptr<Session> owned = std::move(*session);
  Session* s = owned.get();
  HookContext publish_hook;
  publish_hook.address = c.id;
  FAULTLINE_HOOK(HookPoint::kServerBeforePublish, publish_hook);
  {
    std::lock_guard lock(mu_);
    std::lock_guard clock(c.mu);
    c.session = std::move(owned);
    c.starting = false;
    --handshaking_;
    ++serving_;
    c.serving = true;
    if (stopping_) s->stop();
  }
  published_cv_.notify_all();
  s->wait();
  std::lock_guard lock(mu_);
  finished_.push_back(s->summary());
  while (finished_.size() > config_.ended_history) finished_.pop_front();
  ++finished_total_;
  --serving_;
  c.done = true;
  ended_cv_.notify_all();
}

// --- control socket ----------------------------------------------------------

void Server::control_loop() {
  for (;;) {
    std::array<pollfd, 2> fds{{{control_->fd(), POLLIN, 0}, {stop_efd_.get(), POLLIN, 0}}};
    const int rc = ::poll(fds.data(), fds.size(), -1);
    if (rc < 0 && errno != EINTR) {
      log_.error("control_failed", {{"error", std::string("poll: ") + std::strerror(errno)}});
      return;
    }
    if (fds[1].revents) return;
    if (rc <= 0 || !(fds[0].revents & POLLIN)) continue;
    try {
      HookContext accept_hook;
      FAULTLINE_HOOK(HookPoint::kControlBeforeAccept, accept_hook);
      UniqueFd conn;
      const bool accepted = accept_or_shed(control_->fd(), "control", &conn);
      accept_hook.address = accepted ? 1 : 0;
      FAULTLINE_HOOK(HookPoint::kControlAfterAccept, accept_hook);
      if (!accepted) continue;
      auto cred = protocol::peer_credentials(conn.get());
      if (!cred || !allowed(config_.control_allow, conn.get(), *cred)) {
        log_.error("connection_refused",
                   {{"socket", "control"},
                    {"reason", to_string(RefusalCause::kPeerNotAllowed)},
                    {"error", cred ? "uid " + std::to_string(cred->uid) + " gid " + std::to_string(cred->gid) +
                                         " is not in the control allow-list (--control-allow-uid/--control-allow-gid)"
                                   : cred.error().describe()},
                    {"pid", static_cast<int64_t>(cred ? cred->pid : 0)},
                    {"uid", static_cast<uint64_t>(cred ? cred->uid : 0)}});
        continue;
      }
      serve_control(std::move(conn));
    } catch (const std::exception& e) {
      log_.error("internal_error", {{"where", "control"}, {"error", e.what()}});
    } catch (...) {
      log_.error("internal_error", {{"where", "control"}, {"error", "unknown exception"}});
    }
  }
}

void Server::serve_control(UniqueFd connection) {
  using Clock = std::chrono::steady_clock;
  // One deadline for the request and one for the reply: a client that
  // trickles its request or never reads its reply holds this thread for
  // control_timeout at most per phase, and never the accept loop or any
  // session. The time to answer (a snapshot writes an image) is not the
  // client's doing and counts in neither.
  Clock::time_point deadline = Clock::now() + config_.control_timeout;
  const int fd = connection.get();
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  constexpr size_t kMaxRequest = 64 * 1024;
  // Waits until `fd` is ready for `events` or the deadline; false on the
  // deadline or a stop.
  auto wait_ready = [&](short events) {
    for (;;) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      std::array<pollfd, 2> fds{{{fd, events, 0}, {stop_efd_.get(), POLLIN, 0}}};
      const int rc = ::poll(fds.data(), fds.size(), static_cast<int>(std::min<int64_t>(left, 60000)));
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0 || fds[1].revents) return false;
      if (rc > 0) return true;
    }
  };
  auto timed_out = [&](const char* what, size_t bytes) {
    log_.warn("control_timeout", {{"phase", what},
                                  {"bytes", bytes},
                                  {"timeout_ms", static_cast<int64_t>(config_.control_timeout.count())}});
  };

  std::string request;
  char buf[4096];
  bool too_long = false;
  while (request.find('\n') == std::string::npos) {
    if (request.size() > kMaxRequest) {
      too_long = true;
      break;
    }
    if (!wait_ready(POLLIN)) return timed_out("request", request.size());
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) break;  // EOF ends the request too (a client may shut down its write side)
    request.append(buf, static_cast<size_t>(n));
  }
  std::string reply = too_long ? control_error_reply("a request is one line of at most " + std::to_string(kMaxRequest) +
                                                     " bytes")
                               : handle_control_request(*this, request.substr(0, request.find('\n')));
  if (reply.size() > config_.max_control_reply_bytes) {
    reply = control_error_reply("the reply is " + std::to_string(reply.size()) + " bytes, over the limit of " +
                                std::to_string(config_.max_control_reply_bytes));
  }
  reply += '\n';
  deadline = Clock::now() + config_.control_timeout;
  size_t off = 0;
  while (off < reply.size()) {
    const ssize_t n = ::send(fd, reply.data() + off, reply.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!wait_ready(POLLOUT)) return timed_out("reply", off);
      continue;
    }
    if (n <= 0) return;  // the client went away
    off += static_cast<size_t>(n);
  }
}

std::vector<LogField> snapshot_fields(const Server::Snapshot& s) {
  const ExportReport& r = s.report;
  return {{"image", s.name},
          {"parent", s.parent},
          {"write_protect", r.write_protect},
          {"scan_method", kernel::to_string(r.method)},
          {"dirty_pages", r.dirty_pages},
          {"zero_pages", r.zero_pages},
          {"removed_pages", r.removed_pages},
          {"bytes_read", r.bytes_read},
          {"stored_pages", r.image.stored_pages},
          {"parent_pages", r.image.parent_pages},
          {"image_zero_pages", r.image.zero_pages},
          {"frames", r.image.frames},
          {"frames_written", r.image.frames_written},
          {"stored_bytes", r.image.stored_bytes},
          {"manifest_bytes", r.image.manifest_bytes},
          {"seconds", s.seconds}};
}

std::shared_ptr<const Server::Served> Server::served_by(uint64_t id) const {
  std::unique_lock lock(mu_);
  wait_for_starting(lock, id);
  for (const auto& c : connections_) {
    std::lock_guard clock(c->mu);
    if (c->id == id && c->session && !c->done) return c->served;
  }
  return nullptr;
}

Result<Server::Snapshot> Server::snapshot(uint64_t id, const std::string& store_dir, const std::string& name) const {
  const std::shared_ptr<const Served> served = served_by(id);
  if (!served) return fail("no running session " + std::to_string(id), ESRCH);
  if (!served->image) {
    return fail("snapshot writes a diff on top of the image the VM was restored from: serve it from an image "
                "(--image or attach --image STORE_DIR/NAME; session " + std::to_string(id) +
                    " is served from the raw file " + served->memory_path + ")",
                EINVAL);
  }
  if (auto st = image::check_image_name(name); !st) {
    return fail("image name \"" + escape_untrusted(name, 64) + "\" is refused: " + st.error().message, EINVAL);
  }
  // The new image goes into the store the daemon serves from, nowhere else:
  // its parent is there, and a control client must not be able to make the
  // daemon write into any other directory or bucket.
  bool same_store = false;
  std::string store_key;  // the store, one spelling per store (for snapshots_writing_)
  if (objstore::is_s3_url(served->store)) {
    const auto asked = objstore::S3Location::parse(store_dir);
    const auto serving = objstore::S3Location::parse(served->store);
    same_store = asked && serving && asked->bucket == serving->bucket && asked->prefix == serving->prefix;
    if (same_store) store_key = serving->url();
  } else {
    std::error_code ec1, ec2;
    const auto asked = std::filesystem::canonical(store_dir, ec1);
    const auto serving = std::filesystem::canonical(served->store, ec2);
    same_store = !ec1 && !ec2 && asked == serving;
    store_key = serving.string();
  }
  if (!same_store) {
    return fail("snapshot writes only into the store the session is served from (" + served->store + "), not \"" +
                    escape_untrusted(store_dir, 256) + "\"",
                EPERM);
  }
  auto s = session(id);
  if (!s) return fail("no running session " + std::to_string(id), ESRCH);
  const std::pair<std::string, std::string> writing{store_key, name};
  {
    std::lock_guard lock(snapshots_mu_);
    if (!snapshots_writing_.insert(writing).second) {
      return fail("a snapshot named \"" + name + "\" is being written into " + served->store +
                      " now (images are immutable; pick another name)",
                  EBUSY);
    }
  }
  struct Done {
    const Server* server;
    const std::pair<std::string, std::string>& key;
    ~Done() {
      std::lock_guard lock(server->snapshots_mu_);
      server->snapshots_writing_.erase(key);
    }
  } done_writing{this, writing};
  ExportOptions options;
  options.parent = served->image->name();
  options.name = name;
  const auto began = std::chrono::steady_clock::now();
  // Through the store the session reads its image from: in a bucket, the new
  // frames are PUT there and the parent's frames the diff compares against
  // come through the daemon's disk cache when it has them.
  // A stop of the daemon cancels the export's store requests (an object
  // store that does not answer would hold it for every timeout and retry);
  // the image is then not written.
  auto report = [&] {
    const ScopedDeadline stop_scope(std::chrono::steady_clock::time_point::max(), &stop_requested_);
    return export_session_diff(*s, served->image->chain().store(), options);
  }();
  if (!report) {
    log_.warn("snapshot_failed", {{"session", id}, {"image", name}, {"error", report.error().describe()}});
    return std::unexpected(report.error());
  }
  Snapshot done{name, options.parent, std::move(*report),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count()};
  std::vector<LogField> fields{{"session", id}};
  for (LogField& f : snapshot_fields(done)) fields.push_back(std::move(f));
  log_.log(LogLevel::kInfo, "snapshot_written", fields);
  return done;
}

Result<Server::Recorded> Server::record(uint64_t id, const std::string& name) const {
  if (!record_dir_fd_) {
    return fail("record through the control socket is off: start the daemon with --record-dir DIR", EPERM);
  }
  if (auto st = check_plain_file_name(name); !st) {
    return fail("record name \"" + escape_untrusted(name, 64) + "\" is refused: " + st.error().message,
                st.error().code);
  }
  auto s = session(id);
  if (!s) return fail("no running session " + std::to_string(id), ENOENT);
  const WorkingSet set = s->recorded_working_set();
  if (auto st = write_file_atomically(record_dir_fd_.get(), name, serialize_working_set(set), 0640); !st) {
    return fail("writing " + config_.record_dir + "/" + name + " failed: " + st.error().message, st.error().code);
  }
  return Recorded{config_.record_dir + "/" + name, set.offsets.size()};
}

// --- bookkeeping -----------------------------------------------------------

bool Server::stopped_by_signal(int stop_signal_fd) const {
  signalfd_siginfo info{};
  if (::read(stop_signal_fd, &info, sizeof info) != static_cast<ssize_t>(sizeof info)) return false;
  const int signo = static_cast<int>(info.ssi_signo);
  const char* abbrev = ::sigabbrev_np(signo);
  log_.info("stop_signal", {{"signal", abbrev ? std::string("SIG") + abbrev : std::to_string(signo)},
                            {"sender_pid", static_cast<int64_t>(info.ssi_pid)},
                            {"sender_uid", static_cast<uint64_t>(info.ssi_uid)}});
  return true;
}

void Server::reap(bool all) {
  std::list<std::unique_ptr<Connection>> done;
  {
    std::unique_lock lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (all || (*it)->done) {
        done.push_back(std::move(*it));
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : done) {
    const bool had_thread = c->thread.joinable();
    if (had_thread) c->thread.join();
    // Free the connection (its session's fds and memory) before the count
    // says it is gone, so that connection_threads() == 0 means released.
    c.reset();
    if (had_thread) connection_threads_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

std::vector<SessionSummary> Server::finished_sessions() const {
  std::lock_guard lock(mu_);
  return {finished_.begin(), finished_.end()};
}

std::vector<std::string> Server::rejected_connections() const {
  std::lock_guard lock(mu_);
  return {rejected_.begin(), rejected_.end()};
}

uint64_t Server::finished_total() const {
  std::lock_guard lock(mu_);
  return finished_total_;
}

uint64_t Server::rejected_total() const {
  std::lock_guard lock(mu_);
  return rejected_total_;
}

size_t Server::active_sessions() const {
  std::lock_guard lock(mu_);
  return serving_ + handshaking_;
}

size_t Server::handshakes_in_progress() const {
  std::lock_guard lock(mu_);
  return handshaking_;
}

// A session serves its VM's faults and logs session_start from inside
// Session::start, a moment before handle_connection() publishes it: a control
// client that saw either may ask at once. Lookups wait for sessions mid-start
// (bounded: a start that hangs must not hang the control socket).
void Server::wait_for_starting(std::unique_lock<std::mutex>& lock, std::optional<uint64_t> id) const {
  const auto settled = [&] {
    return std::none_of(connections_.begin(), connections_.end(), [&](const auto& c) {
      return c->starting && !c->done && (!id || c->id == *id);
    });
  };
  if (settled()) return;
  HookContext hook;
  hook.address = id.value_or(0);
  FAULTLINE_HOOK(HookPoint::kLookupWaitsForStart, hook);
  published_cv_.wait_for(lock, config_.session_start_wait, settled);
}

std::shared_ptr<Session> Server::session(uint64_t id) const {
  std::unique_lock lock(mu_);
  wait_for_starting(lock, id);
  for (const auto& c : connections_) {
    std::lock_guard clock(c->mu);
    if (c->id == id && c->session && !c->done) return c->session;
  }
  return nullptr;
}

std::vector<SessionSummary> Server::live_sessions() const {
  std::unique_lock lock(mu_);
  wait_for_starting(lock, std::nullopt);
  std::vector<SessionSummary> out;
  for (const auto& c : connections_) {
    std::lock_guard clock(c->mu);
    if (c->session && !c->done) out.push_back(c->session->summary());
  }
  return out;
}

bool Server::wait_for_ended(size_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  return ended_cv_.wait_for(lock, timeout, [&] { return finished_total_ + rejected_total_ >= n; });
}

}  // namespace faultline
