#!/usr/bin/env bash
# Builds faultline-bench (Release) and runs the full benchmark; writes
# docs/bench-results.json and docs/bench-chart.png and prints the tables.
# Needs root (userfaultfd for KVM faults, vm.nr_hugepages) and /dev/kvm for
# the vCPU rows. Extra arguments go to faultline-bench (e.g. --scenario 1).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$repo/build-bench}"

# gnuplot draws the chart; installed once (a no-op when already there).
if ! command -v gnuplot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null; } ||
      echo "gnuplot-nox could not be installed: the chart will be skipped" >&2
  fi
fi

# -U FAULTLINE_DIRS: a build dir configured before src/snapshot existed keeps
# the old directory list in its cache and then fails to link.
cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -U FAULTLINE_DIRS >/dev/null
cmake --build "$build" -j"$(nproc)" --target faultline-bench
"$build/bin/faultline-bench" --json "$repo/docs/bench-results.json" --chart "$repo/docs/bench-chart.png" "$@" |
  tee "$build/bench-output.txt"
