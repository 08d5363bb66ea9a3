#!/usr/bin/env bash
# The same capture, options and seed give the same report numbers, bit for bit: at 1 and 2 OpenMP
# threads, and from one run to the next. Every selector runs (--selectors all), on random query rows
# (--queries random:N with a fixed --seed), so thread scheduling, calibration and seeded sampling are
# all covered. Only the run's own provenance attributes (time, thread count, command line) may differ.
# usage: test_determinism.sh HYSPARSE WORKDIR REPO_ROOT
set -u
HYSPARSE=$1
WORK=$2
ROOT=$3
rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/lib.sh"
COMPARE=(bash "$ROOT/scripts/python.sh" "$(dirname "$0")/compare_reports.py")
SEED=11
echo "determinism: capture seed 5, replay seed $SEED"

"$HYSPARSE" synth -o "$WORK/capture.h5" --layers 4 --seq-len 384 --head-dim 32 --q-heads 4 --kv-heads 2 --seed 5 > /dev/null
replay() {  # replay THREADS OUTPUT
  "$HYSPARSE" replay "$WORK/capture.h5" -o "$2" --threads "$1" --selectors all --budget 32,64,128 --block 16 \
      --queries random:96 --seed "$SEED" --reuse-budget 64 -q > /dev/null
}
expect replay-1-thread 0 '' -- replay 1 "$WORK/t1.h5"
expect replay-2-threads 0 '' -- replay 2 "$WORK/t2.h5"
expect replay-2-threads-again 0 '' -- replay 2 "$WORK/t2-again.h5"
expect same-numbers-1-vs-2-threads 0 ', 0 differences' -- "${COMPARE[@]}" "$WORK/t1.h5" "$WORK/t2.h5"
expect same-numbers-run-to-run 0 ', 0 differences' -- "${COMPARE[@]}" "$WORK/t2.h5" "$WORK/t2-again.h5"
# A different seed picks other rows, and the comparison sees it.
for seed in 11 12; do
  "$HYSPARSE" replay "$WORK/capture.h5" -o "$WORK/seed$seed.h5" --selectors oracle --budget 32 --block 16 \
      --queries random:96 --seed "$seed" -q > /dev/null
done
expect seed-changes-the-rows 1 'dataset axes/query_position differs' -- "${COMPARE[@]}" "$WORK/seed11.h5" "$WORK/seed12.h5"
# The comparison can fail: one metric value moved by one ulp is reported.
cp "$WORK/t2.h5" "$WORK/perturbed.h5"
bash "$ROOT/scripts/python.sh" - "$WORK/perturbed.h5" <<'PY'
import sys, h5py, numpy as np
with h5py.File(sys.argv[1], "r+") as f:
    d = f["selectors/oracle/mass_recall_mean"]
    x = d[...]
    x.flat[0] = np.nextafter(x.flat[0], np.inf)
    d[...] = x
PY
expect comparison-detects-one-ulp 1 'dataset selectors/oracle/mass_recall_mean differs' -- "${COMPARE[@]}" "$WORK/t2.h5" "$WORK/perturbed.h5"

# Input digests: the second replay of an unchanged capture takes its sha256 from the digest cache
# (common/digest_cache.hpp), says so, and gives the same digest as sha256sum; a rewritten capture
# (same bytes, new times) is hashed again.
export HYSPARSE_SHA256_CACHE="$WORK/sha256-cache"
"$HYSPARSE" synth -o "$WORK/digest.h5" --layers 1 --seq-len 64 --head-dim 16 --q-heads 2 --kv-heads 1 > /dev/null
sleep 1.2  # older than kDigestCacheSettleSeconds, or it is never recorded
digest_of() {  # digest_of REPORT: "SHA SOURCE"
  bash "$ROOT/scripts/python.sh" - "$1" <<'PY'
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    s = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    print(s(f.attrs["input_sha256"][0]), s(f.attrs["input_sha256_source"][0]))
PY
}
expected=$(sha256sum "$WORK/digest.h5" | cut -d' ' -f1)
for run in 1 2; do
  "$HYSPARSE" replay "$WORK/digest.h5" -o "$WORK/digest$run.h5" --selectors oracle --budget 16 --block 16 -q > /dev/null
done
cp -p "$WORK/digest.h5" "$WORK/digest.copy" && cat "$WORK/digest.copy" > "$WORK/digest.h5"
"$HYSPARSE" replay "$WORK/digest.h5" -o "$WORK/digest3.h5" --selectors oracle --budget 16 --block 16 -q > /dev/null
# Trusted filesystems only (digest_cache_covers); elsewhere every run hashes.
case $(stat -f -c %T "$WORK") in
  ext2/ext3|xfs|btrfs|tmpfs|overlayfs|zfs|f2fs) second=cache ;;
  *) second=computed; echo "determinism: $(stat -f -c %T "$WORK") is not a filesystem the digest cache trusts" ;;
esac
expect digest-first-run-computed 0 "^$expected computed\$" -- digest_of "$WORK/digest1.h5"
expect digest-second-run-from-cache 0 "^$expected $second\$" -- digest_of "$WORK/digest2.h5"
expect digest-rewritten-file-computed 0 "^$expected computed\$" -- digest_of "$WORK/digest3.h5"
unset HYSPARSE_SHA256_CACHE

echo "determinism tests: $pass passed, $failures failed"
[[ $failures -eq 0 ]]
