#!/usr/bin/env bash
# A single-node Ceph cluster with its RADOS Gateway (S3) on 127.0.0.1, for the
# object-store tests, the benchmark and the S3 demo. Everything lives in DIR:
# configuration, data (the OSD keeps objects in memory: memstore), logs, the
# daemons' PIDs and `DIR/env`, the S3 settings in the AWS variables
# (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
# No systemd, no mgr: one mon, one OSD, one radosgw, each started in the
# foreground under setsid and stopped by its PID. Settings and why:
# ../shared/STORAGE.md section 3 and docs/object-store.md.
#
#   scripts/rgw.sh start DIR [PORT]  start (PORT: the gateway's, default 7480;
#                                     the mon listens on PORT+1); prints `. DIR/env`;
#                                     exits 3 when a port is taken; with
#                                     RGW_OWNER_PID=PID in the environment the
#                                     daemons are stopped when PID exits (a test
#                                     that crashed leaves no cluster behind)
#   scripts/rgw.sh stop DIR          stop the daemons started in DIR
#   scripts/rgw.sh status DIR        exit 0 when the gateway answers
#   scripts/rgw.sh gateway-stop DIR  stop only radosgw (the store "goes down")
#   scripts/rgw.sh gateway-start DIR start radosgw again and wait until it answers
#
# Needs the Debian packages ceph-mon ceph-osd radosgw ceph-common
# (scripts/install-deps.sh installs them).
set -euo pipefail

