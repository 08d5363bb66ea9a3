#!/usr/bin/env bash
# The C++ tests and CLI tests again, built with AddressSanitizer + UndefinedBehaviorSanitizer
# (LeakSanitizer on; any finding fails the run). CI runs this after scripts/run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD_DIR=${HYSPARSE_SANITIZE_BUILD_DIR:-build-sanitize}
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHYSPARSE_SANITIZE=address,undefined \
        -DHYSPARSE_CUDA=OFF -DHYSPARSE_BUILD_BENCHMARKS=OFF >/dev/null
fi
if ! cmake --build "$BUILD_DIR" -j"$(nproc)" > "$BUILD_DIR/build.log" 2>&1; then
  grep -E -B2 -A6 "error" "$BUILD_DIR/build.log" | head -60 >&2
  echo "sanitized build failed (full log: $BUILD_DIR/build.log)" >&2
  exit 1
fi
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$BUILD_DIR"
# The Python suites exercise the same binary through scripts; they run in the main build.
ctest --output-on-failure -j"$(nproc)" -E "^(analysis_tests|analysis_sweep_tests|capture_llama_tests|capture_hf_tests)$"
