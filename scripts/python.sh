#!/usr/bin/env bash
# Runs Python with an interpreter that has h5py, numpy and matplotlib: $HYSPARSE_PYTHON,
# then Debian's /usr/bin/python3, then python3 on PATH (often a pyenv build without them).
for candidate in "${HYSPARSE_PYTHON:-}" /usr/bin/python3 python3; do
  [[ -n "$candidate" ]] || continue
  if "$candidate" -c "import h5py, numpy, matplotlib" >/dev/null 2>&1; then
    exec "$candidate" "$@"
  fi
done
echo "python.sh: no Python 3 with h5py, numpy and matplotlib (run scripts/setup.sh, or set HYSPARSE_PYTHON)" >&2
exit 1
