#!/usr/bin/env bash
# Builds faultline into build/ (or $BUILD_DIR) with the given CMake options.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" "$@" >/dev/null
# BUILD_TARGETS: build only these targets (default: everything).
cmake --build "$build_dir" -j"$(nproc)" ${BUILD_TARGETS:+--target $BUILD_TARGETS}
