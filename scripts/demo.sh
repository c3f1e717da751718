#!/usr/bin/env bash
# The demo: generates a 256 MiB memory snapshot, serves it with
# `faultline serve`, and restores it with the Firecracker-faithful client
# (host threads and, where /dev/kvm exists, KVM vCPUs), which touches,
# writes, balloons pages away (madvise: REMOVE events) and re-touches them,
# verifying every byte. Prints the client's report and the daemon's log.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== building (Release) into build-demo/"
mkdir -p build-demo
BUILD_DIR=build-demo BUILD_TARGETS="faultline faultline-client" scripts/build.sh -DCMAKE_BUILD_TYPE=Release \
  >build-demo/build.log 2>&1 ||
  { tail -50 build-demo/build.log; exit 1; }
bin=build-demo/bin
work=$(mktemp -d /tmp/faultline-demo-XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== generating a 256 MiB memory snapshot"
"$bin/faultline-client" generate --memory "$work/mem" --size 256M --zero-fraction 0.1

echo "== starting: faultline serve --socket $work/vm.sock --memory $work/mem"
"$bin/faultline" serve --socket "$work/vm.sock" --memory "$work/mem" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 200); do [ -S "$work/vm.sock" ] && break; sleep 0.05; done
[ -S "$work/vm.sock" ] || { cat "$work/server.log"; echo "faultline did not start"; exit 1; }

vcpus=0
[ -r /dev/kvm ] && vcpus=1
echo "== restoring as Firecracker 1.14 would (2 host threads, $vcpus KVM vCPU), random order"
"$bin/faultline-client" restore --socket "$work/vm.sock" --memory "$work/mem" --fc-version 1.14 \
  --threads 2 --kvm-vcpus "$vcpus" --pattern random --write-fraction 0.25 --remove-fraction 0.05
status=$?

kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
echo "== faultline's log"
cat "$work/server.log"
exit $status
