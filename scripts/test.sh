#!/usr/bin/env bash
# Installs, builds and runs every test. What CI runs (.ci/run), in order:
#   1. build-asan/: every target with AddressSanitizer and UBSan (-O1 -g1,
#      test hooks on, every directory), and the whole suite in it (ctest -j2);
#   2. build-tsan/: every test program registered with SANITIZERS YES (ctest
#      label `sanitizers`, see cmake/FaultlineTesting.cmake), and those tests
#      under ThreadSanitizer;
#   3. the fuzzers once they exist (scripts/fuzz.sh), what they find replayed
#      with build-asan/'s programs.
# No unsanitized tree is tested here: each tree is a full compile (~6 minutes
# on this kind of 2-core host), and an unsanitized tree plus a second
# AddressSanitizer run of the `sanitizers` tests made CI take ~35 minutes. The
# unsanitized -O2 tree is what `scripts/test.sh plain` tests, and what the
# demo and the benchmarks build.
#
# Each ctest stage ends with its test count and every skipped test with its
# reason. With CI=true (.ci/run sets it) a missing host capability fails its
# test (tests/capability.h), and a stage in which any test skipped fails,
# except for tests of a capability waived by name in FAULTLINE_CI_WAIVE.
#
#   scripts/test.sh         everything CI runs
#   scripts/test.sh plain   the whole suite in the unsanitized -O2 tree build/, nothing else
#   scripts/test.sh build   only configure (options checked) and build build/
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-ci}
case "$mode" in
  ci | plain | build) ;;
  *)
    echo "usage: scripts/test.sh [plain | build]" >&2
    exit 2
    ;;
esac
scripts/install-deps.sh
ci=false
case "${CI:-}" in true | 1) ci=true ;; esac
[ -n "${FAULTLINE_CI_WAIVE:-}" ] && echo "== FAULTLINE_CI_WAIVE=$FAULTLINE_CI_WAIVE: tests needing these capabilities skip when they are missing"

stage() { echo "== $1 (after ${SECONDS} s)"; }