usage() {
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
port=${3:-$(cat "$dir/port" 2>/dev/null || echo 7480)}

pids() { cat "$dir"/*.pid 2>/dev/null || true; }

stop() {
  local p
  # The watchdog first (when this is not the watchdog itself stopping).
  p=$(cat "$dir/watchdog.wpid" 2>/dev/null || true)
  if [ -n "$p" ] && [ "$p" != "${RGW_WATCHDOG_SELF:-}" ]; then kill "$p" 2>/dev/null || true; fi
  rm -f "$dir/watchdog.wpid"
  for p in $(pids); do kill "$p" 2>/dev/null || true; done
  # The data lives in the OSD's memory and goes with it: no clean shutdown
  # to wait for beyond 2 s (the mon takes ~6 s to honour SIGTERM).
  for _ in $(seq 1 20); do
    local alive=0
    for p in $(pids); do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1  # polling for the daemons to exit
  done
  for p in $(pids); do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$dir"/*.pid
}

answers() {
  # Any HTTP answer from the gateway (an anonymous request gets an S3 XML body).
  curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/" 2>/dev/null
}

# daemon NAME COMMAND...: starts COMMAND in its own session, keeps its PID.
daemon() {
  local name=$1
  shift
  setsid "$@" >"$dir/log/$name.out" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

# fail [--code N] MESSAGE: prints MESSAGE and the logs' tails, stops the
# daemons, exits N (default 1; 3 means "the port is taken: pick another").
fail() {
  local code=1
  if [ "$1" = --code ]; then
    code=$2
    shift 2
  fi
  echo "rgw.sh: $*" >&2
  for f in "$dir"/log/*; do
    [ -s "$f" ] || continue
    echo "--- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
  stop
  exit "$code"
}

start_gateway() {
  export CEPH_CONF="$dir/ceph.conf"
  daemon rgw radosgw -f -n client.rgw
  local pid
  pid=$(cat "$dir/rgw.pid")
  for _ in $(seq 1 300); do
    answers && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1  # polling for the gateway to listen
  done
  answers && return 0
  if grep -qs "failed to bind address.*Address already in use" "$dir/log/rgw.out" "$dir/log/client.rgw.log"; then
    fail --code 3 "127.0.0.1:$port is taken by another process"
  fi
  fail "the gateway did not answer on 127.0.0.1:$port"
}

stop_gateway() {
  local p
  p=$(cat "$dir/rgw.pid" 2>/dev/null) || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1  # polling for the gateway to exit
  done
  kill -9 "$p" 2>/dev/null || true
  rm -f "$dir/rgw.pid"
}

start() {
  for b in ceph-mon ceph-osd radosgw ceph radosgw-admin monmaptool curl; do
    command -v "$b" >/dev/null || {
      echo "rgw.sh: $b is missing: run scripts/install-deps.sh" >&2
      exit 1
    }
  done
  [ -z "$(pids)" ] || stop
  rm -rf "$dir"
  mkdir -p "$dir/mon" "$dir/osd" "$dir/log" "$dir/run"
  dir=$(cd "$dir" && pwd)
  local mon_port=$((port + 1))
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
# no keys on loopback: and crc, or radosgw insists on secure mode (error -13)
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
# one node, one copy
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon warn on pool no redundancy = false
# a quick first start (else ~9 s of paxos waits)
paxos propose interval = 0.05
paxos min wait = 0.01
# Ceph's daemons format their debug messages into an in-memory ring as
# well as the log file (the second number of each level): off here, errors
# still logged. Measured by faultline-bench --scenario store: see
# docs/performance.md "Images in an object store".
debug asok = 0/0
debug auth = 0/0
debug buffer = 0/0
debug context = 0/0
debug crush = 0/0
debug finisher = 0/0
debug heartbeatmap = 0/0
debug memdb = 0/0
debug mon = 0/0
debug monc = 0/0
debug ms = 0/0
debug objclass = 0/0
debug objecter = 0/0
debug optracker = 0/0
debug osd = 0/0
debug paxos = 0/0
debug perfcounter = 0/0
debug rados = 0/0
debug reserver = 0/0
debug rgw = 0/0
debug rocksdb = 0/0
debug leveldb = 0/0
debug throttle = 0/0
debug timer = 0/0
debug tp = 0/0
[mon]
mon data = $dir/mon
[osd]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = 17179869184
osd journal size = 0
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
rgw dns name = 127.0.0.1
# deleted data is freed when the garbage collector runs
rgw gc obj min wait = 30
rgw gc processor period = 30
EOF
  export CEPH_CONF="$dir/ceph.conf"
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null ||
    fail "monmaptool failed"
  ceph-mon --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1 || fail "ceph-mon --mkfs failed"
  daemon mon ceph-mon -f -i a
  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  local id
  id=$(timeout 30 ceph osd create "$uuid" 2>"$dir/log/osd-create.out") || {
    grep -qs "Address already in use" "$dir/log/mon.out" "$dir/log/mon.a.log" &&
      fail --code 3 "127.0.0.1:$mon_port (the mon's) is taken by another process"
    fail "the mon did not answer (ceph osd create)"
  }
  ceph-osd -i "$id" --mkfs --osd-uuid "$uuid" >"$dir/log/mkfs-osd.out" 2>&1 || fail "ceph-osd --mkfs failed"
  daemon osd ceph-osd -f -i "$id"
  for _ in $(seq 1 300); do
    timeout 10 ceph osd stat 2>/dev/null | grep -q '1 up' && break
    sleep 0.1  # polling for the OSD to boot
  done
  timeout 10 ceph osd stat 2>/dev/null | grep -q '1 up' || fail "the OSD did not come up"
  echo "$port" >"$dir/port"
  start_gateway
  local access secret
  access=FAULTLINE$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)
  secret=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
  timeout 60 radosgw-admin user create --uid=faultline --display-name=faultline \
    --access-key="$access" --secret="$secret" >"$dir/log/user.out" 2>&1 || fail "radosgw-admin user create failed"
  cat >"$dir/env" <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$access
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
EOF
  if [ -n "${RGW_OWNER_PID:-}" ]; then
    # Stops the cluster once its owner is gone (checked every second: a
    # bound on leftover daemons, nothing waits on it).
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; RGW_WATCHDOG_SELF=$$ exec bash "$2" stop "$3"' \
      watchdog "$RGW_OWNER_PID" "$0" "$dir" >/dev/null 2>&1 </dev/null &
    echo $! >"$dir/watchdog.wpid"
  fi
  echo ". $dir/env"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  gateway-stop) stop_gateway ;;
  gateway-start) start_gateway ;;
  *) usage ;;
esac
