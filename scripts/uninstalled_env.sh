# Sourced by the GPU scripts (bench_decode_cuda.sh, ncu_step_cuda.sh) to run from the repository
# root without installing the package: the kernels directory is exposed under its import name,
# and a copy of the gguf package (needed to write a synthetic model) may sit in scratch/cudalib.
# Sets `root` and changes into it.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_kernels_link=$(mktemp -d)
ln -sfn "$root/kernels" "$_kernels_link/sparsify_kernels"
export PYTHONPATH="$root:$_kernels_link:$root/scratch/cudalib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$root"
