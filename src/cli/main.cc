// The faultline command line.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <map>
#include <string>

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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faultline: a userfaultfd memory server for Firecracker microVM snapshots"};
  app.require_subcommand(1);

  faultline::ServerConfig config;
  std::string on_fatal = "kill";
  std::string log_format = "text";
  std::string log_level = "info";
  int handshake_timeout_ms = 5000;

  CLI::App* serve = app.add_subcommand("serve", kServeDescription);
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

  CLI11_PARSE(app, argc, argv);

  if (serve->parsed()) {
    const std::map<std::string, faultline::LogLevel> levels{{"debug", faultline::LogLevel::kDebug},
                                                            {"info", faultline::LogLevel::kInfo},
                                                            {"warn", faultline::LogLevel::kWarn},
                                                            {"error", faultline::LogLevel::kError}};
    faultline::Logger logger(log_format == "json" ? faultline::LogFormat::kJson : faultline::LogFormat::kText,
                             levels.at(log_level));
    config.on_fatal = on_fatal == "leave" ? faultline::OnFatal::kLeave : faultline::OnFatal::kKill;
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
