#!/usr/bin/env bash
# Sets up, builds and runs every test (C++ unit and parity tests, CLI tests, analysis tests)
# through CTest; CTest prints the summary line and its exit code is ours.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd "${HYSPARSE_BUILD_DIR:-build}"
ctest --output-on-failure -j"$(nproc)"
