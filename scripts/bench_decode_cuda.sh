#!/usr/bin/env bash
# Run scripts/bench_decode_cuda.py on a GPU machine from the repository root without installing
# the package: the kernels directory is exposed under its import name, and a copy of the gguf
# package (needed to write the synthetic model) may sit in scratch/cudalib.
# Usage: scripts/bench_decode_cuda.sh OUT_DIR [extra arguments for `run`]
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [run arguments]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
pl=$(mktemp -d)
ln -sfn "$root/kernels" "$pl/sparsify_kernels"
export PYTHONPATH="$root:$pl:$root/scratch/cudalib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
cd "$root"
python3 scripts/bench_decode_cuda.py run "$out" "$@" 2>&1 | tee "$out/log"
