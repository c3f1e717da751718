// The faultline command line.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <map>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "server/server.h"

namespace {

std::atomic<faultline::Server*> g_server{nullptr};

void on_signal(int) {
  if (faultline::Server* s = g_server.load()) s->stop();  // writes an eventfd: async-signal-safe
}

constexpr const char* kServeDescription = R"(Serve Firecracker VMs' guest memory from a memory snapshot over userfaultfd.

Model: one memory file per socket. faultline listens on --socket; every VM restored with
  PUT /snapshot/load {"snapshot_path": "...",
                      "mem_backend": {"backend_type": "Uffd", "backend_path": "<socket>"},
                      "resume_vm": true}
connects, hands over its userfaultfd, and gets its own session, served from --memory. Several
VMs may be served at once; each session ends when its VM exits (socket EOF for Firecracker
>= 1.12, the process gone, or ESRCH) and logs one line with its counts. A session that cannot
go on (bad handshake or regions, memory file truncated or unreadable, unknown event) ends
alone; the daemon keeps serving others.

Pages a guest gives back (balloon, free page reporting/hinting: REMOVE events) read zero from
then on. If the client registered its memory MISSING|WP (dirty tracking), pages installed for a
read are write-protected and pages installed for a write are not.

SIGTERM or SIGINT stops the daemon: it stops accepting, ends every session (applying
--on-fatal to VMs still running) and exits 0.)";

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

  faultline::ServerConfig config;
  std::string on_fatal = "kill";
  std::string log_format = "text";
  std::string log_level = "info";
  int handshake_timeout_ms = 5000;

  CLI::App* serve = app.add_subcommand("serve", "Serve Firecracker VMs' guest memory from a memory snapshot (the daemon)");
  serve->footer(kServeDescription);
  serve->add_option("--socket", config.socket_path, "Unix socket to listen on (Firecracker's backend_path)")
      ->required();
  serve->add_option("--memory", config.memory_path, "Memory snapshot file to serve guest pages from")
      ->required()
      ->check(CLI::ExistingFile);
  serve->add_option("--workers", config.workers_per_session, "Install threads per session")
      ->default_val(2)
      ->check(CLI::Range(1, 64));
  serve->add_option("--on-fatal", on_fatal,
                    "When a session cannot go on and its VM still runs: kill = SIGKILL the VM process "
                    "(a guest whose memory server is gone would hang forever), leave = only log")
      ->default_val("kill")
      ->check(CLI::IsMember({"kill", "leave"}));
  serve->add_option("--handshake-timeout-ms", handshake_timeout_ms,
                    "How long a connecting client may take to send its regions and uffd")
      ->default_val(5000)
      ->check(CLI::Range(1, 600000));
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
  serve->add_option("--prefetch-threads", config.prefetch_threads,
                    "Threads per session installing the --prefetch plan (single-page installs cost kernel time, "
                    "so a scattered working set goes faster over several cores)")
      ->default_val(2)
      ->check(CLI::Range(1, 64));
  serve->add_option("--zero-index-path", config.zero_index_path, "Where the zero index lives (default MEMORY.zeroidx)");
  serve->add_option("--control", config.control_path,
                    "Control socket for `faultline sessions` and `faultline dirty` (off when not given)");

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

  std::string record_output;
  CLI::App* record = app.add_subcommand("record", "Write a live session's working set now (needs serve --control)");
  record->add_option("--control", control_path, "The daemon's control socket")->required();
  record->add_option("--session", session_id, "Session id, as in the session_start log line")->required();
  record->add_option("--output", record_output, "Working-set file to write")->required();

  CLI11_PARSE(app, argc, argv);

  if (zero_index->parsed()) {
    auto memory = faultline::MemoryFile::open(zi_memory);
    auto id = faultline::identify_file(zi_memory);
    if (!memory || !id) {
      std::fprintf(stderr, "faultline: %s\n", (!memory ? memory.error() : id.error()).describe().c_str());
      return 1;
    }
    auto z = faultline::ZeroIndex::build(**memory, *id);
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
    nlohmann::json req{{"cmd", "record"}, {"session", session_id}, {"path", record_output}};
    return print_control_reply(control_request(control_path, req.dump()));
  }

  if (sessions->parsed()) return print_control_reply(control_request(control_path, R"({"cmd":"sessions"})"));
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
    config.busy_poll = std::chrono::microseconds(busy_poll_us);
    config.handshake_timeout = std::chrono::milliseconds(handshake_timeout_ms);

    auto server = faultline::Server::create(config, logger);
    if (!server) {
      logger.error("startup_failed", {{"error", server.error().describe()}});
      return 1;
    }
    ::signal(SIGPIPE, SIG_IGN);
    g_server.store(server->get());
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGTERM, &sa, nullptr);
    ::sigaction(SIGINT, &sa, nullptr);
    auto status = (*server)->run();
    g_server.store(nullptr);
    if (!status) {
      logger.error("server_failed", {{"error", status.error().describe()}});
      return 1;
    }
    return 0;
  }
  return 0;
}
