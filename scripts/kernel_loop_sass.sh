#!/usr/bin/env bash
# The machine code of a tensor-core statistics kernel's main loop, without a GPU: compiles the kernel's
# source for sm_90a to a cubin, disassembles it (cuobjdump and nvdisasm; from NVIDIA's PyPI wheels
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm where the toolkit lacks them, kept in build/tools/sass)
# and prints the loop's length and its instructions by opcode. The loop is the longest backward branch of the chosen instantiation
# (bf16, head_dim 128, block 64 unless told otherwise); its causal-mask and flush branches are in the
# count, though most tiles skip them. Session 13 found a per-tile integer division this way (README,
# Performance).
#   scripts/kernel_loop_sass.sh [wgmma|mma] [BLOCK_N8 (1, 2, 4, 8 or 0 for blocks of several tiles)] [--list]
#   --list: every instruction of the loop, not only the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
KERNEL=${1:-wgmma}
BLOCK_N8=${2:-8}
LIST=0
[[ "${3:-}" == "--list" ]] && LIST=1
case "$KERNEL" in
  wgmma) SOURCE=cuda/wgmma_statistics.cu; PATTERN="wgmma_statistics_kernelILb0ELi8ELi${BLOCK_N8}E" ;;
  mma) SOURCE=cuda/tensor_core_statistics.cu; PATTERN="tensor_core_statistics_kernelILb0ELi8ELi${BLOCK_N8}ELi1E" ;;
  *) echo "kernel_loop_sass.sh: unknown kernel '$KERNEL' (expected wgmma or mma)" >&2; exit 2 ;;
esac
case "$BLOCK_N8" in 0|1|2|4|8) ;; *) echo "kernel_loop_sass.sh: BLOCK_N8 '$BLOCK_N8' (expected 0, 1, 2, 4 or 8)" >&2; exit 2 ;; esac
command -v nvcc > /dev/null || { echo "kernel_loop_sass.sh: nvcc not found (the CUDA toolkit)" >&2; exit 1; }

# cuobjdump runs nvdisasm; both from NVIDIA's PyPI wheels where the toolkit lacks them.
if ! command -v cuobjdump > /dev/null || ! command -v nvdisasm > /dev/null; then
  TOOLS=build/tools/sass
  if [[ ! -x "$TOOLS/bin/cuobjdump" || ! -x "$TOOLS/bin/nvdisasm" ]]; then
    PYTHON=""
    for candidate in python3 /usr/bin/python3; do
      if "$candidate" -m pip --version > /dev/null 2>&1; then PYTHON=$candidate; break; fi
    done
    [[ -n "$PYTHON" ]] || { echo "kernel_loop_sass.sh: no cuobjdump/nvdisasm on PATH and no Python with pip to fetch them" >&2; exit 1; }
    mkdir -p "$TOOLS/bin"
    for package in nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; do
      rm -rf "$TOOLS/wheel" && mkdir -p "$TOOLS/wheel"
      "$PYTHON" -m pip download --quiet --no-deps --dest "$TOOLS/wheel" "$package" > /dev/null
      "$PYTHON" -m zipfile -e "$(ls "$TOOLS"/wheel/*.whl | head -n 1)" "$TOOLS/wheel/files"
      find "$TOOLS/wheel/files" -type f \( -name cuobjdump -o -name nvdisasm \) -exec cp {} "$TOOLS/bin/" \;
    done
    rm -rf "$TOOLS/wheel"
    chmod +x "$TOOLS"/bin/*
    [[ -x "$TOOLS/bin/cuobjdump" && -x "$TOOLS/bin/nvdisasm" ]] \
      || { echo "kernel_loop_sass.sh: the wheels did not hold cuobjdump and nvdisasm" >&2; exit 1; }
  fi
  PATH="$PWD/$TOOLS/bin:$PATH"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I src -I cuda -cubin "$SOURCE" -o "$WORK/kernel.cubin"
cuobjdump -sass "$WORK/kernel.cubin" > "$WORK/all.sass"
# The instantiation's instructions: lines "/*address*/ OPCODE ... ;" of its Function section.
awk -v pattern="$PATTERN" '$0 ~ "Function : .*" pattern {inside = 1; next} inside && /Function : / {inside = 0} inside' \
  "$WORK/all.sass" | grep -E '^\s+/\*[0-9a-f]{4}\*/' > "$WORK/kernel.sass" || true
[[ -s "$WORK/kernel.sass" ]] || { echo "kernel_loop_sass.sh: no instantiation matching $PATTERN in $SOURCE" >&2; exit 1; }
awk -v list="$LIST" '
  function hex(text,   i, value) {  # mawk has no strtonum
    value = 0; text = tolower(text)
    for (i = 1; i <= length(text); ++i) value = value * 16 + index("0123456789abcdef", substr(text, i, 1)) - 1
    return value
  }
  { match($0, /\/\*[0-9a-f]+\*\//); line[NR] = $0; at[NR] = hex(substr($0, RSTART + 2, RLENGTH - 4)) }
  / BRA 0x/ { match($0, / BRA 0x[0-9a-f]+/); target = hex(substr($0, RSTART + 7, RLENGTH - 7))
              if (target < at[NR] && at[NR] - target > best_end - best_begin) { best_begin = target; best_end = at[NR] } }
  END {
    if (best_end == 0) { print "no loop found"; exit 1 }
    for (i = 1; i <= NR; ++i) {
      if (at[i] < best_begin || at[i] > best_end) continue
      text = line[i]; sub(/^[ \t]*\/\*[0-9a-f]+\*\/[ \t]*/, "", text); sub(/[ \t]*;.*$/, "", text)
      if (list) print text
      op = text; sub(/^@!?U?P[T0-9]+ /, "", op); split(op, parts, /[ .]/); count[parts[1]]++; total++
    }
    printf "kernel %d instructions; main loop 0x%x-0x%x: %d instructions\n", NR, best_begin, best_end, total
    for (op in count) printf "%6d %s\n", count[op], op | "sort -rn"
  }' "$WORK/kernel.sass"
