#!/usr/bin/env bash
# Every row of the README's "Bad input and faults" table through the real binary: the exit code of its
# class, exactly one line on stderr that names the file and says what is wrong, and no output left
# behind (neither the report nor its temporary file).
# usage: test_bad_input.sh HYSPARSE WORKDIR REPO_ROOT
set -u
HYSPARSE=$1
WORK=$2
ROOT=$3
rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/lib.sh"
PYTHON=(bash "$ROOT/scripts/python.sh")

fail_case() {
  echo "FAIL $1: $2"
  [[ -n ${3:-} ]] && echo "$3" | head -5
  failures=$((failures + 1))
}

# refuses NAME CODE PATTERN NAMED OUTPUT -- command...
# The command must exit with CODE, print nothing on stderr but one line that matches PATTERN and
# contains NAMED (the file the error is about), and leave neither OUTPUT nor OUTPUT.tmp-* behind.
refuses() {
  local name=$1 code=$2 pattern=$3 named=$4 output=$5
  shift 6
  local err rc lines
  "$@" > "$WORK/stdout.txt" 2> "$WORK/stderr.txt"
  rc=$?
  err=$(cat "$WORK/stderr.txt")
  lines=$(wc -l < "$WORK/stderr.txt")
  local left=""
  if [[ -n $output ]] && compgen -G "$output*" > /dev/null; then
    left=$(compgen -G "$output*" | tr '\n' ' ')
    rm -f "$output"*  # so that the next case starts clean
  fi
  if [[ $rc -ne $code ]]; then fail_case "$name" "exit $rc, expected $code" "$err"; return; fi
  if [[ $lines -ne 1 ]]; then fail_case "$name" "stderr has $lines lines, expected 1" "$err"; return; fi
  if ! grep -qE -- "$pattern" <<<"$err"; then fail_case "$name" "stderr lacks /$pattern/" "$err"; return; fi
  if [[ -n $named ]] && ! grep -qF -- "$named" <<<"$err"; then fail_case "$name" "stderr does not name $named" "$err"; return; fi
  if [[ -n $left ]]; then fail_case "$name" "left output behind: $left"; return; fi
  pass=$((pass + 1))
}

REPORT="$WORK/report.h5"
REPLAY=(-q --budget 16,32 --block 16 --selectors oracle,swa,hysparse --queries last:16)
"$HYSPARSE" synth -o "$WORK/valid.h5" --layers 2 --seq-len 64 --head-dim 16 --q-heads 4 --kv-heads 2 > /dev/null
expect baseline-replay 0 'wrote' -- "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" "${REPLAY[@]}"
rm -f "$REPORT"

# ---- malformed captures: exit 3 (input), named file, nothing written ----
head -c 3000 "$WORK/valid.h5" > "$WORK/truncated.h5"
refuses truncated-file 3 'truncated|corrupted' truncated.h5 "$REPORT" -- "$HYSPARSE" replay "$WORK/truncated.h5" -o "$REPORT" "${REPLAY[@]}"
head -c 100 "$WORK/valid.h5" > "$WORK/fragment.h5"
refuses truncated-fragment 3 'truncated|corrupted|not an HDF5' fragment.h5 "$REPORT" -- "$HYSPARSE" replay "$WORK/fragment.h5" -o "$REPORT" "${REPLAY[@]}"
echo "this is not hdf5" > "$WORK/text.h5"
refuses wrong-magic 3 'not an HDF5 file' text.h5 "$REPORT" -- "$HYSPARSE" replay "$WORK/text.h5" -o "$REPORT" "${REPLAY[@]}"
refuses missing-file 3 'cannot open' missing.h5 "$REPORT" -- "$HYSPARSE" replay "$WORK/missing.h5" -o "$REPORT" "${REPLAY[@]}"

if ! "${PYTHON[@]}" "$(dirname "$0")/make_bad_inputs.py" "$WORK/valid.h5" "$WORK/bad" > /dev/null; then
  fail_case make-bad-inputs "could not write the malformed captures (h5py missing?)"
fi
bad_capture() {  # bad_capture NAME PATTERN: replay and inspect both refuse it with exit 3
  local name=$1 pattern=$2
  refuses "$name" 3 "$pattern" "$name.h5" "$REPORT" -- "$HYSPARSE" replay "$WORK/bad/$name.h5" -o "$REPORT" "${REPLAY[@]}"
  refuses "$name-inspect" 3 "$pattern" "$name.h5" "" -- "$HYSPARSE" inspect "$WORK/bad/$name.h5"
}
bad_capture wrong_format "attribute 'format' is \"not-a-hysparse-capture\" \(expected \"hysparse-capture\"\)"
bad_capture wrong_version "attribute 'format_version' is 2 \(expected 1\)"
bad_capture wrong_rank '/layers/0/q: has shape \[256, 16\] \(expected \[4, 64, 16\]'
bad_capture wrong_shape '/layers/1/k: has shape \[2, 63, 16\] \(expected \[2, 64, 16\]'
bad_capture heads_do_not_divide 'num_q_heads = 6 is not a multiple of num_kv_heads = 4'
bad_capture missing_layer '/layers/1: missing layer group'
bad_capture nan_value '/layers/0/q: holds NaN at head 1, position 5, channel 3 \(expected finite values\)'
bad_capture inf_value '/layers/1/k: holds Inf at head 0, position 7, channel 2 \(expected finite values\)'
bad_capture bfloat16_without_attribute '/layers/0/q: is uint16 without attribute dtype="bfloat16"'
bad_capture dimensions_overflow 'overflows 64 bits'
bad_capture zero_length_sequence "attribute 'seq_len' is 0 \(expected a positive integer\)"

