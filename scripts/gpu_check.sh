#!/usr/bin/env bash
# On a GPU machine, in one call: build for sm_90, run the GPU parity tests, the whole ctest suite,
# the CUDA benchmark (our pass in fp32 and bf16 next to cuBLAS), a profile of the tensor-core
# kernel (ncu, where it can read counters) and the PyTorch comparison. Logs go to $OUT when set
# (the device tool's output folder; at most six files there), else to build-gpu/.
#   scripts/gpu_check.sh [--quick]     --quick: skip the full ctest suite
#   HYSPARSE_BENCH_ARGS="--seq-lens 8192,32768" scripts/gpu_check.sh   (benchmark options)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-build-gpu}
mkdir -p "$LOG" build-gpu
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
BUILD_LOG="$LOG/build.log"
STEP=${HYSPARSE_STEP_LIMIT:-300}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$BUILD_LOG" || true
echo "== configure" >> "$BUILD_LOG"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DHYSPARSE_CUDA=ON >> "$BUILD_LOG" 2>&1 \
  || { tail -30 "$BUILD_LOG"; exit 1; }
echo "== build" >> "$BUILD_LOG"
if (( QUICK )); then
  cmake --build build-gpu -j"$(nproc)" --target hysparse_cuda_tests hysparse_bench_cuda hysparse >> "$BUILD_LOG" 2>&1 \
    || { grep -E -A5 "error" "$BUILD_LOG" | head -80; exit 1; }
else
  cmake --build build-gpu -j"$(nproc)" >> "$BUILD_LOG" 2>&1 || { grep -E -A5 "error" "$BUILD_LOG" | head -80; exit 1; }
fi
grep -E "warning" "$BUILD_LOG" | head -20
# The tensor-core kernels' machine code (bf16, head_dim 128, block 64): mma.sync (HMMA, ldmatrix
# LDSM) and wgmma (HGMMA), exp2 (MUFU), and no local memory (LDL/STL).
if command -v cuobjdump > /dev/null; then
  for kernel in mma wgmma; do
    if [[ $kernel == mma ]]; then
      object=$(find build-gpu -name 'tensor_core_statistics.cu.o' | head -1); pattern='ILb0ELi8ELi8ELi1EE'
    else
      object=$(find build-gpu -name 'wgmma_statistics.cu.o' | head -1); pattern='ILb0ELi8ELi8EE'
    fi
    cuobjdump -sass "$object" 2> /dev/null | awk -v p="$pattern" '/Function :/ { f = ($0 ~ p) } f' > "build-gpu/sass_${kernel}_bf16_d128_b64.txt"
    { echo "== SASS of the $kernel kernel (bf16, head_dim 128, block 64): instruction counts";
      for op in HMMA HGMMA LDSM LDGSTS MUFU.EX2 SHFL FMNMX LDL STL; do
        printf '%-9s %s\n' "$op" "$(grep -c "$op" "build-gpu/sass_${kernel}_bf16_d128_b64.txt")"; done; } | tee -a "$BUILD_LOG"
  done
fi

echo "== GPU parity tests"
# Every step has a time limit (HYSPARSE_STEP_LIMIT seconds), so a hung kernel cannot eat the whole call.
timeout "$STEP" build-gpu/tests/hysparse_cuda_tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -25

if (( ! QUICK )); then
  echo "== ctest (everything)"
  (cd build-gpu && ctest -j"$(nproc)" --timeout 600 --output-on-failure > "$LOG/ctest.log" 2>&1; tail -15 "$LOG/ctest.log")
fi

echo "== CUDA benchmark"
timeout "$STEP" build-gpu/tests/hysparse_bench_cuda ${HYSPARSE_BENCH_ARGS:-} 2>&1 | tee "$LOG/bench_cuda.log"

if command -v ncu > /dev/null; then
  # One ncu run per tensor-core kernel (HYSPARSE_PROFILE_KERNELS, --tc-kernels names), each on the
  # timed launch of one bf16 pass of one KV group at T=32K (the warm-up launch skipped).
  metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,\
smsp__inst_executed.avg.per_cycle_active,\
sm__warps_active.avg.pct_of_peak_sustained_active,\
regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio
  : > "$LOG/ncu.log"
  for kernel in ${HYSPARSE_PROFILE_KERNELS:-auto mma}; do
    echo "== profile: $kernel, one bf16 pass of one KV group at T=32K (ncu, clocks as found)" | tee -a "$LOG/ncu.log"
    timeout "$STEP" ncu --clock-control none --kernel-name "regex:wgmma_statistics|tensor_core_statistics" \
        --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --metrics "$metrics" \
        build-gpu/tests/hysparse_bench_cuda --profile --seq-lens 32768 --tc-kernels "$kernel" > "$LOG/ncu_one.log" 2>&1
    cat "$LOG/ncu_one.log" >> "$LOG/ncu.log"
    grep -E "statistics_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|pct_of_peak|per_cycle_active|L2 Hit|No Eligible|issue_stalled" "$LOG/ncu_one.log" | awk '!/issue_stalled/ || $NF + 0 >= 0.05' | head -45
  done
  rm -f "$LOG/ncu_one.log"
else
  echo "ncu not found: no profile"
fi

echo "== PyTorch comparison"
PYTHONUNBUFFERED=1 timeout "$STEP" python3 scripts/bench_torch_stats.py --ours-log "$LOG/bench_cuda.log" 2>&1 | tee "$LOG/torch.log"
