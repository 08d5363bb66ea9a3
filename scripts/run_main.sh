#!/usr/bin/env bash
# The main job on the embedded default data: synth -> inspect -> replay -> report -> figures, then a sweep.
# Idempotent: the build and the default capture are reused when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HYSPARSE=${HYSPARSE_BUILD_DIR:-build}/src/cli/hysparse
OUT=${HYSPARSE_OUT:-out}
mkdir -p "$OUT" data

# The default capture: small enough for a laptop, with every structure the synth can make.
SYNTH_ARGS=(--layers 8 --q-heads 8 --kv-heads 2 --head-dim 64 --seq-len 2048 --seed 7)
CAPTURE=data/default_capture.h5
STAMP=data/default_capture.args
if [[ ! -f $CAPTURE || ! -f $STAMP || "$(cat $STAMP)" != "${SYNTH_ARGS[*]}" ]]; then
  "$HYSPARSE" synth -o "$CAPTURE" "${SYNTH_ARGS[@]}"
  echo "${SYNTH_ARGS[*]}" > "$STAMP"
fi
"$HYSPARSE" inspect "$CAPTURE" --header-only

"$HYSPARSE" replay "$CAPTURE" -o "$OUT/report.h5" \
  --budget 128,256,512,1024 \
  --selectors oracle,oracle:group=sum,swa,swa:window=128,hysparse \
  --schedule FSSS --reuse-budget 256 -q

bash scripts/python.sh -m analysis "$OUT/report.h5" --out "$OUT/figures"

# A small sweep of the same capture: 4 selectors x 2 block sizes x 4 sparsities, one statistics pass.
"$HYSPARSE" sweep "$CAPTURE" -o "$OUT/sweep.h5" \
  --sparsity 0.5,0.75,0.875,0.9375 --selectors oracle,swa,hysparse,quest --block 32,64 --schedule FSSS -q
bash scripts/python.sh -m analysis "$OUT/sweep.h5" --out "$OUT/sweep_figures"
echo "main: report $OUT/report.h5 (figures and summary in $OUT/figures/), sweep $OUT/sweep.h5 (in $OUT/sweep_figures/)"