# ---- bad HF config.json for `hysparse kv`: exit 3, the key named, no report ----
KV_REPORT="$WORK/kv.h5"
echo '{"num_hidden_layers": 4, "num_attention_heads": 8,' > "$WORK/broken.json"
refuses config-not-json 3 'not valid JSON' broken.json "$KV_REPORT" -- "$HYSPARSE" kv --config "$WORK/broken.json" -o "$KV_REPORT"
echo '{"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 3, "head_dim": 64}' > "$WORK/heads.json"
refuses config-heads 3 'num_key_value_heads: 3 does not divide num_attention_heads 8' heads.json "$KV_REPORT" -- "$HYSPARSE" kv --config "$WORK/heads.json" -o "$KV_REPORT"
echo '{"num_attention_heads": 8, "head_dim": 64}' > "$WORK/nolayers.json"
refuses config-missing-key 3 'num_hidden_layers: missing' nolayers.json "$KV_REPORT" -- "$HYSPARSE" kv --config "$WORK/nolayers.json" -o "$KV_REPORT"

# ---- bad options: exit 2 (usage), nothing written ----
run_replay_usage() {  # run_replay_usage NAME PATTERN OPTIONS...
  local name=$1 pattern=$2
  shift 2
  refuses "$name" 2 "$pattern" "" "$REPORT" -- "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" -q "$@"
}
run_replay_usage unknown-selector "unknown selector 'bogus'" --selectors oracle,bogus
run_replay_usage unknown-selector-key "bogus" --selectors oracle:bogus=1
run_replay_usage selector-not-key-value "is not key=value" --selectors oracle:block
run_replay_usage selector-empty-entry "empty entry" --selectors oracle,,swa
run_replay_usage budget-zero "--budget '0': expected a positive integer" --budget 0
run_replay_usage budget-negative "--budget '-16': expected a positive integer" --budget=-16
run_replay_usage budget-not-a-number "--budget 'lots': expected a positive integer" --budget lots
run_replay_usage budget-overflow "--budget .*expected a positive integer" --budget 99999999999999999999
run_replay_usage budget-overflow-suffix "--budget '9223372036854775807K': overflows 64 bits" --budget 9223372036854775807K
run_replay_usage sparsity-one "--sparsity '1': expected a fraction of the row to drop, in \[0, 1\)" --sparsity 1
run_replay_usage sparsity-negative "--sparsity '-0.5'" --sparsity=-0.5
run_replay_usage queries-zero "--queries last:N '0': expected a positive integer" --queries last:0
run_replay_usage queries-unknown "--queries 'first:8'" --queries first:8
run_replay_usage schedule-bad "schedule 'FXS'" --schedule FXS --selectors hysparse

# ---- outputs that cannot be written: exit 4, nothing left behind ----
refuses output-dir-missing 4 'does not exist' /nonexistent-dir/report.h5 "" -- "$HYSPARSE" replay "$WORK/valid.h5" -o /nonexistent-dir/report.h5 "${REPLAY[@]}"
refuses output-under-a-file 4 'is not a directory' valid.h5/report.h5 "" -- "$HYSPARSE" replay "$WORK/valid.h5" -o "$WORK/valid.h5/report.h5" "${REPLAY[@]}"
mkdir -p "$WORK/a-directory"
refuses output-is-a-directory 4 'it is a directory' a-directory "" -- "$HYSPARSE" replay "$WORK/valid.h5" -o "$WORK/a-directory" "${REPLAY[@]}"
if [[ $(id -u) -ne 0 ]]; then  # root writes anywhere: the permission case only means something for other users
  mkdir -p "$WORK/read-only" && chmod 555 "$WORK/read-only"
  refuses output-dir-read-only 4 'is not writable' read-only/report.h5 "$WORK/read-only/report.h5" -- "$HYSPARSE" replay "$WORK/valid.h5" -o "$WORK/read-only/report.h5" "${REPLAY[@]}"
  chmod 755 "$WORK/read-only"
else
  echo "note: running as root, the read-only directory case is skipped"
