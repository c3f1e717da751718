// The faultline command line.
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli/image_command.h"
#include "common/log.h"
#include "common/version.h"
#include "metrics/http_exporter.h"
#include "server/server.h"

namespace {

constexpr const char* kServeDescription = R"(Serve Firecracker VMs' guest memory from a memory snapshot over userfaultfd.

Model: one daemon per host, any number of sockets, each bound to what it serves. Every VM
restored with
  PUT /snapshot/load {"snapshot_path": "...",
                      "mem_backend": {"backend_type": "Uffd", "backend_path": "<socket>"},
                      "resume_vm": true}
connects, hands over its userfaultfd, and gets its own session, served from what its socket
is bound to: a raw memory file, or an image of `faultline image create` and its parents, local
or in an object store (s3://), decompressed frame by frame into a cache shared by every image
and session of the daemon (--frame-cache-size; images in a bucket also share --cache-dir).
--socket with --memory or --image binds one socket at start-up; with --control and
--socket-dir, `faultline attach --socket NAME --image STORE/NAME` binds more at run time (in
--socket-dir only) and `faultline detach` removes one (its VMs are served on). Many
VMs may be served at once; each session ends when its VM exits (socket EOF for Firecracker
>= 1.12, the process gone, or ESRCH) and logs one line with its counts. A session that cannot
go on (bad handshake or regions, memory file truncated or unreadable, unknown event) ends
alone; the daemon keeps serving others.

Pages a guest gives back (balloon, free page reporting/hinting: REMOVE events) read zero from
then on. If the client registered its memory MISSING|WP (dirty tracking), pages installed for a
read are write-protected and pages installed for a write are not.

Who may connect: both sockets are created with --socket-mode / --control-mode (default 0600:
only the daemon's user) and optionally chowned (--socket-owner/--socket-group, ...) before the
first accept. --allow-uid/--allow-gid (and --control-allow-*) further limit the peers by their
SO_PEERCRED uid or by group; a refused peer is one log line and a closed connection. Every
peer is identified by a pidfd taken when it connects, so a kill never reaches a process that
was given its pid later.

Limits: --max-handshakes connections mid-handshake and --max-sessions VMs at once; more are
refused (connection_refused, with the reason). Under --on-fatal=kill a refused client that had
already sent its userfaultfd is killed: its VM would hang on its first fault.

SIGTERM or SIGINT stops the daemon: it stops accepting, ends every session (applying
--on-fatal to VMs still running) and exits 0.)";

// "0660" (octal) -> mode bits.
std::optional<mode_t> parse_mode(const std::string& text) {
  if (text.empty() || text.size() > 4 || text.find_first_not_of("01234567") != std::string::npos) return std::nullopt;
  return static_cast<mode_t>(std::stoul(text, nullptr, 8));
}

// A user name or a numeric uid.
std::optional<uid_t> parse_user(const std::string& text) {
  if (!text.empty() && text.find_first_not_of("0123456789") == std::string::npos) {
    return static_cast<uid_t>(std::stoul(text));
  }
  passwd pw{};
  passwd* found = nullptr;
  std::vector<char> buf(16384);
  if (::getpwnam_r(text.c_str(), &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) return std::nullopt;
  return pw.pw_uid;
}

// A group name or a numeric gid.
std::optional<gid_t> parse_group(const std::string& text) {
  if (!text.empty() && text.find_first_not_of("0123456789") == std::string::npos) {
    return static_cast<gid_t>(std::stoul(text));
  }
  group gr{};
  group* found = nullptr;
  std::vector<char> buf(16384);
  if (::getgrnam_r(text.c_str(), &gr, buf.data(), buf.size(), &found) != 0 || found == nullptr) return std::nullopt;
  return gr.gr_gid;
}

// CLI11 check: every comma-separated item resolves.
template <typename Parse>
CLI::Validator resolves(Parse parse, const char* what) {
  return CLI::Validator(
      [parse, what](std::string& value) -> std::string {
        std::stringstream items(value);
        std::string item;
        while (std::getline(items, item, ',')) {
          if (!parse(item)) return std::string("no such ") + what + ": " + item;
        }
        return {};
      },
      what);
}

template <typename T, typename Parse>
std::vector<T> resolve_all(const std::vector<std::string>& values, Parse parse) {
  std::vector<T> out;
  for (const std::string& v : values) {
    std::stringstream items(v);
    std::string item;
    while (std::getline(items, item, ',')) out.push_back(*parse(item));
  }
  return out;
}

// Adds --PREFIX-mode, --PREFIX-owner and --PREFIX-group.
struct AccessOptions {
  std::string mode = "0600";
  std::string owner;
  std::string group;
  void add_to(CLI::App* app, const std::string& prefix, const std::string& which) {
    app->add_option("--" + prefix + "-mode", mode,
                    "Permission bits of the " + which + " socket file, in octal (connect needs write permission)")
        ->default_val("0600")
        ->check(CLI::Validator([](std::string& v) { return parse_mode(v) ? std::string() : "not an octal mode: " + v; },
                               "MODE"));
    app->add_option("--" + prefix + "-owner", owner, "User (name or uid) that owns the " + which + " socket file")
        ->check(resolves(parse_user, "user"));
    app->add_option("--" + prefix + "-group", group, "Group (name or gid) of the " + which + " socket file")
        ->check(resolves(parse_group, "group"));
  }
  faultline::protocol::SocketAccess resolve() const {
    faultline::protocol::SocketAccess a;
    a.mode = *parse_mode(mode);
    if (!owner.empty()) a.owner = parse_user(owner);
    if (!group.empty()) a.group = parse_group(group);
    return a;
  }
};

// Sends one request line to a daemon's control socket; returns the reply line.
faultline::Result<std::string> control_request(const std::string& path, const std::string& request) {
  faultline::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return faultline::fail("control socket path too long: " + path);
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return faultline::fail_errno("cannot connect to the control socket " + path + " (is faultline serve --control running?)");
  }
  const std::string line = request + "\n";
  if (::send(fd.get(), line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    return faultline::fail_errno("sending to the control socket failed");
  }
  std::string reply;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n < 0) return faultline::fail_errno("reading the control socket failed");
    if (n == 0) break;
    reply.append(buf, static_cast<size_t>(n));
  }
  while (!reply.empty() && reply.back() == '\n') reply.pop_back();
  return reply;
}

int print_control_reply(const faultline::Result<std::string>& reply) {
  if (!reply) {
    std::fprintf(stderr, "faultline: %s\n", reply.error().describe().c_str());
    return 1;
  }
  std::printf("%s\n", reply->c_str());
  return reply->rfind("{\"error\"", 0) == 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faultline: a userfaultfd memory server for Firecracker microVM snapshots"};
  app.require_subcommand(1);
  app.set_version_flag("--version",
                       std::string("faultline ") + faultline::version() + " (commit " + faultline::build_commit() + ")",
                       "Print the version and the commit this build was made from, and exit");

  faultline::ServerConfig config;
  config.version = faultline::version();
  config.commit = faultline::build_commit();
  std::string on_fatal = "kill";
  std::string log_format = "text";
  std::string log_level = "info";
  int handshake_timeout_ms = 5000;

  CLI::App* serve = app.add_subcommand("serve", "Serve Firecracker VMs' guest memory from a memory snapshot (the daemon)");
  serve->footer(kServeDescription);
  serve->add_option("--socket", config.socket_path,
                    "Unix socket to listen on (Firecracker's backend_path), serving --memory or --image; optional "
                    "with --control and --socket-dir (sockets are then attached at run time)");
  serve->add_option("--socket-dir", config.socket_dir,
                    "Directory in which `faultline attach` creates VM sockets (attach is refused without it)")
      ->check(CLI::ExistingDirectory);
  serve->add_option("--max-attachments", config.max_attachments,
                    "Most sockets attached at once (the --socket one included)")
      ->default_val(1024)
      ->check(CLI::Range(1, 65536));
  CLI::Option* memory_option =
      serve->add_option("--memory", config.memory_path, "Memory snapshot file to serve guest pages from")
          ->check(CLI::ExistingFile);
  CLI::Option* image_option = serve->add_option(
      "--image", config.image_path,
      "Serve an image instead of a raw file: STORE/NAME, the image NAME of the store STORE (`faultline "
      "image create`), with its whole chain of parents. STORE is a directory or s3://BUCKET/PREFIX: frames are "
      "then fetched from the bucket as faults need them (endpoint and credentials from AWS_ENDPOINT_URL, "
      "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or ~/.aws/credentials)");
  memory_option->excludes(image_option);
  serve->add_option("--frame-cache-size", config.frame_cache_bytes,
                    "Bytes of frame memory for decompressed image frames, shared by every session (with --image); "
                    "a frame counts its slot (a power of two, 64 KiB to 2 MiB, in 2 MiB huge-page chunks), and the "
                    "daemon keeps this much frame memory once faulted in")
      ->default_val(256ull << 20)
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 40));
  serve->add_option("--cache-dir", config.cache_dir,
                    "For images in an object store (--image s3://... or attached): also keep the frames fetched "
                    "from a bucket in this directory, one cache for every image (bounded by --cache-size, least "
                    "recently used evicted, verified on every read), so a restarted daemon reads them from local "
                    "disk");
  serve->add_option("--cache-size", config.cache_bytes, "Bytes of frames --cache-dir may hold")
      ->default_val(4ull << 30)
      ->check(CLI::Range(uint64_t{1} << 20, uint64_t{1} << 50));
  serve->add_option("--workers", config.workers_per_session, "Install threads per session")
      ->default_val(2)
      ->check(CLI::Range(1, 64));
  serve->add_option("--on-fatal", on_fatal,
                    "When a session cannot go on and its VM still runs: kill = SIGKILL the VM process "
                    "(a guest whose memory server is gone would hang forever), leave = only log")
      ->default_val("kill")
      ->check(CLI::IsMember({"kill", "leave"}));
  serve->add_option("--handshake-timeout-ms", handshake_timeout_ms,
                    "How long a connecting client may take to send its regions and uffd (Firecracker sends both in "
                    "one message right after connecting)")
      ->default_val(5000)
      ->check(CLI::Range(1, 60000));
  AccessOptions socket_access, control_access;
  socket_access.add_to(serve, "socket", "VM");
  control_access.add_to(serve, "control", "control");
  std::vector<std::string> allow_uids, allow_gids, control_allow_uids, control_allow_gids;
  serve->add_option("--allow-uid", allow_uids,
                    "Serve only VMs whose process runs as one of these users (names or uids, comma-separated or "
                    "repeated; SO_PEERCRED); with --allow-gid, either list admits")
      ->check(resolves(parse_user, "user"));
  serve->add_option("--allow-gid", allow_gids,
                    "Serve only VMs whose process has one of these groups, primary or supplementary (names or gids)")
      ->check(resolves(parse_group, "group"));
  serve->add_option("--control-allow-uid", control_allow_uids, "Answer the control socket only for these users")
      ->check(resolves(parse_user, "user"));
  serve->add_option("--control-allow-gid", control_allow_gids, "Answer the control socket only for these groups")
      ->check(resolves(parse_group, "group"));
  serve->add_option("--max-handshakes", config.max_handshakes,
                    "Most connections receiving their handshake at once; more are refused")
      ->default_val(32)
      ->check(CLI::Range(1, 4096));
  serve->add_option("--max-sessions", config.max_sessions,
                    "Most VMs served at once (connections mid-handshake included); more are refused")
      ->default_val(256)
      ->check(CLI::Range(1, 65536));
  int control_timeout_ms = 2000;
  serve->add_option("--control-timeout-ms", control_timeout_ms,
                    "A control request must arrive, and its reply be read, within this time; a slower client is "
                    "dropped")
      ->default_val(2000)
      ->check(CLI::Range(1, 60000));
  serve
      ->add_option("--control-threads", config.control_threads,
                   "Control requests served at once, a thread each (a snapshot, or an attach waiting on its "
                   "store, holds one); more wait until one ends")
      ->default_val(4)
      ->check(CLI::Range(1, 64));
  serve->add_option("--record-dir", config.record_dir,
                    "Directory under which `faultline record` (through the control socket) writes working sets; "
                    "without it the control socket refuses to write files")
      ->check(CLI::ExistingDirectory);
  serve->add_option("--log-format", log_format, "Log lines as logfmt text or JSON objects")
      ->default_val("text")
      ->check(CLI::IsMember({"text", "json"}));
  serve->add_option("--log-level", log_level, "Least severe level logged")
      ->default_val("info")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}));

  std::string prefetch;
  std::string zero_index_mode = "auto";
  serve->add_option("--record", config.record_path,
                    "Write each session's working set (pages it faulted, in first-touch order) to this file when "
                    "the session ends; {session} in the path becomes the session id");
  serve->add_option("--prefetch", prefetch,
                    "Install a recorded working set (a --record file) as each VM starts, or 'all' to fill the "
                    "whole snapshot in the background; demand faults always come first");
  serve->add_option("--zero-index", zero_index_mode,
                    "auto: install pages that are all zero in the snapshot without reading them, using "
                    "MEMORY.zeroidx (built on first use, rebuilt when the snapshot changes); off: do not")
      ->default_val("auto")
      ->check(CLI::IsMember({"auto", "off"}));
  std::string reader_serves = "on";
  serve->add_option("--reader-serves-cached", reader_serves,
                    "on: the event reader serves a 4 KiB fault itself when the page needs no storage I/O (zero, or "
                    "in the page cache, checked with RWF_NOWAIT), saving a thread hand-off; off: workers serve all")
      ->default_val("on")
      ->check(CLI::IsMember({"on", "off"}));
  int64_t busy_poll_us = 100;
  serve->add_option("--busy-poll-us", busy_poll_us,
                    "After each 4 KiB fault, keep polling the uffd for this many microseconds before sleeping (yielding the CPU between polls), so that the "
                    "next fault is read without a thread wake-up (costs CPU only while faults keep coming); 0: "
                    "always sleep")
      ->default_val(100)
      ->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  double store_deadline_s = 30;
  serve
      ->add_option("--store-deadline", store_deadline_s,
                   "Seconds a fault waits for a store failing in a way that may pass (an object store down, "
                   "timing out, answering 5xx) before its session is fatal and --on-fatal applies; loads read ahead "
                   "for a prefetch and reading an image's manifests (start-up, attach) give up at it too. 0: a "
                   "fault's first failed read is fatal, and those loads and reads have no deadline beyond the "
                   "store client's own attempts")
      ->default_val(30)
      ->check(CLI::Range(0.0, 86400.0));
  serve->add_option("--prefetch-threads", config.prefetch_threads,
                    "Threads per session installing the --prefetch plan (single-page installs cost kernel time, "
                    "so a scattered working set goes faster over several cores)")
      ->default_val(2)
      ->check(CLI::Range(1, 64));
  serve->add_option("--prefetch-fetches", config.prefetch_fetches,
                    "Frames an image source loads ahead of the --prefetch installs, in flight at once (an image "
                    "in an object store then waits on that many GETs at once, not one per prefetch thread); "
                    "they stay within a quarter of --frame-cache-size ahead of the installs; from a store on local disk at "
                    "most one per CPU, as its loads are bound by hashing and decompressing; 0: none ahead")
      ->default_val(12)
      ->check(CLI::Range(0, 64));
  serve->add_option("--fault-around-pages", config.fault_around_pages,
                    "Fault-around: a demand fault on a 4 KiB page installs it and up to this many pages in all "
                    "(the untouched ones after it, in one UFFDIO_COPY); the window starts at 16 pages (the rest of "
                    "the fault's 64 KiB block), doubles while a stream keeps faulting at its end, and shrinks to 1 "
                    "when faults stop continuing streams (random access); 1: off. 2 MiB pages are never grown")
      ->default_val(64)
      ->check(CLI::Range(1, 4096));
  std::string fault_around_readahead = "off";
  serve->add_option("--fault-around-readahead", fault_around_readahead,
                    "on: with fault-around, a fault that continues a stream at full speed also has the stream's "
                    "next window installed by a worker while the guest walks this one (the kernel's async "
                    "readahead; demand faults go first); off: windows only (default: on 2 cores it saved under "
                    "5 % of a restore and doubled the pages installed and never touched)")
      ->default_val("off")
      ->check(CLI::IsMember({"on", "off"}));
  serve->add_option("--zero-index-path", config.zero_index_path, "Where the zero index lives (default MEMORY.zeroidx)");
  serve->add_option("--control", config.control_path,
                    "Control socket for `faultline sessions`, `dirty`, `record`, `snapshot`, `attach`, `detach` and "
                    "`attachments` (off when not given)");
  std::string metrics_address;
  serve->add_option("--metrics", metrics_address,
                    "Serve Prometheus metrics (text format 0.0.4) on GET http://ADDR/metrics, ADDR = HOST:PORT or "
                    "[IPV6]:PORT, e.g. 127.0.0.1:9464; also times every fault for the latency histograms. Counts "
                    "only, no guest data; bind a loopback or management address (off when not given)");

  // Limits on what one client may make a session hold.
  serve->add_option("--max-regions", config.max_regions,
                    "Most guest memory regions one handshake may describe; more is refused before any is parsed "
                    "(Firecracker sends 1 to 3)")
      ->default_val(faultline::protocol::HandshakeOptions{}.max_regions)
      ->check(CLI::Range(uint64_t{1}, faultline::kMaxRegionsCeiling));

  std::string control_path;
  uint64_t session_id = 0;
  bool fallback = false;
  CLI::App* sessions = app.add_subcommand("sessions", "List a running daemon's sessions as JSON (needs serve --control)");
  sessions->add_option("--control", control_path, "The daemon's control socket")->required();
  CLI::App* dirty = app.add_subcommand(
      "dirty",
      "Print which pages a live VM changed since restore, as JSON: the input of a diff snapshot.\n"
      "dirty = written by the guest (present and not uffd-wp in its pagemap; without a WP\n"
      "registration every present page counts); zero = installed zero after a REMOVE and not\n"
      "written; removed = given back and not touched since. Ranges are [offset, length] in the\n"
      "memory file.");
  dirty->add_option("--control", control_path, "The daemon's control socket")->required();
  dirty->add_option("--session", session_id, "Session id, as in the session_start log line")->required();
  dirty->add_flag("--pagemap-fallback", fallback, "Read /proc/PID/pagemap instead of using PAGEMAP_SCAN");

  std::string zi_memory, zi_output;
  CLI::App* zero_index = app.add_subcommand(
      "zero-index", "Build the zero-page index of a memory snapshot (serve builds it on first use otherwise)");
  zero_index->add_option("--memory", zi_memory, "Memory snapshot file")->required()->check(CLI::ExistingFile);
  zero_index->add_option("--output", zi_output, "Index file (default MEMORY.zeroidx)");

  std::string record_name;
  CLI::App* record = app.add_subcommand(
      "record", "Write a live session's working set now (needs serve --control and --record-dir)");
  record->add_option("--control", control_path, "The daemon's control socket")->required();
  record->add_option("--session", session_id, "Session id, as in the session_start log line")->required();
  record->add_option("--name", record_name,
                     "File name to write inside the daemon's --record-dir (a plain name: no '/', not starting "
                     "with '.'); replaced atomically if it exists")
      ->required();

  std::string snapshot_store, snapshot_name;
  CLI::App* snapshot = app.add_subcommand(
      "snapshot",
      "Write a new image from a live VM that its caller has paused: its parent is the image the daemon\n"
      "serves (serve --image), and it holds the pages the VM wrote since restore (read from the VM's\n"
      "memory), the pages the balloon removed (as zero) and nothing else. Refused, with no image\n"
      "written, when the VM's memory changes while it is read (pause it first). Needs serve --control.\n"
      "Written where the served image is: its store directory, or its bucket (s3://BUCKET/PREFIX).");
  snapshot->add_option("--control", control_path, "The daemon's control socket")->required();
  snapshot->add_option("--session", session_id, "Session id, as in the session_start log line")->required();
  snapshot->add_option("--store", snapshot_store,
                       "The store the daemon serves the VM's image from: its directory, or s3://BUCKET/PREFIX "
                       "(the new image's frames and manifest are then written to the bucket)")
      ->required();
  snapshot->add_option("--name", snapshot_name, "Name of the new image (images are immutable: a new name)")
      ->required();

  std::string attach_socket, attach_image, attach_memory, attach_prefetch;
  CLI::App* attach = app.add_subcommand(
      "attach",
      "Bind a new VM socket of a running daemon to an image or a memory file (needs serve --control and\n"
      "--socket-dir). The socket accepts VMs when this returns; prints the attachment as JSON.");
  attach->add_option("--control", control_path, "The daemon's control socket")->required();
  attach->add_option("--socket", attach_socket,
                     "The VM socket: a name, or a path directly inside the daemon's --socket-dir")
      ->required();
  CLI::Option* attach_image_option = attach->add_option(
      "--image", attach_image, "Serve this image: STORE/NAME, STORE a directory or s3://BUCKET/PREFIX");
  CLI::Option* attach_memory_option =
      attach->add_option("--memory", attach_memory, "Serve this raw memory file")->check(CLI::ExistingFile);
  attach_image_option->excludes(attach_memory_option);
  attach->add_option("--prefetch", attach_prefetch,
                     "Install this working set (a --record file) as each VM starts, or 'all'");
  CLI::App* detach = app.add_subcommand(
      "detach",
      "Remove a VM socket from a running daemon: the socket file is gone and no VM connects through it\n"
      "when this returns; VMs already connected are served on until they end.");
  detach->add_option("--control", control_path, "The daemon's control socket")->required();
  detach->add_option("--socket", attach_socket, "The socket, as attached (a name in --socket-dir, or its path)")
      ->required();
  CLI::App* attachments = app.add_subcommand("attachments", "List a running daemon's VM sockets and what each serves, as JSON");
  attachments->add_option("--control", control_path, "The daemon's control socket")->required();

  faultline::cli::ImageCommand image_command(app);

  CLI11_PARSE(app, argc, argv);

  if (image_command.parsed()) return image_command.run();

  if (zero_index->parsed()) {
    auto memory = faultline::MemoryFile::open(zi_memory);
    if (!memory) {
      std::fprintf(stderr, "faultline: %s\n", memory.error().describe().c_str());
      return 1;
    }
    auto z = faultline::ZeroIndex::build_from(**memory);
    const std::string out = zi_output.empty() ? zi_memory + ".zeroidx" : zi_output;
    if (!z) {
      std::fprintf(stderr, "faultline: %s\n", z.error().describe().c_str());
      return 1;
    }
    if (auto st = z->save(out); !st) {
      std::fprintf(stderr, "faultline: %s\n", st.error().describe().c_str());
      return 1;
    }
    std::printf("%s: %llu of %llu pages are zero\n", out.c_str(), static_cast<unsigned long long>(z->zero_pages()),
                static_cast<unsigned long long>(z->pages()));
    return 0;
  }
  if (record->parsed()) {
    nlohmann::json req{{"cmd", "record"}, {"session", session_id}, {"name", record_name}};
    return print_control_reply(
        control_request(control_path, req.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }

  if (snapshot->parsed()) {
    nlohmann::json req{{"cmd", "snapshot"}, {"session", session_id}, {"store", snapshot_store}, {"name", snapshot_name}};
    return print_control_reply(
        control_request(control_path, req.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }
  if (sessions->parsed()) return print_control_reply(control_request(control_path, R"({"cmd":"sessions"})"));
  if (attachments->parsed()) return print_control_reply(control_request(control_path, R"({"cmd":"attachments"})"));
  if (attach->parsed() || detach->parsed()) {
    // The daemon resolves paths from its own working directory: send ours
    // made absolute.
    auto absolute = [](const std::string& p) {
      return p.empty() || p.front() == '/' ? p : std::filesystem::absolute(p).lexically_normal().string();
    };
    const std::string socket = attach_socket.find('/') == std::string::npos ? attach_socket : absolute(attach_socket);
    nlohmann::json req{{"cmd", attach->parsed() ? "attach" : "detach"}, {"socket", socket}};
    if (attach->parsed()) {
      if (attach_image.empty() == attach_memory.empty()) {
        std::fprintf(stderr, "faultline attach: give --image STORE/NAME or --memory FILE\n");
        return 2;
      }
      if (!attach_image.empty()) req["image"] = attach_image.rfind("s3://", 0) == 0 ? attach_image : absolute(attach_image);
      if (!attach_memory.empty()) req["memory"] = absolute(attach_memory);
      if (!attach_prefetch.empty()) req["prefetch"] = attach_prefetch == "all" ? attach_prefetch : absolute(attach_prefetch);
    }
    return print_control_reply(
        control_request(control_path, req.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }
  if (dirty->parsed()) {
    return print_control_reply(control_request(
        control_path, std::string(R"({"cmd":"page_map","session":)") + std::to_string(session_id) +
                          (fallback ? R"(,"fallback":true})" : "}")));
  }

  if (serve->parsed()) {
    const std::map<std::string, faultline::LogLevel> levels{{"debug", faultline::LogLevel::kDebug},
                                                            {"info", faultline::LogLevel::kInfo},
                                                            {"warn", faultline::LogLevel::kWarn},
                                                            {"error", faultline::LogLevel::kError}};
    faultline::Logger logger(log_format == "json" ? faultline::LogFormat::kJson : faultline::LogFormat::kText,
                             levels.at(log_level));
    config.on_fatal = on_fatal == "leave" ? faultline::OnFatal::kLeave : faultline::OnFatal::kKill;
    config.prefetch_all = prefetch == "all";
    if (!config.prefetch_all) config.prefetch_path = prefetch;
    config.zero_index = zero_index_mode == "auto";
    config.reader_serves_cached = reader_serves == "on";
    config.fault_around_readahead = fault_around_readahead == "on";
    config.busy_poll = std::chrono::microseconds(busy_poll_us);
    config.store_deadline = std::chrono::milliseconds(static_cast<int64_t>(store_deadline_s * 1000));
    config.handshake_timeout = std::chrono::milliseconds(handshake_timeout_ms);
    config.control_timeout = std::chrono::milliseconds(control_timeout_ms);
    config.socket_access = socket_access.resolve();
    config.control_access = control_access.resolve();
    config.allow.uids = resolve_all<uid_t>(allow_uids, parse_user);
    config.allow.gids = resolve_all<gid_t>(allow_gids, parse_group);
    config.control_allow.uids = resolve_all<uid_t>(control_allow_uids, parse_user);
    config.control_allow.gids = resolve_all<gid_t>(control_allow_gids, parse_group);
    config.record_fault_latency = !metrics_address.empty();
    if (!metrics_address.empty()) {
      // A typo in the address is an error before anything else starts.
      if (auto a = faultline::metrics::parse_listen_address(metrics_address); !a) {
        logger.error("startup_failed", {{"error", a.error().describe()}});
        return 1;
      }
    }

    if (memory_option->count() == 0 && image_option->count() == 0 && config.socket_dir.empty()) {
      std::fprintf(stderr,
                   "faultline serve: give --memory FILE or --image STORE_DIR/NAME (with --socket), or --control "
                   "and --socket-dir to attach images at run time\n");
      return 2;
    }
    if ((memory_option->count() != 0 || image_option->count() != 0) && config.socket_path.empty()) {
      std::fprintf(stderr, "faultline serve: --memory and --image serve the --socket: give --socket too\n");
      return 2;
    }
    // SIGTERM and SIGINT are blocked in every thread (the ones Server::create
    // and the exporter start inherit the mask) and read from a signalfd in
    // run()'s poll set: no handler runs, so nothing can defer or lose a stop
    // signal (under ThreadSanitizer a handler-based stop was lost in CI: the
    // daemon ignored a SIGTERM sent right after it bound its socket). One
    // sent during start-up stays pending and stops the daemon once run()
    // polls. The block is not inherited by anyone: the daemon runs no program.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    const faultline::UniqueFd signal_fd(::signalfd(-1, &stop_signals, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!signal_fd) {
      logger.error("startup_failed",
                   {{"error", std::string("signalfd for SIGTERM and SIGINT: ") + std::strerror(errno)}});
      return 1;
    }
    auto server = faultline::Server::create(config, logger);
    if (!server) {
      logger.error("startup_failed", {{"error", server.error().describe()}});
      return 1;
    }
    // Declared after the server, so destroyed (stopped) before it: its
    // requests read the server's metrics.
    std::unique_ptr<faultline::metrics::HttpExporter> exporter;
    if (!metrics_address.empty()) {
      const faultline::Server* srv = server->get();
      auto e = faultline::metrics::HttpExporter::start({.address = metrics_address},
                                                       [srv] { return srv->metrics().render(); }, &logger);
      if (!e) {
        logger.error("startup_failed", {{"error", e.error().describe()}});
        return 1;
      }
      exporter = std::move(*e);
    }
    ::signal(SIGPIPE, SIG_IGN);
    auto status = (*server)->run(signal_fd.get());
    if (!status) {
      logger.error("server_failed", {{"error", status.error().describe()}});
      return 1;
    }
    return 0;
  }
  return 0;
}
