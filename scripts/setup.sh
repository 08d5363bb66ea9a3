#!/usr/bin/env bash
# Installs what hysparse needs from the distribution (Debian 12 / Ubuntu 24.04) and
# builds it. As root, missing packages are installed with apt-get; otherwise the exact
# apt-get line is printed and the script stops. HYSPARSE_SKIP_PACKAGES=1 skips the
# package check (machines whose tools come from elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake pkg-config libeigen3-dev libhdf5-dev libcli11-dev libfmt-dev catch2
          nlohmann-json3-dev python3 python3-h5py python3-numpy python3-matplotlib)

if [[ "${HYSPARSE_SKIP_PACKAGES:-0}" != 1 ]] && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]]; then
      echo "setup: installing ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: missing packages. Run:" >&2
      echo "  sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
fi

BUILD_DIR=${HYSPARSE_BUILD_DIR:-build}
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${HYSPARSE_CMAKE_ARGS:-} >/dev/null
fi
if ! cmake --build "$BUILD_DIR" -j"$(nproc)" > "$BUILD_DIR/build.log" 2>&1; then
  grep -E -B2 -A6 "error" "$BUILD_DIR/build.log" | head -60 >&2
  echo "setup: build failed (full log: $BUILD_DIR/build.log)" >&2
  exit 1
fi
grep -E "warning:" "$BUILD_DIR/build.log" || true
