// A kill must never reach a process that was given a dead client's pid.
//
// Run as pid 1 of a fresh pid namespace (tests/security_test.cc starts it
// under `unshare --pid --fork --mount-proc`), where the next pid can be
// chosen through /proc/sys/kernel/ns_last_pid and nothing else forks:
//   1. client A connects to an in-process faultline server, sends its uffd
//      and an incomplete handshake, hands its connection to us and exits
//      once the server has accepted it (and taken A's pidfd);
//   2. we reap A and fork B with A's pid;
//   3. we close A's connection: the handshake fails with the uffd received,
//      and --on-fatal=kill kills "the client". B must survive: the kill goes
//      through the pidfd of A, which has exited.
// Prints one line of results and the server's log; exits non-zero only when
// the scenario itself could not be set up.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "client/handshake.h"
#include "client/test_memory_file.h"
#include "client/uffd_setup.h"
#include "common/log.h"
#include "server/server.h"

namespace {

using namespace faultline;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "scenario failed: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(2);
}

void send_fd(int channel, int fd) {
  char byte = 'f';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  if (::sendmsg(channel, &msg, 0) != 1) ::_exit(3);
}

int receive_fd(int channel) {
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  if (::recvmsg(channel, &msg, MSG_CMSG_CLOEXEC) != 1) die("recvmsg of the client's connection");
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (c == nullptr || c->cmsg_type != SCM_RIGHTS) die("no fd from the client");
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: pid_reuse_scenario DIR (run under unshare --pid --fork --mount-proc)\n");
    return 2;
  }
  if (::getpid() != 1) {
    std::fprintf(stderr, "must run as pid 1 of a new pid namespace\n");
    return 2;
  }
  const std::string dir = argv[1];
  const std::string memory = dir + "/mem", socket = dir + "/reuse.sock", log_path = dir + "/scenario.log";
  if (!client::write_test_memory_file(memory, 4 << 20, 5, 0.1)) die("memory file");
  const int log_fd = ::open(log_path.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
  Logger logger(LogFormat::kText, LogLevel::kDebug, log_fd);
  ServerConfig config;
  config.socket_path = socket;
  config.memory_path = memory;
  config.on_fatal = OnFatal::kKill;
  config.handshake_timeout = std::chrono::seconds(60);
  auto server = Server::create(config, logger);
  if (!server) die("server: " + server.error().describe());
  std::thread serving([&] { (void)(*server)->run(); });

  int pass[2], go[2], hold[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pass) != 0 || ::pipe2(go, O_CLOEXEC) != 0 ||
      ::pipe2(hold, O_CLOEXEC) != 0) {
    die("socketpair/pipe");
  }
  const pid_t a = ::fork();
  if (a == 0) {
    UniqueFd conn(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket.c_str(), sizeof addr.sun_path - 1);
    if (::connect(conn.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(4);
    auto uffd = client::open_userfaultfd();
    if (!uffd || !client::uffd_api(uffd->get(), UFFD_FEATURE_EVENT_REMOVE)) ::_exit(5);
    const int fds[1] = {uffd->get()};
    if (!client::send_handshake(conn.get(), "[", fds)) ::_exit(6);  // an incomplete handshake, uffd included
    send_fd(pass[1], conn.get());
    char c;
    (void)!::read(go[0], &c, 1);
    ::_exit(0);
  }
  const int conn = receive_fd(pass[0]);
  // The server has accepted A's connection (and taken its pidfd) once it
  // counts a handshake in progress.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while ((*server)->handshakes_in_progress() < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  if ((*server)->handshakes_in_progress() != 1) die("the server never accepted the client");
  (void)!::write(go[1], "x", 1);
  int status = 0;
  if (::waitpid(a, &status, 0) != a) die("waitpid A");

  // The next pid handed out is A's, unless a task of this namespace is
  // created between the write and the fork (CI under ThreadSanitizer once
  // saw b = a + 1): then that child is reaped and the write and fork retried.
  pid_t b = -1;
  for (int attempt = 0; attempt < 100 && b != a; ++attempt) {
    if (b > 0) {
      ::kill(b, SIGKILL);
      ::waitpid(b, &status, 0);
    }
    { std::ofstream("/proc/sys/kernel/ns_last_pid") << a - 1 << "\n"; }
    b = ::fork();
    if (b == 0) {
      ::close(conn);  // inherited: only the parent may hold A's connection open
      char c;
      (void)!::read(hold[0], &c, 1);
      ::_exit(0);
    }
    if (b < 0) die("fork B");
  }
  // A's connection reaches EOF: the handshake fails after the uffd arrived.
  ::close(conn);
  if (!(*server)->wait_for_ended(1, std::chrono::seconds(30))) die("the handshake never ended");
  const bool alive = ::waitpid(b, &status, WNOHANG) == 0;
  std::printf("a=%d b=%d pid_reused=%s reuser_alive=%s\n", a, b, a == b ? "true" : "false", alive ? "true" : "false");
  ::kill(b, SIGKILL);
  ::waitpid(b, &status, 0);
  (*server)->stop();
  serving.join();
  std::ifstream in(log_path);
  std::stringstream text;
  text << in.rdbuf();
  std::printf("%s", text.str().c_str());
  return 0;
}
