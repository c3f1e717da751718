#!/usr/bin/env bash
# Installs, builds and runs every test: the whole suite in a normal build,
# then the concurrency tests again under ThreadSanitizer and AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== build and test (RelWithDebInfo)"
BUILD_DIR=build scripts/build.sh -DCMAKE_BUILD_TYPE=RelWithDebInfo
ctest --test-dir build -j2 --output-on-failure --timeout 600

# The sanitizer runs cover the concurrent parts: the server's sessions and
# fence, the page-state table, the protocol, and the end-to-end tests.
concurrency_tests='(Serve|SessionEnd|PageStateTable|ReceiveHandshake|BadInput|BadLayout|Race|Stress|Events|HugePages)'
echo "== ThreadSanitizer"
BUILD_DIR=build-tsan scripts/build.sh -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFAULTLINE_SANITIZER=thread
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
  ctest --test-dir build-tsan -j2 --output-on-failure --timeout 900 -R "$concurrency_tests"
echo "== AddressSanitizer"
BUILD_DIR=build-asan scripts/build.sh -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFAULTLINE_SANITIZER=address
ASAN_OPTIONS="detect_leaks=1" \
  ctest --test-dir build-asan -j2 --output-on-failure --timeout 900 -R "$concurrency_tests"
