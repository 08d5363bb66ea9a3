#!/usr/bin/env bash
# End-to-end replay benchmark: a synthetic capture (default 32 layers, 32 query heads, 8 KV heads,
# head_dim 128, 32K tokens, bf16 on disk) replayed with oracle, swa and hysparse at 6 budgets on each
# device given, with the wall time and, on CUDA, the peak device memory (nvidia-smi, sampled every
# 0.2 s). The reports of every device are compared number by number (scripts/python.sh + h5py), naming
# the dataset with the largest difference; each run's summary and per-layer progress go to WORK/e2e_DEVICE.txt.
#
# usage: scripts/bench_e2e.sh HYSPARSE_BINARY WORKDIR DEVICE [DEVICE...]     e.g. ... cpu cuda
# env:   E2E_LAYERS (32), E2E_SEQ_LEN (32768), E2E_QUERIES (last:4096), E2E_REPLAY_ARGS (extra options)
set -euo pipefail
cd "$(dirname "$0")/.."
HYSPARSE=$1
WORK=$2
shift 2
LAYERS=${E2E_LAYERS:-32}
T=${E2E_SEQ_LEN:-32768}
QUERIES=${E2E_QUERIES:-last:4096}
read -r -a EXTRA <<< "${E2E_REPLAY_ARGS:-}"
mkdir -p "$WORK"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }  # bc may be absent

CAPTURE="$WORK/e2e_${LAYERS}x32x${T}.h5"
if [[ ! -f $CAPTURE ]]; then
  start=$(date +%s.%N)
  "$HYSPARSE" synth -o "$CAPTURE" --layers "$LAYERS" --q-heads 32 --kv-heads 8 --head-dim 128 --seq-len "$T" \
    --dtype bfloat16 --seed 5 > /dev/null
  echo "synth: $(elapsed "$start") s, $(du -h "$CAPTURE" | cut -f1)"
fi

first=""
for device in "$@"; do
  report="$WORK/e2e_${device//[:,]/_}.h5"
  peak_file="$WORK/peak_${device//[:,]/_}.txt"
  echo 0 > "$peak_file"
  sampler=""
  if [[ $device == cuda* ]] && command -v nvidia-smi > /dev/null; then
    (peak=0; while true; do
       used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | sort -n | tail -1)
       (( used > peak )) && { peak=$used; echo "$peak" > "$peak_file"; }
       sleep 0.2
     done) &
    sampler=$!
  fi
  start=$(date +%s.%N)
  "$HYSPARSE" replay "$CAPTURE" -o "$report" --device "$device" --selectors oracle,swa,hysparse \
    --budget 256,512,1024,2048,4096,8192 --queries "$QUERIES" --reuse-budget 0 "${EXTRA[@]}" > "$WORK/e2e_${device//[:,]/_}.txt" 2>&1
  seconds=$(elapsed "$start")
  [[ -n $sampler ]] && kill "$sampler" 2> /dev/null
  printf "e2e: %-14s %8.1f s   peak device memory %s MiB   (%s layers x 32 q heads (8 kv) x %s tokens, queries %s, %s)\n" \
    "$device" "$seconds" "$(cat "$peak_file")" "$LAYERS" "$T" "$QUERIES" "$(nproc) CPU cores"
  if [[ -z $first ]]; then
    first=$report
  else
    bash scripts/python.sh - "$first" "$report" <<'PY'
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r") for p in sys.argv[1:3])
worst = {}  # kind of dataset -> (largest absolute difference, where)
for label in a["selectors"]:
    for name, x in a["selectors"][label].items():
        if isinstance(x, h5py.Dataset) and x.dtype.kind == "f":
            u, v = x[...], b["selectors"][label][name][...]
            m = ~(np.isnan(u) & np.isnan(v))
            if np.any(np.isnan(u[m]) | np.isnan(v[m])):
                print(f"e2e: {label}/{name}: NaN in one report only")
            d = float(np.max(np.abs(u[m] - v[m]), initial=0.0))
            kind = "recall" if "recall" in name or "overlap" in name else "output error" if "output" in name else "other"
            if d >= worst.get(kind, (-1.0, ""))[0]:
                worst[kind] = (d, f"{label}/{name}")
for kind, (d, where) in sorted(worst.items()):
    print(f"e2e: largest difference between the two reports, {kind} datasets: {d:.3g} ({where})")
PY
  fi
done
