// The child processes faultline-bench starts: the baseline uffd servers
// (faultline-baseline-server --mode naive|busy-poll, one process per guest,
// as Firecracker meets one uffd handler per VM) and the generated background
// load of scenario 1's "loaded" runs (faultline-baseline-server --spin N).
// The program is found next to the running executable (/proc/self/exe's
// directory), where CMake puts both.
//
// Every child gets PR_SET_PDEATHSIG SIGKILL, so none outlives the bench, and
// is SIGKILLed and reaped by its owner's destructor if still running.
//
// Thread-safety: each object is driven by one controlling thread, the one
// that started it (PR_SET_PDEATHSIG follows the thread that forked).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace faultline::bench {

// Path of `program` in the directory of the running executable.
Result<std::string> sibling_program(const std::string& program);

// A started child process, SIGKILLed and reaped on destruction.
class ChildProcess {
 public:
  // fork + exec of argv[0] with `argv`; with capture_stdout the child's
  // standard output is a pipe this object reads lines from. Standard input is
  // /dev/null; standard error is inherited.
  static Result<ChildProcess> spawn(const std::vector<std::string>& argv, bool capture_stdout);
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  // The next line of the child's standard output (without its newline).
  // ETIMEDOUT when none arrived in time, EPIPE when the output ended first.
  Result<std::string> read_line(std::chrono::milliseconds timeout);
  // Waits for the child to exit (SIGKILL first if `kill`); its wait status
  // and the CPU seconds (user + system) it used. Idempotent.
  struct Ended {
    int status = 0;
    double cpu_seconds = 0;
  };
  Result<Ended> finish(bool kill);

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  UniqueFd stdout_;
  std::string pending_;  // bytes read past the last returned line
  Ended ended_;
};

// What a baseline server said it did (its "exit" line).
struct BaselineStats {
  uint64_t faults = 0;
  uint64_t removes = 0;
  uint64_t eagain_retries = 0;
  uint64_t state_bytes = 0;  // removed-page map + page buffers
  std::string reason;        // why it stopped serving ("the client closed its socket")
};

enum class BaselineMode { kNaive, kBusyPoll };
const char* to_string(BaselineMode mode);  // "naive", "busy-poll"

// One faultline-baseline-server serving one guest. Lines of its output:
// "listening" (start() returns after it), "serving" (wait_serving()),
// "exit" (wait_exit()); see bench/baseline_server.cc.
class BaselineProcess {
 public:
  // Starts the server and returns once it listens on `socket_path`.
  static Result<std::unique_ptr<BaselineProcess>> start(BaselineMode mode, const std::string& memory_path,
                                                        const std::string& socket_path);
  const std::string& socket_path() const { return socket_path_; }
  pid_t pid() const { return child_.pid(); }
  // After the handshake was sent: returns once the server has the uffd and
  // its state (scenario 1 times fault service, not the handshake).
  Status wait_serving(std::chrono::milliseconds timeout);
  // Heap bytes the server holds for its state, from its "serving" line.
  uint64_t state_bytes() const { return state_bytes_; }
  // After the client went away: the server's exit line, once it has exited
  // with status 0. An error when it failed or did not exit in time (it is
  // then killed). Idempotent: later calls return the first outcome.
  Result<BaselineStats> wait_exit(std::chrono::milliseconds timeout);

 private:
  BaselineProcess(ChildProcess child, std::string socket_path)
      : child_(std::move(child)), socket_path_(std::move(socket_path)) {}
  ChildProcess child_;
  std::string socket_path_;
  uint64_t state_bytes_ = 0;
  std::optional<Result<BaselineStats>> exit_;
};

// The generated background load: faultline-baseline-server --spin N, a
// separate process whose N threads spin until it is killed.
class SpinLoad {
 public:
  static Result<SpinLoad> start(int threads);
  // Kills and reaps it; its CPU seconds tell how much it ran.
  Result<ChildProcess::Ended> stop();
  int threads() const { return threads_; }

 private:
  SpinLoad(ChildProcess child, int threads) : child_(std::move(child)), threads_(threads) {}
  ChildProcess child_;
  int threads_ = 0;
};

}  // namespace faultline::bench