# configure DIR KEY=VALUE...: configures DIR giving every option that decides
# which tests exist explicitly. A -D overrides what the cache held, so a tree
# once configured as Release, without test hooks, with a narrow
# FAULTLINE_ONLY_DIRS or with a sanitizer cannot drop tests; then the cache
# is checked to hold exactly these values.
configure() {
  local dir=$1 kv key want got
  shift
  local args=()
  for kv in "$@"; do args+=("-D$kv"); done
  cmake -S . -B "$dir" "${args[@]}" >/dev/null
  for kv in "$@"; do
    key=${kv%%=*}
    want=${kv#*=}
    got=$(sed -n "s/^${key}:[A-Z]*=//p" "$dir/CMakeCache.txt")
    if [ "$got" != "$want" ]; then
      echo "$dir/CMakeCache.txt holds $key='$got', not '$want'" >&2
      exit 1
    fi
  done
  echo "configured $dir: $*"
}
# What a test build must have, whatever the build directory held before.
test_options=(FAULTLINE_ONLY_DIRS= FAULTLINE_TEST_HOOKS=ON CMAKE_CXX_FLAGS= CMAKE_C_FLAGS=)

# run_ctest NAME DIR CTEST_ARGS...: every ctest run fails when its filter
# matches nothing (--no-tests=error), writes a JUnit report, and ends with
# the summary of skipped tests (scripts/ctest_summary.awk).
run_ctest() {
  local name=$1 dir=$2 rc=0
  shift 2
  local junit="$PWD/$dir/ctest-$name.xml"
  rm -f "$junit"
  ctest --test-dir "$dir" --output-on-failure --no-tests=error --output-junit "$junit" "$@" || rc=$?
  if [ ! -f "$junit" ]; then
    echo "== $name: ctest wrote no report ($junit)"
    return 1
  fi
  local summary unwaived
  summary=$(awk -v stage="$name" -f scripts/ctest_summary.awk "$junit")
  printf '%s\n' "${summary%UNWAIVED_SKIPS *}" | sed '/^$/d'
  unwaived=${summary##*UNWAIVED_SKIPS }
  if [ "$ci" = true ] && [ "$unwaived" -ne 0 ]; then
    echo "== $name: CI=true and $unwaived tests skipped without a waiver: coverage would silently disappear" >&2
    rc=1
  fi
  return $rc
}

# The unsanitized tree: -O2 as a release build, but -g1 (line tables only, as
# the sanitizer trees): a failure's backtrace keeps file:line, and the compile
# is about a third shorter (measured: tests/s3_test.cc 13.6 s against 20.5 s with -g).
if [ "$mode" != ci ]; then
  stage "build (RelWithDebInfo -O2 -g1, every directory, test hooks on)"
  configure build CMAKE_BUILD_TYPE=RelWithDebInfo "CMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
    "CMAKE_C_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" FAULTLINE_SANITIZER= "${test_options[@]}"
  cmake --build build -j"$(nproc)"
  echo "$(ctest --test-dir build -N | tail -1 | sed 's/^ *//') registered in build/"
  [ "$mode" = build ] && exit 0
  stage "test (RelWithDebInfo -O2 -g1)"
  run_ctest all build -j2 --timeout 600
  echo "== all stages passed in ${SECONDS} s"
  exit 0
fi

# -O1 -g1 (line tables only): sanitizer reports keep file:line, and each build
# compiles in ~2 minutes instead of ~3 on 2 cores (measured: 126 s against 191 s
# for the TSan targets; their tests ran 158 s against 150 s).
#
# The ThreadSanitizer tree is compiled while the stage before it runs its tests, at
# the lowest CPU priority (nice 19): tests spend much of their time waiting
# (on gates, faults, sessions ending, the hugepages lock) and keep priority
# over the compiler whenever they run. The build is its own process group, so
# that it is stopped if this script stops early.
configure_sanitized() {  # $1 = build dir, $2 = FAULTLINE_SANITIZER
  configure "$1" CMAKE_BUILD_TYPE=RelWithDebInfo "CMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1" \
    "CMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -g1" FAULTLINE_SANITIZER="$2" "${test_options[@]}"
}
background_build=""
start_sanitizer_build() {  # $1 = sanitizer, $2 = build dir
  configure_sanitized "$2" "$1"
  # Every program registered with SANITIZERS YES, and the programs they spawn.
  setsid nice -n 19 cmake --build "$2" -j"$(nproc)" --target sanitizer-test-programs >"$2/build.log" 2>&1 &
  background_build=$!
  echo "building $2 in the background (log: $2/build.log)"
}
finish_sanitizer_build() {  # $1 = build dir
  local rc=0
  wait "$background_build" || rc=$?
  background_build=""
  if [ "$rc" -ne 0 ]; then
    tail -50 "$1/build.log"
    echo "== building $1 failed (after ${SECONDS} s)" >&2
    exit 1
  fi
  echo "$1 built (after ${SECONDS} s)"
}
# The AFL++ targets (~170 s of compiling on 2 cores) build in the same way
# while the ThreadSanitizer stage runs its tests. Whether that build failed
# does not matter here: scripts/fuzz.sh builds again (nothing left to do when
# it succeeded) and reports a failure itself.
fuzz_build=""
start_fuzz_build() {
  [ -f scripts/fuzz.sh ] || return 0
  mkdir -p build-fuzz
  setsid nice -n 19 env FUZZ_BUILD_ONLY=1 bash scripts/fuzz.sh >build-fuzz/background-build.log 2>&1 &
  fuzz_build=$!
  echo "building the AFL++ targets in the background (log: build-fuzz/background-build.log)"
}
finish_fuzz_build() {
  [ -n "$fuzz_build" ] || return 0
  wait "$fuzz_build" || true
  fuzz_build=""
  echo "background build of the AFL++ targets ended (after ${SECONDS} s)"
}
stop_background_build() {
  if [ -n "$background_build" ]; then kill -- "-$background_build" 2>/dev/null || true; fi
  if [ -n "$fuzz_build" ]; then kill -- "-$fuzz_build" 2>/dev/null || true; fi
}
trap stop_background_build EXIT

# The whole suite, AddressSanitizer and UBSan on: -O1 -g1 as the ThreadSanitizer
# tree. Undefined behaviour aborts (cmake: -fno-sanitize-recover=undefined).
# Leak detection is on by default on x86-64 (a program may turn it off in its
# __asan_default_options, as events_test does; an ASAN_OPTIONS here would
# override that).
stage "build with AddressSanitizer and UBSan (RelWithDebInfo -O1 -g1, every directory, test hooks on)"
configure_sanitized build-asan address,undefined
cmake --build build-asan -j"$(nproc)"
echo "$(ctest --test-dir build-asan -N | tail -1 | sed 's/^ *//') registered in build-asan/"

start_sanitizer_build thread build-tsan
stage "test (every test, AddressSanitizer and UBSan)"
UBSAN_OPTIONS="print_stacktrace=1" run_ctest asan build-asan -j2 --timeout 900

stage "ThreadSanitizer"
finish_sanitizer_build build-tsan
start_fuzz_build
# Every program of this tree also runs with no_huge_pages_for_shadow=0, its
# own default (cmake/tsan_default_options.cc): ThreadSanitizer's runtime
# madvises its shadow memory MADV_NOHUGEPAGE otherwise, so every 4 KiB of
# shadow a test first touches costs a read fault on the zero page, then a
# write fault that copies it and flushes the TLB of every CPU the process
# runs on (~12 µs a fault here; perf of the slowest tests put more than half
# their time there). With it, one fault per 2 MiB. Measured on the 602 tests,
# alone on an idle 2-core host: 373 s against 714 s (666 against 1271
# test-seconds); peak RSS of a test up to ~2x (the 500-thread race test:
# 1.7 GB). AddressSanitizer's shadow is an eighth of the memory instead of 4x,
# and the same flag there made no test faster.
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
  run_ctest tsan build-tsan -j2 --timeout 900 -L '^sanitizers$'

# ---- fuzzing: a bounded run of every fuzz target (fuzz/, scripts/fuzz.sh).
# Runs once scripts/fuzz.sh exists; it fails this command on a crash.
# 20 s per target; what AFL++ finds is replayed under AddressSanitizer and
# UBSan with the replay programs build-asan/ already has (both ctest stages
# replay the committed seeds and crash inputs too). Longer runs: docs/fuzzing.md.
if [ -f scripts/fuzz.sh ]; then
  stage "fuzzing (scripts/fuzz.sh)"
  finish_fuzz_build
  FUZZ_REPLAY_BUILD=build-asan bash scripts/fuzz.sh 20
fi
# ---- end of fuzzing

echo "== all stages passed in ${SECONDS} s"
