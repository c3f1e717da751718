#!/usr/bin/env bash
# A measurement, not a test: a cold working-set prefetch restore from the
# local S3 gateway (scripts/rgw.sh) with and without frames read ahead
# (serve --prefetch-fetches), and the same from a local image. Each run is a
# fresh daemon (empty frame cache, no disk cache). Prints, per run, the
# client's restore time (its working set touched and every byte checked) and
# the prefetch_done line's figures, with `uptime` beside them.
#
#   scripts/bench-s3-prefetch.sh BIN_DIR [SIZE] [RUNS] [PORT]
#
# LATENCY_MS=N puts a proxy in front of the gateway that holds each request
# N ms before forwarding it: a store across a network, where a GET's cost is
# mostly waiting (the local gateway's cost is mostly CPU, on the same cores).
# STORES="s3 local" and FETCHES="0 12" (the defaults) choose what is run;
# runs alternate between the FETCHES values so that drift in the machine's
# load falls on both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cd "$1" && pwd)
size=${2:-256M}
runs=${3:-3}
port=${4:-17480}
work=$(mktemp -d /tmp/faultline-bench-s3-prefetch-XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
  bash scripts/rgw.sh stop "$work/rgw" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

RGW_OWNER_PID=$$ bash scripts/rgw.sh start "$work/rgw" "$port" >/dev/null
. "$work/rgw/env"
proxy_pid=""
if [ -n "${LATENCY_MS:-}" ]; then
  # One request per burst of bytes from the client (curl does not pipeline):
  # each is held LATENCY_MS before it goes on.
  python3 - "$port" $((port + 2)) "$LATENCY_MS" <<'PY' &
import asyncio, sys
up, listen, delay = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000
async def pump(r, w, hold):
    try:
        while data := await r.read(1 << 16):
            if hold:
                await asyncio.sleep(delay)
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()
async def conn(cr, cw):
    ur, uw = await asyncio.open_connection("127.0.0.1", up)
    await asyncio.gather(pump(cr, uw, True), pump(ur, cw, False))
async def main():
    server = await asyncio.start_server(conn, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY
  proxy_pid=$!
  sleep 0.5
fi
"$bin/faultline-client" generate --memory "$work/vm.mem" --size "$size" --zero-fraction 0.1 >/dev/null
"$bin/faultline" image create --from "$work/vm.mem" --store "$work/store" --name vm --quiet
"$bin/faultline" image push --store "$work/store" --name vm s3://bench/images --quiet

# The daemons read the bucket through the proxy (the image was pushed directly).
[ -n "$proxy_pid" ] && export AWS_ENDPOINT_URL=http://127.0.0.1:$((port + 2))

# serve IMAGE LOG ARGS...: starts a daemon, waits for its socket.
serve() {
  local image=$1 log=$2
  shift 2
  rm -f "$work/vm.sock"
  "$bin/faultline" serve --socket "$work/vm.sock" --image "$image" "$@" 2>"$log" &
  server_pid=$!
  for _ in $(seq 400); do [ -S "$work/vm.sock" ] && return 0; sleep 0.05; done
  cat "$log"
  return 1
}
stop_serving() {
  kill -TERM "$server_pid"
  wait "$server_pid" || true
  server_pid=""
}
restore() {
  "$bin/faultline-client" restore --socket "$work/vm.sock" --memory "$work/vm.mem" --threads 2 --pattern random \
    --touch-fraction 0.3 --write-fraction 0 --remove-fraction 0 --seed 5 --json
}

# The working set: a first restore of the VM, recorded.
serve s3://bench/images/vm "$work/record.log" --record "$work/ws"
restore >/dev/null
sleep 0.5  # the session writes the working set as it ends
stop_serving
[ -s "$work/ws" ] || { echo "no working set recorded"; exit 1; }

field() { sed -n "s/.*[ {\"]$1\"\{0,1\}[=:]\([0-9.]*\).*/\1/p" | head -1; }
images=()
for store in ${STORES:-s3 local}; do
  case $store in
    s3) images+=(s3://bench/images/vm) ;;
    local) [ -z "$proxy_pid" ] && images+=("$work/store/vm") ;;
  esac
done
for image in "${images[@]}"; do
  for run in $(seq "$runs"); do
    for fetches in ${FETCHES:-0 12}; do
      serve "$image" "$work/serve.log" --prefetch "$work/ws" --prefetch-fetches "$fetches"
      out=$(restore)
      sleep 0.5  # prefetch_done is logged as the session ends
      stop_serving
      done_line=$(grep 'event=prefetch_done' "$work/serve.log" || true)
      printf '%-5s fetches=%-2s run=%s restore_s=%s mismatches=%s prefetch_s=%s prefetched_pages=%s read_ahead_frames=%s used=%s evicted_unused=%s | %s\n' \
        "$([ "${image#s3://}" != "$image" ] && echo s3 || echo local)" "$fetches" "$run" \
        "$(echo "$out" | field elapsed_seconds)" "$(echo "$out" | field mismatches)" \
        "$(echo "$done_line" | field seconds)" "$(echo "$done_line" | field prefetched_pages)" \
        "$(echo "$done_line" | field read_ahead_frames)" "$(echo "$done_line" | field read_ahead_used)" \
        "$(echo "$done_line" | field read_ahead_evicted_unused)" "$(uptime | sed 's/.*load/load/')"
    done
  done
done
