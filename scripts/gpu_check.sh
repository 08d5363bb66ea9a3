#!/usr/bin/env bash
# On a GPU machine: build for sm_90, run every test (the GPU parity tests included) and the GPU
# benchmark. Logs go to $OUT when set (the device tool's output folder), else to build-gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-build-gpu}
mkdir -p "$LOG" build-gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DHYSPARSE_CUDA=ON > "$LOG/configure.log" 2>&1 \
  || { tail -30 "$LOG/configure.log"; exit 1; }
cmake --build build-gpu -j"$(nproc)" > "$LOG/build.log" 2>&1 || { grep -E -A5 "error" "$LOG/build.log" | head -80; exit 1; }
grep -E "warning" "$LOG/build.log" | head -20
build-gpu/tests/hysparse_cuda_tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -25
(cd build-gpu && ctest -j"$(nproc)" --output-on-failure > "$LOG/ctest.log" 2>&1; tail -15 "$LOG/ctest.log")
build-gpu/tests/hysparse_bench_cuda ${HYSPARSE_BENCH_ARGS:-} 2>&1 | tee "$LOG/bench_cuda.log"
