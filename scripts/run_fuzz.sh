#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang, ASan and UBSan in their own build directory
# and runs each for a bounded time; any crash, sanitizer report, leak, timeout or out-of-memory fails
# the script and leaves the input under build-fuzz/artifacts/. CI runs it after the sanitized tests.
#
# usage: scripts/run_fuzz.sh [SECONDS_PER_TARGET]     (default 30; CI: the default)
#   HYSPARSE_FUZZ_SEED=N      libFuzzer's seed (default 20261128; printed), for a reproducible run
#   HYSPARSE_FUZZ_BUILD_DIR   build directory (default build-fuzz)
#
# Each mutating target starts from its seed corpus (tests/fuzz/corpus/<target>, which also holds the
# inputs of every finding fixed so far) and grows a working corpus in build-fuzz/corpus/<target>, kept
# between local runs. fuzz_capture_raw feeds raw bytes to libhdf5, whose own parser has known memory
# errors on corrupted files (see the README, "Fuzzing"): here it runs over its seed corpus only.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-30}
SEED=${HYSPARSE_FUZZ_SEED:-20261128}
BUILD_DIR=${HYSPARSE_FUZZ_BUILD_DIR:-build-fuzz}
if ! [[ $SECONDS_PER_TARGET =~ ^[1-9][0-9]*$ ]]; then
  echo "run_fuzz: SECONDS_PER_TARGET '$SECONDS_PER_TARGET': expected a positive integer" >&2
  exit 2
fi
started=$(date +%s)

# The project's own packages and build first (as for every other script), then clang with libFuzzer.
bash scripts/setup.sh
FUZZ_PACKAGES=(clang libclang-rt-dev libomp-dev)
if command -v dpkg-query >/dev/null && [[ "${HYSPARSE_SKIP_PACKAGES:-0}" != 1 ]]; then
  missing=()
  for p in "${FUZZ_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]]; then
      echo "run_fuzz: installing ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "run_fuzz: missing packages. Run:" >&2
      echo "  sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
fi
command -v clang++ >/dev/null || { echo "run_fuzz: clang++ not found (apt-get install clang)" >&2; exit 1; }

if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  # -O1 -g: the usual level for fuzzing (a third faster to build than -O2 and as fast here, where libhdf5
  # dominates), symbolized reports, assertions on.
  CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" -DHYSPARSE_FUZZ=ON \
      -DHYSPARSE_CUDA=OFF -DHYSPARSE_BUILD_BENCHMARKS=OFF > /dev/null
fi
if ! cmake --build "$BUILD_DIR" -j"$(nproc)" --target hysparse_fuzz_targets > "$BUILD_DIR/build.log" 2>&1; then
  grep -E -B2 -A6 "error" "$BUILD_DIR/build.log" | head -60 >&2
  echo "run_fuzz: build failed (full log: $BUILD_DIR/build.log)" >&2
  exit 1
fi
if grep -E "warning:" "$BUILD_DIR/build.log"; then
  echo "run_fuzz: the fuzz build has warnings" >&2
  exit 1
fi
built=$(date +%s)
echo "run_fuzz: built in $((built - started)) s; seed $SEED, $SECONDS_PER_TARGET s per target"

SCRATCH=$(mktemp -d -p /dev/shm hysparse-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export HYSPARSE_FUZZ_SCRATCH=$SCRATCH
mkdir -p "$BUILD_DIR/artifacts" "$BUILD_DIR/logs"
failed=()

# run_target TARGET [libFuzzer options...]: prints executions and rate; records a failure.
run_target() {
  local target=$1
  shift
  local binary="$BUILD_DIR/tests/fuzz/$target" log="$BUILD_DIR/logs/$target.log"
  local status=0
  "$binary" -seed="$SEED" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$BUILD_DIR/artifacts/$target-" "$@" > "$log" 2>&1 || status=$?
  local runs rate
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  if [[ $status -ne 0 ]]; then
    failed+=("$target")
    echo "FAIL $target (exit $status): $(grep -m1 -E 'FUZZ FINDING|ERROR:|runtime error|SUMMARY' "$log" || echo 'see log')"
    echo "     log: $log; input: $(ls -t "$BUILD_DIR/artifacts/$target-"* 2>/dev/null | head -1)"
  else
    printf 'ok   %-26s %10s executions %8s exec/s\n' "$target" "${runs:-?}" "${rate:-?}"
  fi
}

for target in fuzz_capture_structured fuzz_replay_options fuzz_kv_specs fuzz_hf_config; do
  corpus="$BUILD_DIR/corpus/$target"
  mkdir -p "$corpus"
  run_target "$target" -max_total_time="$SECONDS_PER_TARGET" "$corpus" "tests/fuzz/corpus/${target#fuzz_}"
done
# Bytes straight into libhdf5: the seed corpus (valid, damaged and truncated captures) only.
run_target fuzz_capture_raw -runs=0 tests/fuzz/corpus/capture_raw

echo "run_fuzz: $(( $(date +%s) - started )) s in all (build $((built - started)) s)"
if (( ${#failed[@]} )); then
  echo "run_fuzz: findings in ${failed[*]}; reproduce with: $BUILD_DIR/tests/fuzz/TARGET INPUT" >&2
  exit 1
fi
