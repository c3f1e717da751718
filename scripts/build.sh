#!/usr/bin/env bash
# Builds faultline into build/ (or $BUILD_DIR) with the given CMake options.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
