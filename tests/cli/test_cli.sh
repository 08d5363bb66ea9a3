#!/usr/bin/env bash
# CLI behaviour through the real binary: exit codes and one-line messages.
set -u
HYSPARSE=$1
WORK=$2
rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/lib.sh"

expect version 0 '^hysparse [0-9]+\.[0-9]+\.[0-9]+' -- "$HYSPARSE" --version
expect help 0 'synth' -- "$HYSPARSE" --help
for sub in synth inspect info replay kv list; do
  expect "help-$sub" 0 "Usage: .*$sub" -- "$HYSPARSE" "$sub" --help
done
expect no-subcommand 2 'usage error' -- "$HYSPARSE"
expect unknown-option 2 'usage error' -- "$HYSPARSE" synth --bogus -o "$WORK/x.h5"
expect info 0 'CUDA device' -- "$HYSPARSE" info
expect synth 0 'wrote' -- "$HYSPARSE" synth -o "$WORK/s.h5" --layers 2 --seq-len 128 --head-dim 16 --q-heads 4 --kv-heads 2
expect synth-bad-heads 2 'not a multiple' -- "$HYSPARSE" synth -o "$WORK/bad.h5" --q-heads 6 --kv-heads 4
[[ -e "$WORK/bad.h5" ]] && { echo "FAIL synth-bad-heads left a file"; failures=$((failures + 1)); }
expect synth-bad-dtype 2 'dtype' -- "$HYSPARSE" synth -o "$WORK/bad.h5" --dtype int8
expect synth-unwritable 4 'not writable|does not exist' -- "$HYSPARSE" synth -o /nonexistent-dir/x.h5
expect inspect 0 'valid hysparse capture' -- "$HYSPARSE" inspect "$WORK/s.h5"
expect replay 0 'wrote' -- "$HYSPARSE" replay "$WORK/s.h5" -o "$WORK/r.h5" --budget 16,32 --block 16 -q
expect replay-bad-selector 2 "unknown selector 'bogus'" -- "$HYSPARSE" replay "$WORK/s.h5" -o "$WORK/bad.h5" --selectors bogus
[[ -e "$WORK/bad.h5" ]] && { echo "FAIL replay-bad-selector left a report"; failures=$((failures + 1)); }
if "$HYSPARSE" info | grep -q "CUDA devices  none"; then
  # No usable GPU: asking for one is an error (exit 6), never a silent CPU run.
  expect replay-cuda-without-gpu 6 'device error' -- "$HYSPARSE" replay "$WORK/s.h5" -o "$WORK/gpu.h5" --device cuda
  [[ -e "$WORK/gpu.h5" ]] && { echo "FAIL replay-cuda-without-gpu left a report"; failures=$((failures + 1)); }
fi
expect inspect-missing 3 'cannot open' -- "$HYSPARSE" inspect "$WORK/missing.h5"
echo "this is not hdf5" > "$WORK/text.h5"
expect inspect-not-hdf5 3 'not an HDF5 file' -- "$HYSPARSE" inspect "$WORK/text.h5"
head -c 3000 "$WORK/s.h5" > "$WORK/truncated.h5"
expect inspect-truncated 3 'truncated|corrupted|cannot' -- "$HYSPARSE" inspect "$WORK/truncated.h5"

# SIGINT and SIGTERM stop a real replay with exit 7 and leave no report, not even a partial one.
"$HYSPARSE" synth -o "$WORK/long.h5" --layers 6 --seq-len 4096 --head-dim 64 > /dev/null
for signal in INT TERM; do
  "$HYSPARSE" replay "$WORK/long.h5" -o "$WORK/killed.h5" --selectors all -q > /dev/null 2>&1 &
  victim=$!
  sleep 1
  kill -"$signal" "$victim"
  wait "$victim"
  rc=$?
  if [[ $rc -ne 7 ]] || compgen -G "$WORK/killed.h5*" > /dev/null; then
    echo "FAIL replay-sig$signal: exit $rc (expected 7) or a report was left"; failures=$((failures + 1))
  else
    pass=$((pass + 1))
  fi
done

# A selector's long layer setup (H2O simulates its cache over every position: minutes at long contexts)
# stops at a signal too, within a second, not once the setup is done (it takes ~30 s here).
"$HYSPARSE" synth -o "$WORK/h2o_long.h5" --layers 1 --q-heads 2 --kv-heads 1 --seq-len 32768 --head-dim 64 > /dev/null
"$HYSPARSE" replay "$WORK/h2o_long.h5" -o "$WORK/killed_h2o.h5" --selectors h2o --budget 8192 -q > /dev/null 2>&1 &
victim=$!
sleep 2
kill -INT "$victim"
for _ in $(seq 1 100); do kill -0 "$victim" 2> /dev/null || break; sleep 0.1; done
if kill -0 "$victim" 2> /dev/null; then
  echo "FAIL replay-sigint-in-setup: still running 10 s after SIGINT"; failures=$((failures + 1))
  kill -9 "$victim"; wait "$victim" 2> /dev/null
else
  wait "$victim"
  rc=$?
  if [[ $rc -ne 7 ]] || compgen -G "$WORK/killed_h2o.h5*" > /dev/null; then
    echo "FAIL replay-sigint-in-setup: exit $rc (expected 7) or a report was left"; failures=$((failures + 1))
  else
    pass=$((pass + 1))
  fi
fi

echo "cli tests: $pass passed, $failures failed"
[[ $failures -eq 0 ]]
