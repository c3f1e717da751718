#!/usr/bin/env bash
# Runs every fuzz target (fuzz/CMakeLists.txt) with AFL++ for SECONDS each
# (as many at once as there are cores), then replays everything the fuzzer
# kept under AddressSanitizer.
#
#   bash scripts/fuzz.sh [SECONDS]        (default 30)
#
# Prints, per target, the executions run, the corpus entries (paths) and
# edges found, and the crashes and hangs saved. Exits non-zero on any crash,
# hang or ASan report, after printing each failing input (hex) and what the
# target said about it. docs/fuzzing.md says how to run longer campaigns.
#
# Environment:
#   FUZZ_WORK_DIR     builds and AFL++ output (default build-fuzz/ in the repository)
#   FUZZ_TARGETS      space-separated subset of targets (default: all)
#   FUZZ_ASAN_REPLAY  0 skips the ASan build and replay (default 1)
#   FUZZ_JOBS         build parallelism (default 2)
#   FUZZ_PARALLEL     targets fuzzed at once, one afl-fuzz each (default: the cores)
#   FUZZ_REPLAY_BUILD an AddressSanitizer build directory whose bin/fuzz_NAME
#                     replay programs are used instead of building new ones
#   FUZZ_BUILD_ONLY   1: only build the AFL++ targets, then exit (scripts/test.sh
#                     builds them in the background while tests run)
set -euo pipefail

seconds=${1:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${FUZZ_WORK_DIR:-$root/build-fuzz}
jobs=${FUZZ_JOBS:-2}
parallel=${FUZZ_PARALLEL:-$(nproc)}
asan_replay=${FUZZ_ASAN_REPLAY:-1}
afl_build=$work/afl
asan_build=$work/asan
out=$work/out
# Every library directory the root CMakeLists.txt builds (FAULTLINE_ALL_DIRS,
# in its dependency order) plus fuzz/: a new library a target links cannot be
# left out of these builds (fuzz_control_request once was: no src/metrics).
dirs=$(sed -n '/^set(FAULTLINE_ALL_DIRS/,/)/p' "$root/CMakeLists.txt" | tr -s ' \n()' '\n' | grep '^src/' | paste -sd';')
[ -n "$dirs" ] || { echo "fuzz.sh: no src/ directories found in FAULTLINE_ALL_DIRS of CMakeLists.txt" >&2; exit 2; }
dirs="$dirs;fuzz"

for tool in afl-fuzz afl-g++; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool not found (bash scripts/install-deps.sh installs afl++)" >&2; exit 2; }
done
mkdir -p "$work"
started=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - started ))s] $*"; }

# AFL++ build: instrumented by afl-g++ (classic GCC mode, see fuzz/CMakeLists.txt),
# with libstdc++'s bounds checks on so an out-of-range index aborts even
# without a sanitizer (ASan does not run inside AFL++'s persistent mode here).
stamp "building the AFL++ targets"
cmake -S "$root" -B "$afl_build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=afl-g++ \
  -DCMAKE_CXX_FLAGS="-D_GLIBCXX_ASSERTIONS" -DFAULTLINE_ONLY_DIRS="$dirs" -DFAULTLINE_FUZZ_ENGINE=afl \
  -DFAULTLINE_TEST_HOOKS=OFF >"$work/afl-configure.log" 2>&1 || { cat "$work/afl-configure.log"; exit 1; }
mapfile -t all_targets < "$afl_build/fuzz_targets.txt"
read -r -a targets <<< "${FUZZ_TARGETS:-${all_targets[*]}}"
cmake --build "$afl_build" -j"$jobs" --target "${targets[@]/#/fuzz_}" >"$work/afl-build.log" 2>&1 ||
  { tail -50 "$work/afl-build.log"; exit 1; }
if [ "${FUZZ_BUILD_ONLY:-0}" = 1 ]; then
  stamp "built the AFL++ targets (FUZZ_BUILD_ONLY=1)"
  exit 0
fi

replayed_under="ASan+UBSan"
if [ "$asan_replay" = 1 ] && [ -n "${FUZZ_REPLAY_BUILD:-}" ]; then
  # The replay programs of an AddressSanitizer build that already exists
  # (scripts/test.sh passes its build-asan/, whose sanitizer stage built them).
  asan_build=$FUZZ_REPLAY_BUILD
  replayed_under="$(sed -n 's/^FAULTLINE_SANITIZER:[A-Z]*=//p' "$asan_build/CMakeCache.txt" 2>/dev/null) ($asan_build)"
  for t in "${targets[@]}"; do
    [ -x "$asan_build/bin/fuzz_$t" ] || { echo "fuzz.sh: $asan_build/bin/fuzz_$t is missing"; exit 1; }
  done
