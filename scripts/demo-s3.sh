#!/usr/bin/env bash
# The object-store demo: starts a real S3 store on 127.0.0.1 (a single-node
# Ceph cluster with its RADOS Gateway, scripts/rgw.sh), makes a 2-layer image
# from a generated 256 MiB memory snapshot (a base and a diff on top of it),
# pushes it to a bucket, and restores two VMs straight from the bucket through
# one daemon (`faultline serve --control ... --socket-dir ...`, then
# `faultline attach --image s3://...` for the child and for its base, each on
# its own socket): the Firecracker-faithful clients touch, write and balloon
# pages away, verifying every byte. Prints each step's output and the
# daemon's log; stops the store at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== building (Release) into build-demo/"
mkdir -p build-demo
BUILD_DIR=build-demo BUILD_TARGETS="faultline faultline-client" scripts/build.sh -DCMAKE_BUILD_TYPE=Release \
  >build-demo/build.log 2>&1 ||
  { tail -50 build-demo/build.log; exit 1; }
bin=$PWD/build-demo/bin
work=$(mktemp -d /tmp/faultline-demo-s3-XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  bash scripts/rgw.sh stop "$work/rgw" || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting a single-node Ceph cluster and its S3 gateway on 127.0.0.1:7480 (scripts/rgw.sh)"
RGW_OWNER_PID=$$ bash scripts/rgw.sh start "$work/rgw" 7480 >/dev/null
# shellcheck disable=SC1091
. "$work/rgw/env"
echo "   AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL (credentials in $work/rgw/env)"

echo "== generating a 256 MiB memory snapshot and a next generation of it (1/16 of the pages rewritten)"
"$bin/faultline-client" generate --memory "$work/base.mem" --size 256M --zero-fraction 0.1
cp "$work/base.mem" "$work/child.mem"
for at in $(seq 0 16 4095); do
  dd if=/dev/urandom of="$work/child.mem" bs=64K seek="$at" count=1 conv=notrunc status=none
done

echo "== faultline image create (base, then child --parent base) into $work/store"
"$bin/faultline" image create --from "$work/base.mem" --store "$work/store" --name base --quiet
"$bin/faultline" image create --from "$work/child.mem" --store "$work/store" --name child --parent base --quiet

echo "== faultline image push --store $work/store --name child s3://demo/images"
"$bin/faultline" image push --store "$work/store" --name child s3://demo/images --quiet
rm -rf "$work/store"  # from here on, the bucket is the only copy
"$bin/faultline" image inspect --store s3://demo/images --name child

echo "== starting one daemon for every image: faultline serve --control $work/control.sock --socket-dir $work/vms --cache-dir $work/cache"
mkdir -p "$work/vms"
"$bin/faultline" serve --control "$work/control.sock" --socket-dir "$work/vms" --cache-dir "$work/cache" \
  2>"$work/server.log" &
server_pid=$!
for _ in $(seq 200); do [ -S "$work/control.sock" ] && break; sleep 0.05; done
[ -S "$work/control.sock" ] || { cat "$work/server.log"; echo "faultline did not start"; exit 1; }

echo "== faultline attach: child.sock serves s3://demo/images/child, base.sock serves its parent s3://demo/images/base"
"$bin/faultline" attach --control "$work/control.sock" --socket child.sock --image s3://demo/images/child
"$bin/faultline" attach --control "$work/control.sock" --socket base.sock --image s3://demo/images/base

echo "== restoring two VMs at once as Firecracker 1.14 would (2 host threads each), random order,"
echo "   every byte checked against child.mem and base.mem; the frames they share are fetched once"
status=0
"$bin/faultline-client" restore --socket "$work/vms/child.sock" --memory "$work/child.mem" --fc-version 1.14 \
  --threads 2 --pattern random --write-fraction 0.25 --remove-fraction 0.05 >"$work/child.out" 2>&1 &
child_pid=$!
"$bin/faultline-client" restore --socket "$work/vms/base.sock" --memory "$work/base.mem" --fc-version 1.14 \
  --threads 2 --pattern random --write-fraction 0.25 --remove-fraction 0.05 || status=$?
wait "$child_pid" || status=$?
echo "-- the VM restored from child:"
cat "$work/child.out"

echo "== faultline attachments, then faultline detach of both sockets"
"$bin/faultline" attachments --control "$work/control.sock"
"$bin/faultline" detach --control "$work/control.sock" --socket child.sock >/dev/null
"$bin/faultline" detach --control "$work/control.sock" --socket base.sock >/dev/null

kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
echo "== faultline's log"
cat "$work/server.log"
exit $status
