#!/usr/bin/env bash
# Installs the Debian 12 packages faultline builds and tests with.
# Idempotent: installs only what is missing, and touches apt only then.
set -euo pipefail
packages=(g++ cmake make pkg-config zlib1g-dev libgtest-dev libgmock-dev nlohmann-json3-dev libcli11-dev libbenchmark-dev
          libcpp-httplib-dev gnuplot-nox libzstd-dev libssl-dev
          python3  # python3: faultline-bench's realistic corpus (bench/corpus.h) runs Debian's interpreter
          afl++)  # afl++: scripts/fuzz.sh
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
