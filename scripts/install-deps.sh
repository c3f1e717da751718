#!/usr/bin/env bash
# Installs the Debian 12 packages faultline builds and tests with.
# Idempotent: installs only what is missing, and touches apt only then.
set -euo pipefail
packages=(g++ cmake make pkg-config zlib1g-dev libgtest-dev libgmock-dev nlohmann-json3-dev libcli11-dev libbenchmark-dev
          libcpp-httplib-dev gnuplot-nox libzstd-dev libxxhash-dev libssl-dev
          python3  # python3: faultline-bench's realistic corpus (bench/corpus.h) runs Debian's interpreter
          libcurl4-openssl-dev curl  # the S3 client (src/objstore), and scripts/rgw.sh's readiness probe
          afl++)  # afl++: scripts/fuzz.sh
# scripts/rgw.sh: the real S3 store (Ceph's RADOS Gateway) the object-store
# tests run against; without recommends (~21 s, 263 MB: ../shared/STORAGE.md).
bare_packages=(ceph-mon ceph-osd radosgw ceph-common)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
missing_bare=()
for p in "${bare_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_bare+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_bare[@]} -gt 0 ]; then
  echo "installing: ${missing[*]} ${missing_bare[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq "${missing[@]}" >/dev/null
  [ ${#missing_bare[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing_bare[@]}" >/dev/null
fi
