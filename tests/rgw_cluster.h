// A single-node Ceph cluster with its RADOS Gateway on 127.0.0.1, started
// with scripts/rgw.sh for the S3 tests: either one cluster that every test
// of a ctest run shares (tests/s3_test_cluster.cc, the ctest fixture
// `s3_cluster`), or one that a single test owns because it stops the
// gateway. Starting one takes ~5 s, most of an S3 test's time.
//
// Not thread-safe: call from a test's main thread.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <random>
#include <string>

namespace faultline::testing {

// A TCP port nothing listens on now, with the next one free too (the mon's),
// below the kernel's ephemeral range (ip_local_port_range), so no outgoing
// connection's source port takes it before the daemons bind it.
inline int free_port_pair() {
  int ephemeral_low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral_low;
  const int low = 10000, span = std::max(ephemeral_low - 2 - low, 1000) / 2;
  std::mt19937 rng(static_cast<unsigned>(::getpid()) ^ static_cast<unsigned>(::time(nullptr)));
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int port = low + static_cast<int>(rng() % static_cast<unsigned>(span)) * 2;
    bool free = true;
    for (int p : {port, port + 1}) {
      const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<uint16_t>(p));
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) free = false;
      ::close(fd);
    }
    if (free) return port;
  }
  return 0;
}

inline std::string rgw_script() { return std::string("bash ") + FAULTLINE_SOURCE_DIR + "/scripts/rgw.sh "; }

// Starts a cluster in `dir` (emptied first) whose daemons stop by themselves
// once process `owner` exits (RGW_OWNER_PID: a crashed test or ctest run
// leaves no cluster behind). rgw.sh's output goes to `log`. Returns the
// gateway's port, or 0 when the cluster did not start.
inline int start_rgw_cluster(const std::string& dir, pid_t owner, const std::string& log) {
  // Another process may bind the chosen port between the probe and the
  // daemons' bind (another test picking ports): rgw.sh then exits 3 and
  // the cluster starts again on other ports.
  for (int attempt = 0; attempt < 4; ++attempt) {
    const int port = free_port_pair();
    if (port == 0) return 0;
    const std::string cmd = "RGW_OWNER_PID=" + std::to_string(owner) + " " + rgw_script() + "start " + dir + " " +
                            std::to_string(port) + " >" + log + " 2>&1";
    const int status = std::system(cmd.c_str());
    if (status == 0) return port;
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 3)) return 0;
  }
  return 0;
}

inline bool stop_rgw_cluster(const std::string& dir) {
  return std::system((rgw_script() + "stop " + dir).c_str()) == 0;
}

// The gateway's port of the cluster in `dir` (0 if none was started there).
inline int rgw_cluster_port(const std::string& dir) {
  int port = 0;
  std::ifstream(dir + "/port") >> port;
  return port;
}

// Puts the cluster's S3 settings (DIR/env: "export NAME=VALUE" lines) into
// this process's environment; false when `dir` holds none.
inline bool load_rgw_env(const std::string& dir) {
  std::ifstream env(dir + "/env");
  bool any = false;
  for (std::string line; std::getline(env, line);) {
    const auto eq = line.find('=');
    if (line.rfind("export ", 0) != 0 || eq == std::string::npos) continue;
    const std::string name = line.substr(7, eq - 7), value = line.substr(eq + 1);
    ::setenv(name.c_str(), value.c_str(), 1);
    any = true;
  }
  return any;
}

}  // namespace faultline::testing
