#!/usr/bin/env bash
# Run scripts/bench_decode_cuda.py on a GPU machine from the repository root without installing
# the package (scripts/uninstalled_env.sh).
# Usage: scripts/bench_decode_cuda.sh OUT_DIR [extra arguments for `run`]
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [run arguments]}
shift
mkdir -p "$out"
. "$(dirname "$0")/uninstalled_env.sh"
python3 scripts/bench_decode_cuda.py run "$out" "$@" 2>&1 | tee "$out/log"
