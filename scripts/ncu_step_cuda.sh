#!/usr/bin/env bash
# Nsight Compute over one GPU decode step (scripts/ncu_step_cuda.py), from the repository root,
# without installing the package (scripts/uninstalled_env.sh).
# Usage: scripts/ncu_step_cuda.sh OUT_DIR MODEL.gguf TABLE.json [FORMAT:LEVEL ...]
#   default runs: fp16:0 fp16:0.5. Kernels 20-29 of the step's GEMV and attention launches are
#   profiled (blocks 4 and 5 of a model whose blocks launch five of them each); NCU_KERNELS,
#   NCU_SKIP and NCU_COUNT change the kernel filter, the kernels skipped and the count.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR MODEL TABLE [FORMAT:LEVEL ...]}
model=${2:?model}
table=${3:?table}
shift 3
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(fp16:0 fp16:0.5)
mkdir -p "$out"
. "$(dirname "$0")/uninstalled_env.sh"
ncu --version | tee "$out/ncu_version.txt"
raws=()
for r in "${runs[@]}"; do
  fmt=${r%%:*}
  lev=${r##*:}
  tag="${fmt}_${lev}"
  timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none --profile-from-start off --set full \
    --import-source no -k "${NCU_KERNELS:-regex:gemv_kernel|attention_kernel}" -s "${NCU_SKIP:-20}" \
    -c "${NCU_COUNT:-10}" -f -o "$out/step_$tag" \
    python3 scripts/ncu_step_cuda.py drive "$model" --table "$table" --format "$fmt" \
    --level "$lev" 2>&1 | tail -20 | tee "$out/ncu_$tag.log"
  if [ -f "$out/step_$tag.ncu-rep" ]; then
    ncu --import "$out/step_$tag.ncu-rep" --csv --page raw > "$out/raw_$tag.csv" 2>> "$out/ncu_$tag.log"
    ncu --import "$out/step_$tag.ncu-rep" --page details > "$out/details_$tag.txt" 2>> "$out/ncu_$tag.log"
    ncu --import "$out/step_$tag.ncu-rep" --csv --page source --print-source sass \
      > "$out/source_$tag.csv" 2>> "$out/ncu_$tag.log"
    raws+=("$out/raw_$tag.csv")
  fi
done
[ ${#raws[@]} -gt 0 ] && python3 scripts/ncu_step_cuda.py summary "${raws[@]}" --force \
  --out "$out/ncu_step.json" --note "runs: ${runs[*]}; model $(basename "$model")"