elif [ "$asan_replay" = 1 ]; then
  stamp "building the replay programs with AddressSanitizer and UBSan"
  cmake -S "$root" -B "$asan_build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=g++ \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DFAULTLINE_SANITIZER="address,undefined" \
    -DFAULTLINE_ONLY_DIRS="$dirs" -DFAULTLINE_TEST_HOOKS=OFF >"$work/asan-configure.log" 2>&1 ||
    { cat "$work/asan-configure.log"; exit 1; }
  cmake --build "$asan_build" -j"$jobs" --target "${targets[@]/#/fuzz_}" >"$work/asan-build.log" 2>&1 ||
    { tail -50 "$work/asan-build.log"; exit 1; }
fi

# Prints up to 3 failing inputs of a directory, and what the target says.
show_inputs() {
  local binary=$1 dir=$2 shown=0
  for input in "$dir"/id:*; do
    [ -f "$input" ] || continue
    [ $shown -lt 3 ] || { echo "   (more in $dir)"; break; }
    shown=$((shown + 1))
    echo "-- input $input ($(stat -c %s "$input") bytes):"
    head -c 512 "$input" | od -A d -t x1z | head -20
    echo "-- the target on it:"
    timeout 10 "$binary" "$input" 2>&1 | grep -v '^replaying ' | tail -15 || true
  done
}

# One afl-fuzz per target, FUZZ_PARALLEL of them at once (each is one
# process on one core), then each target's results in order.
run_afl() {  # $1 = target; its exit code goes to $out/$1.rc
  local t=$1 corpus=$root/fuzz/corpus/$1 rc=0
  local dict=()
  [ -f "$root/fuzz/dict/$t.dict" ] && dict=(-x "$root/fuzz/dict/$t.dict")
  # -t 1000: an input that runs longer than 1 s is a hang. AFL_NO_AFFINITY:
  # CI machines share their cores. AFL_SKIP_CPUFREQ: no root needed for the
  # governor check.
  AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    afl-fuzz -i "$corpus" -o "$out/$t" -V "$seconds" -t 1000 "${dict[@]}" -- "$afl_build/bin/fuzz_$t" \
    >"$out/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$out/$t.rc"
}
running=0
for t in "${targets[@]}"; do
  rm -rf "${out:?}/$t" "$out/$t.rc"
  mkdir -p "$out/$t"
  stamp "fuzzing $t for ${seconds}s"
  run_afl "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

failed=0
summary=()
for t in "${targets[@]}"; do
  if [ "$(cat "$out/$t.rc" 2>/dev/null)" != 0 ]; then
    echo "afl-fuzz failed for $t:"
    tail -30 "$out/$t.log"
    failed=1
    continue
  fi
  stats=$out/$t/default/fuzzer_stats
  stat_of() { awk -v k="$1" -F' *: *' '$1 == k { print $2 }' "$stats"; }
  execs=$(stat_of execs_done) paths=$(stat_of corpus_count) edges=$(stat_of edges_found) total=$(stat_of total_edges)
  crashes=$(stat_of saved_crashes) hangs=$(stat_of saved_hangs)
  line=$(printf '%-12s %10s execs  %6s paths  %5s/%s edges  %s crashes  %s hangs' "$t" "$execs" "$paths" "$edges" "$total" "$crashes" "$hangs")
  # A "hang" is an input that took over 1 s once; on a busy (shared) machine
  # a stall can do that. One that runs to the end within 10 s on its own
  # does not hang: it is reported, not failed.
  real_hangs=0
  for input in "$out/$t/default/hangs"/id:*; do
    [ -f "$input" ] || continue
    if timeout 10 "$afl_build/bin/fuzz_$t" "$input" >/dev/null 2>&1; then
      echo "-- $t: $(basename "$input") was saved as a hang but runs to the end on its own (a stall of the machine); not counted"
      rm -f "$input"
    else
      real_hangs=$((real_hangs + 1))
    fi
  done
  hangs=$real_hangs
  line=$(printf '%-12s %10s execs  %6s paths  %5s/%s edges  %s crashes  %s hangs' "$t" "$execs" "$paths" "$edges" "$total" "$crashes" "$hangs")
  if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
    failed=1
    line+="  FAILED"
    echo "!! $t: $crashes crashes, $hangs hangs"
    show_inputs "$afl_build/bin/fuzz_$t" "$out/$t/default/crashes"
    show_inputs "$afl_build/bin/fuzz_$t" "$out/$t/default/hangs"
  fi
  if [ "$asan_replay" = 1 ]; then
    if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$asan_build/bin/fuzz_$t" "$out/$t/default/queue" >"$out/$t.asan.log" 2>&1; then
      failed=1
      line+="  ASAN"
      echo "!! $t: the ASan replay of the queue failed on $(grep '^replaying ' "$out/$t.asan.log" | tail -1 | cut -d' ' -f2):"
      grep -v '^replaying ' "$out/$t.asan.log" | head -40
    else
      line+="  (queue replayed under $replayed_under)"
    fi
  fi
  summary+=("$line")
done

stamp "done"
printf '%s\n' "${summary[@]}"
if [ $failed != 0 ]; then
  echo "fuzz.sh: FAILED (inputs above; AFL++ output in $out)"
  exit 1
fi
echo "fuzz.sh: no crash, no hang"
