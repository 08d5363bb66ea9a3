#!/usr/bin/env bash
# Sweep cost scaling: a 1-point sweep, a 100-point sweep (20 selector instances x 5 budgets) on
# the same capture, and the same 20 instances run one at a time (what 20 separate replays cost).
# The exact statistics are computed once per (layer, KV group, query tile) and shared by every
# point of a sweep, so the 100-point sweep costs far less than its instances run apart.
#
# usage: scripts/bench_sweep.sh [HYSPARSE_BINARY] [WORKDIR]
# env:   BENCH_SEQ_LEN (default 2048), BENCH_LAYERS (4), BENCH_THREADS (all cores),
#        BENCH_SWEEP_ARGS (added to every run, e.g. --no-output-error)
set -euo pipefail
cd "$(dirname "$0")/.."
HYSPARSE=${1:-build/src/cli/hysparse}
WORK=${2:-build/bench_sweep}
T=${BENCH_SEQ_LEN:-2048}
LAYERS=${BENCH_LAYERS:-4}
THREADS=${BENCH_THREADS:-$(nproc)}
PYTHON="bash scripts/python.sh"
read -r -a EXTRA <<< "${BENCH_SWEEP_ARGS:-}"
mkdir -p "$WORK"

"$HYSPARSE" synth -o "$WORK/capture.h5" --layers "$LAYERS" --seq-len "$T" --q-heads 8 --kv-heads 2 --head-dim 128 --seed 7 > /dev/null
BUDGETS=(--sparsity 0.5,0.75,0.875,0.9375,0.96875)
# 20 block-level instances: oracle (per head) and oracle:group=max x block x window (4 each), hysparse x block x
# window x schedule (8), quest x block x window (4). Token-level selectors (h2o, snapkv, ...) bring their own
# O(T^2 d) per-layer work and a statistics pass at block 1; README, Performance, gives their cost apart.
AXES=(--selectors oracle,oracle:group=max,hysparse,quest --block 32,64 --window 0,128 --schedule 1:3 --schedule 1:7)

# Arithmetic with awk: bc is not on every machine.
calc() { awk "BEGIN { printf \"%.4f\", $1 }"; }
seconds() { local start=$(date +%s.%N); "$@" "${EXTRA[@]}" > /dev/null; calc "$(date +%s.%N) - $start"; }

one=$(seconds "$HYSPARSE" sweep "$WORK/capture.h5" -o "$WORK/one.h5" --sparsity 0.9 --selectors oracle --threads "$THREADS" -q)
hundred=$(seconds "$HYSPARSE" sweep "$WORK/capture.h5" -o "$WORK/hundred.h5" "${BUDGETS[@]}" "${AXES[@]}" --threads "$THREADS" -q)
points=$($PYTHON -c "import h5py; f=h5py.File('$WORK/hundred.h5','r'); print(int((f['sweep/points/capture'][...] >= 0).sum()))")
mapfile -t specs < <($PYTHON -c "
import h5py
f = h5py.File('$WORK/hundred.h5', 'r')
seen = []
for spec, capture in zip(f['sweep/points/spec'][...], f['sweep/points/capture'][...]):
    spec = spec.decode()
    if capture == 0 and spec not in seen:
        seen.append(spec)
print('\n'.join(seen))")
apart=0
for spec in "${specs[@]}"; do
  s=$(seconds "$HYSPARSE" sweep "$WORK/capture.h5" -o "$WORK/alone.h5" "${BUDGETS[@]}" --selectors "$spec" --threads "$THREADS" -q)
  apart=$(calc "$apart + $s")
done

echo "sweep cost scaling ($(uname -m), $(nproc) cores, $THREADS threads; capture: $LAYERS layers x 8 q heads (2 kv), head_dim 128, T = $T; extra: ${BENCH_SWEEP_ARGS:-none})"
printf "  %-44s %10s\n" "run" "seconds"
printf "  %-44s %10.2f\n" "1-point sweep (oracle, sparsity 0.9)" "$one"
printf "  %-44s %10.2f\n" "$points-point sweep (${#specs[@]} instances x 5 budgets)" "$hundred"
printf "  %-44s %10.2f\n" "the same ${#specs[@]} instances run one at a time" "$apart"
printf "  %-44s %10.1fx\n" "one sweep vs separate runs" "$(calc "$apart / $hundred")"
printf "  %-44s %10.1fx\n" "$points-point sweep vs 1-point sweep" "$(calc "$hundred / $one")"