fi

# Disk full, simulated without root: RLIMIT_FSIZE (ulimit -f, in KiB blocks) makes every write past the
# limit fail with EFBIG, as ENOSPC would on a full disk. The report needs more than 64 KiB.
refuses disk-full-replay 4 'cannot write.*file too large' report.h5 "$REPORT" -- bash -c 'ulimit -f 64; exec "$@"' _ "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" "${REPLAY[@]}"
refuses disk-full-synth 4 'cannot write.*file too large' synth.h5 "$WORK/synth.h5" -- bash -c 'ulimit -f 64; exec "$@"' _ "$HYSPARSE" synth -o "$WORK/synth.h5" --layers 2 --seq-len 1024 --head-dim 32
refuses disk-full-kv-report 4 'cannot write.*file too large' kv.h5 "$KV_REPORT" -- bash -c 'ulimit -f 8; exec "$@"' _ "$HYSPARSE" kv --preset hysparse-80b-a3b --context 16K,32K -o "$KV_REPORT"
# Every limit from 1 KiB up fails cleanly: the write that hits it may be the superblock, a dataset, an
# attribute or the final flush.
for limit_kib in 1 4 16 40 100; do
  refuses "disk-full-replay-at-${limit_kib}K" 4 'cannot (write|create|close)' report.h5 "$REPORT" -- bash -c "ulimit -f $limit_kib; exec \"\$@\"" _ "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" "${REPLAY[@]}"
done
# /dev/full: text on stdout that cannot be written is an output error too.
refuses stdout-full-kv 4 'standard output: cannot write \(No space left on device\)' 'standard output' "" -- bash -c 'exec "$@" > /dev/full' _ "$HYSPARSE" kv --preset hysparse-80b-a3b --context 16K
refuses stdout-full-inspect 4 'standard output: cannot write' 'standard output' "" -- bash -c 'exec "$@" > /dev/full' _ "$HYSPARSE" inspect "$WORK/valid.h5"

# ---- not enough memory: exit 5 before allocating, saying how much is needed ----
refuses memory-replay 5 'needs .* of memory but only 1.00 KiB .* is available \(limited by HYSPARSE_MEMORY_LIMIT\)' valid.h5 "$REPORT" -- env HYSPARSE_MEMORY_LIMIT=1K "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" "${REPLAY[@]}"
refuses memory-inspect 5 'valid.h5: reading layer 0 needs 32.00 KiB .* of memory' valid.h5 "" -- env HYSPARSE_MEMORY_LIMIT=4K "$HYSPARSE" inspect "$WORK/valid.h5"
refuses memory-synth 5 'synth.h5: synth of a layer of .* needs 452.00 MiB .* of memory' synth.h5 "$WORK/synth.h5" -- env HYSPARSE_MEMORY_LIMIT=1M "$HYSPARSE" synth -o "$WORK/synth.h5" --layers 2 --seq-len 65536 --head-dim 64
refuses memory-limit-malformed 2 "HYSPARSE_MEMORY_LIMIT='lots'" HYSPARSE_MEMORY_LIMIT "$REPORT" -- env HYSPARSE_MEMORY_LIMIT=lots "$HYSPARSE" replay "$WORK/valid.h5" -o "$REPORT" "${REPLAY[@]}"
refuses synth-overflow 2 'overflows 64 bits' seq-len "$WORK/synth.h5" -- "$HYSPARSE" synth -o "$WORK/synth.h5" --seq-len 9223372036854775807

# ---- a capture changed while it is read: exit 3, nothing written ----
# The replay prints a line per finished layer (no -q); after the first one the capture gets one more byte.
"$HYSPARSE" synth -o "$WORK/changing.h5" --layers 4 --seq-len 2048 --head-dim 32 --q-heads 4 --kv-heads 2 > /dev/null
"$HYSPARSE" replay "$WORK/changing.h5" -o "$REPORT" --selectors oracle,swa,hysparse > /dev/null 2> "$WORK/changing.err" &
victim=$!
for _ in $(seq 1 600); do grep -q "layer 1/" "$WORK/changing.err" && break; sleep 0.05; done
printf 'x' >> "$WORK/changing.h5"
wait "$victim"
rc=$?
last=$(tail -n 1 "$WORK/changing.err")
errors=$(grep -c '^hysparse:' "$WORK/changing.err")
if [[ $rc -ne 3 || $errors -ne 1 ]] || ! grep -q 'changing.h5: changed while it was read' <<<"$last"; then
  fail_case capture-changed-while-read "exit $rc (expected 3), $errors error lines" "$(tail -n 3 "$WORK/changing.err")"
elif compgen -G "$REPORT*" > /dev/null; then
  fail_case capture-changed-while-read "left output behind"
else
  pass=$((pass + 1))
fi

echo "bad input tests: $pass passed, $failures failed"
[[ $failures -eq 0 ]]
