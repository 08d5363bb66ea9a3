#!/usr/bin/env bash
# hysparse sweep through the real binary: a four-axis sweep in one command and one file, config
# files and --from-report giving the same numbers, kill -9 / SIGINT midway and --resume giving
# the numbers of an uninterrupted run, and the usage errors.
# usage: test_sweep_cli.sh HYSPARSE WORKDIR PYTHON_WRAPPER
set -u
HYSPARSE=$1
WORK=$2
PYTHON="bash $3"
COMPARE="$(dirname "$0")/compare_sweeps.py"
rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/lib.sh"

same_numbers() {  # NAME A B: every number of two reports equal
  local out
  if out=$($PYTHON "$COMPARE" "$2" "$3" 2>&1); then pass=$((pass + 1)); else
    echo "FAIL $1: reports differ:"; echo "$out" | tail -5; failures=$((failures + 1)); fi
}
attribute() {  # FILE OBJECT NAME: prints an attribute
  $PYTHON -c "import h5py,sys; v=h5py.File(sys.argv[1],'r')[sys.argv[2]].attrs[sys.argv[3]]; print(v.decode() if isinstance(v, bytes) else v)" "$@"
}
check() {  # NAME CONDITION-OUTPUT EXPECTED
  if [[ "$2" == "$3" ]]; then pass=$((pass + 1)); else echo "FAIL $1: got '$2', expected '$3'"; failures=$((failures + 1)); fi
}
wait_for_units() {  # FILE N PID: waits until the report holds N finished units (or the process ended)
  for _ in $(seq 1 600); do
    if [[ -e "$1" ]] && [[ $(attribute "$1" /sweep units_done 2>/dev/null || echo 0) -ge $2 ]]; then return 0; fi
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

"$HYSPARSE" synth -o "$WORK/a.h5" --layers 6 --seq-len 1024 --head-dim 32 --q-heads 4 --kv-heads 2 --seed 11 > /dev/null
"$HYSPARSE" synth -o "$WORK/b.h5" --layers 6 --seq-len 700 --head-dim 32 --q-heads 4 --kv-heads 2 --seed 12 > /dev/null
AXES=(--sparsity 0.5,0.8,0.9 --block 32,64 --window 0,64 --schedule 1:1 --schedule 1:3 --selectors oracle,swa,hysparse,quest)

# Five axes (sparsity, block, window, schedule, selector) over two captures: one command, one file.
expect sweep 0 'wrote' -- "$HYSPARSE" sweep "$WORK/a.h5" "$WORK/b.h5" -o "$WORK/full.h5" "${AXES[@]}" -q
check sweep-status "$(attribute "$WORK/full.h5" /sweep status)" complete
check sweep-grid "$($PYTHON -c "import h5py; print(h5py.File('$WORK/full.h5','r')['sweep/grid/mass_recall'].shape)")" "(3, 4, 2, 2, 1, 2, 1, 3)"
# 18 instances (oracle 4, swa 2, hysparse 8, quest 4) x 3 budgets x (2 captures + pooled).
check sweep-points "$(attribute "$WORK/full.h5" /sweep/points rows)" 162
check sweep-one-run "$($PYTHON -c "import h5py; print('earlier_runs' in h5py.File('$WORK/full.h5','r').attrs)")" False
check sweep-no-checkpoint "$($PYTHON -c "import h5py; print('checkpoint' in h5py.File('$WORK/full.h5','r')['sweep'])")" False

# The same sweep from a TOML config file, and re-run from its own report.
cat > "$WORK/sweep.toml" <<TOML
captures = ["$WORK/a.h5", "$WORK/b.h5"]
sparsity = "0.5,0.8,0.9"
block = [32, 64]
window = [0, 64]
schedule = ["1:1", "1:3"]
selectors = "oracle,swa,hysparse,quest"
quiet = true
TOML
expect sweep-config 0 'wrote' -- "$HYSPARSE" sweep --config "$WORK/sweep.toml" -o "$WORK/from_config.h5"
same_numbers sweep-config-same "$WORK/full.h5" "$WORK/from_config.h5"
expect sweep-from-report 0 'wrote' -- "$HYSPARSE" sweep --from-report "$WORK/full.h5" -o "$WORK/rerun.h5" -q
same_numbers sweep-from-report-same "$WORK/full.h5" "$WORK/rerun.h5"
expect sweep-from-report-override 0 'wrote' -- "$HYSPARSE" sweep --from-report "$WORK/full.h5" -o "$WORK/one.h5" --selectors oracle -q
check sweep-from-report-override-points "$(attribute "$WORK/one.h5" /sweep/points rows)" 36
expect replay-for-sweep 0 'wrote' -- "$HYSPARSE" replay "$WORK/b.h5" -o "$WORK/replay.h5" --sparsity 0.5,0.9 --selectors oracle,hysparse -q
expect sweep-from-replay-report 0 'wrote' -- "$HYSPARSE" sweep --from-report "$WORK/replay.h5" -o "$WORK/from_replay.h5" -q
check sweep-from-replay-points "$(attribute "$WORK/from_replay.h5" /sweep/points rows)" 8

# Two devices (here two CPU backends sharing the cores): captures run in parallel, same numbers.
expect sweep-two-devices 0 'wrote' -- "$HYSPARSE" sweep "$WORK/a.h5" "$WORK/b.h5" -o "$WORK/two.h5" "${AXES[@]}" --device cpu,cpu -q
same_numbers sweep-two-devices-same "$WORK/full.h5" "$WORK/two.h5"
if "$HYSPARSE" info | grep -q "CUDA devices  none"; then
  expect sweep-gpus-without-gpu 6 'device error' -- "$HYSPARSE" sweep "$WORK/a.h5" -o "$WORK/x.h5" --gpus 0,1
fi

# kill -9 midway (the report is rewritten after every unit), then --resume: the same numbers.
"$HYSPARSE" sweep "$WORK/a.h5" "$WORK/b.h5" -o "$WORK/killed.h5" "${AXES[@]}" --checkpoint-every 0 -q --threads 1 &
victim=$!
if wait_for_units "$WORK/killed.h5" 3 "$victim"; then
  kill -9 "$victim"; wait "$victim" 2>/dev/null
  check kill9-partial "$(attribute "$WORK/killed.h5" /sweep status)" partial
  expect resume-after-kill9 0 'wrote' -- "$HYSPARSE" sweep --resume -o "$WORK/killed.h5" -q
  same_numbers resume-after-kill9-same "$WORK/full.h5" "$WORK/killed.h5"
  # Provenance keeps both invocations: this one at the root, the killed one in earlier_runs.
  check resume-command-line "$(attribute "$WORK/killed.h5" / command_line | grep -c -- '--resume')" 1
  check resume-earlier-runs "$($PYTHON -c "import h5py,sys; r=h5py.File(sys.argv[1],'r').attrs['earlier_runs']; print(len(r), sum('--checkpoint-every 0' in (x.decode() if isinstance(x, bytes) else x) for x in r))" "$WORK/killed.h5")" "1 1"
else
  wait "$victim"; echo "FAIL kill9: the sweep ended before 3 units were saved"; failures=$((failures + 1))
fi

# SIGINT midway: exit 7, finished units saved, --resume completes with the same numbers.
"$HYSPARSE" sweep "$WORK/a.h5" "$WORK/b.h5" -o "$WORK/interrupted.h5" "${AXES[@]}" -q --threads 1 &
victim=$!
if wait_for_units "$WORK/interrupted.h5" 1 "$victim"; then
  sleep 0.5
  kill -INT "$victim"; wait "$victim"; rc=$?
  check sigint-exit "$rc" 7
  check sigint-partial "$(attribute "$WORK/interrupted.h5" /sweep status)" partial
  expect resume-after-sigint 0 'wrote' -- "$HYSPARSE" sweep --resume -o "$WORK/interrupted.h5" -q
  same_numbers resume-after-sigint-same "$WORK/full.h5" "$WORK/interrupted.h5"
else
  wait "$victim"; echo "FAIL sigint: the sweep ended before a unit was saved"; failures=$((failures + 1))
fi
compgen -G "$WORK/*.tmp*" > /dev/null && { echo "FAIL temporary files left: $(ls "$WORK" | grep tmp)"; failures=$((failures + 1)); }

# Usage and input errors.
expect resume-complete 0 'nothing to resume' -- "$HYSPARSE" sweep --resume -o "$WORK/full.h5"
expect resume-missing 2 'does not exist' -- "$HYSPARSE" sweep --resume -o "$WORK/missing.h5"
expect resume-with-options 2 'takes the configuration' -- "$HYSPARSE" sweep --resume -o "$WORK/full.h5" --budget 64
expect resume-replay-report 3 'replay report' -- "$HYSPARSE" sweep --resume -o "$WORK/replay.h5"
expect no-captures 2 'no captures' -- "$HYSPARSE" sweep -o "$WORK/x.h5"
expect bad-block 2 'block' -- "$HYSPARSE" sweep "$WORK/a.h5" -o "$WORK/x.h5" --block 0
expect bad-group 2 'group=none' -- "$HYSPARSE" sweep "$WORK/a.h5" -o "$WORK/x.h5" --group none
expect repeated-axis-value 2 'twice' -- "$HYSPARSE" sweep "$WORK/a.h5" -o "$WORK/x.h5" --window 64,64
expect bad-checkpoint-every 2 'checkpoint-every' -- "$HYSPARSE" sweep "$WORK/a.h5" -o "$WORK/x.h5" --checkpoint-every soon
expect from-report-not-report 3 'format' -- "$HYSPARSE" sweep --from-report "$WORK/a.h5" -o "$WORK/x.h5"
[[ -e "$WORK/x.h5" ]] && { echo "FAIL a failed sweep left a report"; failures=$((failures + 1)); }
# A capture that changed between the kill and the resume is refused (the numbers would mix two inputs).
cp "$WORK/a.h5" "$WORK/c.h5"
"$HYSPARSE" sweep "$WORK/c.h5" -o "$WORK/changed.h5" "${AXES[@]}" --checkpoint-every 0 -q --threads 1 &
victim=$!
wait_for_units "$WORK/changed.h5" 1 "$victim"
kill -9 "$victim" 2>/dev/null; wait "$victim" 2>/dev/null
check changed-partial "$(attribute "$WORK/changed.h5" /sweep status)" partial
"$HYSPARSE" synth -o "$WORK/c.h5" --layers 6 --seq-len 1024 --head-dim 32 --q-heads 4 --kv-heads 2 --seed 99 > /dev/null
expect resume-changed-capture 3 'changed since the sweep' -- "$HYSPARSE" sweep --resume -o "$WORK/changed.h5"

echo "sweep cli tests: $pass passed, $failures failed"
[[ $failures -eq 0 ]]
