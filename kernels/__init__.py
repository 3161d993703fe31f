"""sparsify_kernels: sparse GEMV kernels on input-major weights (stand-alone; numpy/numba/torch).

Modules: :mod:`.reference` (numpy oracle), :mod:`.quant` (int8 + group-scale format),
:mod:`.cpu` (numba kernels), :mod:`.cuda` (GPU kernels). See kernels/README.md.
"""
