// s3_test_cluster start|stop DIR: the Ceph cluster (scripts/rgw.sh) that the
// tests of s3_test share within one ctest run. ctest runs each Google Test as
// its own process, so a cluster per test program would still be one per test
// (~5 s each, 25 tests, three stages); instead this program is the ctest
// fixture `s3_cluster` (tests/CMakeLists.txt): `start` runs before the first
// S3 test, `stop` after the last, and the tests find the cluster through
// FAULTLINE_S3_CLUSTER=DIR. Each test works in buckets of its own
// (S3Test::bucket_name), so they stay independent; a test that stops the gateway
// starts a cluster of its own (S3Test::use_own_cluster).
//
// The daemons' owner (RGW_OWNER_PID) is this program's parent, the ctest run:
// if ctest is stopped before the cleanup test runs, the cluster goes with it.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "rgw_cluster.h"

int main(int argc, char** argv) {
  using namespace faultline::testing;
  if (argc != 3) {
    std::fprintf(stderr, "usage: s3_test_cluster start|stop DIR\n");
    return 2;
  }
  const std::string cmd = argv[1], dir = argv[2];
  if (cmd == "stop") {
    if (rgw_cluster_port(dir) == 0) return 0;  // start found no Ceph: nothing runs
    return stop_rgw_cluster(dir) ? 0 : 1;
  }
  if (cmd != "start") {
    std::fprintf(stderr, "usage: s3_test_cluster start|stop DIR\n");
    return 2;
  }
  // Without Ceph every S3 test reports the missing capability itself (a
  // skip, or a failure under CI=true); this fixture has nothing to start.
  std::remove((dir + "/port").c_str());
  if (std::system("command -v ceph-mon >/dev/null && command -v radosgw >/dev/null") != 0) {
    std::printf("ceph-mon or radosgw is not installed: no cluster started\n");
    return 0;
  }
  const std::string log = dir + ".start.log";
  const int port = start_rgw_cluster(dir, ::getppid(), log);
  if (port == 0) {
    std::fprintf(stderr, "scripts/rgw.sh start %s failed:\n", dir.c_str());
    std::system(("cat " + log + " >&2").c_str());
    return 1;
  }
  std::printf("cluster in %s, gateway on 127.0.0.1:%d, stopped when pid %d exits\n", dir.c_str(), port,
              static_cast<int>(::getppid()));
  return 0;
}
