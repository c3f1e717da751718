#include "bench/baseline_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <utility>

#include <nlohmann/json.hpp>

namespace faultline::bench {

Result<std::string> sibling_program(const std::string& program) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return fail("cannot read /proc/self/exe: " + ec.message());
  const std::filesystem::path path = self.parent_path() / program;
  if (::access(path.c_str(), X_OK) != 0) return fail_errno(path.string() + " is not an executable (build it)");
  return path.string();
}

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv, bool capture_stdout) {
  if (argv.empty()) return fail("no program to start");
  // Everything the child needs is built before fork(): after it, only
  // async-signal-safe calls.
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int out[2] = {-1, -1};
  if (capture_stdout && ::pipe2(out, O_CLOEXEC) != 0) return fail_errno("pipe2 for a child's output");
  UniqueFd read_end(out[0]), write_end(out[1]);
  UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!null) return fail_errno("cannot open /dev/null");
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return fail_errno("fork");
  if (pid == 0) {
    // The bench may die without cleaning up (SIGKILL): a busy-polling server
    // or the spinner must not keep two cores busy forever.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the parent died before prctl
    ::dup2(null.get(), STDIN_FILENO);
    if (capture_stdout) ::dup2(write_end.get(), STDOUT_FILENO);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ChildProcess c;
  c.pid_ = pid;
  c.stdout_ = std::move(read_end);
  return c;
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      stdout_(std::move(other.stdout_)),
      pending_(std::move(other.pending_)),
      ended_(other.ended_) {}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    (void)finish(true);
    pid_ = std::exchange(other.pid_, -1);
    stdout_ = std::move(other.stdout_);
    pending_ = std::move(other.pending_);
    ended_ = other.ended_;
  }
  return *this;
}

ChildProcess::~ChildProcess() { (void)finish(true); }

Result<std::string> ChildProcess::read_line(std::chrono::milliseconds timeout) {
  if (!stdout_) return fail("the child's output is not captured", EPIPE);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const size_t nl = pending_.find('\n');
    if (nl != std::string::npos) {
      std::string line = pending_.substr(0, nl);
      pending_.erase(0, nl + 1);
      return line;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return fail("no line from the child in time", ETIMEDOUT);
    pollfd p{stdout_.get(), POLLIN, 0};
    const int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc < 0 && errno != EINTR) return fail_errno("poll of a child's output");
    if (rc <= 0) continue;
    char buf[512];
    const ssize_t n = ::read(stdout_.get(), buf, sizeof buf);
    if (n == 0) return fail("the child's output ended", EPIPE);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail_errno("read of a child's output");
    }
    pending_.append(buf, static_cast<size_t>(n));
  }
}

Result<ChildProcess::Ended> ChildProcess::finish(bool kill) {
  if (pid_ < 0) return ended_;
  if (kill) ::kill(pid_, SIGKILL);
  int status = 0;
  rusage usage{};
  pid_t r;
  do {
    r = ::wait4(pid_, &status, 0, &usage);
  } while (r < 0 && errno == EINTR);
  pid_ = -1;
  stdout_.reset();
  if (r < 0) return fail_errno("wait4 of a child");
  auto seconds = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; };
  ended_ = Ended{status, seconds(usage.ru_utime) + seconds(usage.ru_stime)};
  return ended_;
}

const char* to_string(BaselineMode mode) { return mode == BaselineMode::kNaive ? "naive" : "busy-poll"; }

namespace {

// The next line of a baseline server, parsed; an "exit" line where another
// was expected becomes its error.
Result<nlohmann::json> read_event(ChildProcess& child, const char* expected, std::chrono::milliseconds timeout) {
  auto line = child.read_line(timeout);
  if (!line) return fail(std::string("faultline-baseline-server did not say '") + expected + "': " + line.error().describe());
  nlohmann::json j = nlohmann::json::parse(*line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return fail("faultline-baseline-server printed a line that is not JSON: " + *line);
  const std::string event = j.value("event", "");
  if (event == expected) return j;
  if (event == "exit") return fail("faultline-baseline-server failed: " + j.value("error", j.value("reason", *line)));
  return fail(std::string("faultline-baseline-server said '") + event + "', not '" + expected + "'");
}

}  // namespace

Result<std::unique_ptr<BaselineProcess>> BaselineProcess::start(BaselineMode mode, const std::string& memory_path,
                                                                const std::string& socket_path) {
  auto program = sibling_program("faultline-baseline-server");
  if (!program) return std::unexpected(program.error());
  auto child = ChildProcess::spawn({*program, "--mode", to_string(mode), "--socket", socket_path, "--memory", memory_path},
                                   true);
  if (!child) return std::unexpected(child.error());
  std::unique_ptr<BaselineProcess> p(new BaselineProcess(std::move(*child), socket_path));
  if (auto j = read_event(p->child_, "listening", std::chrono::seconds(10)); !j) return std::unexpected(j.error());
  return p;
}

Status BaselineProcess::wait_serving(std::chrono::milliseconds timeout) {
  auto j = read_event(child_, "serving", timeout);
  if (!j) return std::unexpected(j.error());
  state_bytes_ = j->value("state_bytes", uint64_t{0});
  return {};
}

Result<BaselineStats> BaselineProcess::wait_exit(std::chrono::milliseconds timeout) {
  if (exit_) return *exit_;
  auto outcome = [&]() -> Result<BaselineStats> {
    // Lines still unread ("serving", when nobody waited for it) come first.
    for (;;) {
      auto line = child_.read_line(timeout);
      if (!line) {
        (void)child_.finish(true);
        return fail("faultline-baseline-server did not exit after its client went away: " + line.error().describe());
      }
      nlohmann::json j = nlohmann::json::parse(*line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || j.value("event", "") != "exit") continue;
      auto ended = child_.finish(false);
      if (!ended) return std::unexpected(ended.error());
      if (j.contains("error")) return fail("faultline-baseline-server failed: " + j.value("error", std::string()));
      if (!WIFEXITED(ended->status) || WEXITSTATUS(ended->status) != 0) {
        return fail("faultline-baseline-server exited with status " + std::to_string(ended->status));
      }
      BaselineStats s;
      s.faults = j.value("faults", uint64_t{0});
      s.removes = j.value("removes", uint64_t{0});
      s.eagain_retries = j.value("eagain_retries", uint64_t{0});
      s.state_bytes = j.value("state_bytes", uint64_t{0});
      s.reason = j.value("reason", std::string());
      return s;
    }
  }();
  exit_ = outcome;
  return outcome;
}

Result<SpinLoad> SpinLoad::start(int threads) {
  auto program = sibling_program("faultline-baseline-server");
  if (!program) return std::unexpected(program.error());
  auto child = ChildProcess::spawn({*program, "--spin", std::to_string(threads)}, false);
  if (!child) return std::unexpected(child.error());
  return SpinLoad(std::move(*child), threads);
}

Result<ChildProcess::Ended> SpinLoad::stop() { return child_.finish(true); }

}  // namespace faultline::bench
