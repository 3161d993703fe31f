"""Threshold-sparse GEMV on CUDA: build `sparse_gemv.cu`, load it with ctypes, call it from torch.

Computes ``y = W^T (x * keep)`` with ``keep = NOT(score(x) <= t)``, ``score = |x|`` or
``|x| * factor``, for input-major weights ``W`` of shape (K, N) (row i multiplies ``x[i]``), in
fp16, bf16 or int8 with float32 scales per group of ``INT8_GROUP`` outputs. See ``sparse_gemv.h``
for the full contract; this module adds argument checks and launches on torch's current stream.

The shared library is compiled with nvcc for the device's own architecture on first use and cached
under ``~/.cache/sparsify/kernels/<hash of source, header, arch, nvcc version and flags>/``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sparse_gemv.cu"
HEADER = HERE / "sparse_gemv.h"

INT8_GROUP = 128
"""Output channels per int8 scale group (SPARSIFY_GEMV_INT8_GROUP in the header)."""

NVCC_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo")

_WTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.int8: 2}
_lock = threading.Lock()
_libs: dict[tuple[int, int], ctypes.CDLL] = {}
_workspaces: dict[int, torch.Tensor] = {}
# Replaced workspaces stay alive: a captured CUDA graph may still point at one.
_retired: list[torch.Tensor] = []


class KernelBuildError(RuntimeError):
    """nvcc is missing or failed to compile the kernels."""


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def is_available() -> bool:
    """True when a CUDA device and nvcc are both present."""
    return torch.cuda.is_available() and find_nvcc() is not None


def nvcc_version(nvcc: str) -> str:
    """Full ``nvcc --version`` text (part of the cache key)."""
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    return res.stdout.strip()


def gencode(arch: tuple[int, int]) -> str:
    """nvcc flag that builds native code for compute capability ``arch`` = (major, minor)."""
    cc = f"{arch[0]}{arch[1]}"
    return f"-gencode=arch=compute_{cc},code=sm_{cc}"


def compile_command(nvcc: str, arch: tuple[int, int], output: Path, shared: bool = True) -> list:
    """nvcc command line compiling SOURCE for ``arch`` into ``output`` (.so, or .o if not shared)."""
    kind = ["--shared"] if shared else ["-c"]
    return [nvcc, *NVCC_FLAGS, gencode(arch), *kind, "-o", str(output), str(SOURCE)]


def cache_root() -> Path:
    """Directory holding the built libraries ($XDG_CACHE_HOME or ~/.cache, then sparsify/kernels)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsify" / "kernels"


def build(arch: tuple[int, int], nvcc: str | None = None) -> Path:
    """Compile the kernels for ``arch`` unless a cached build exists; return the .so path.

    The cache key hashes the source, the header, the architecture, the nvcc version text and the
    flags, so any change to one of them builds anew. Writes go to a temporary file renamed into
    place, so concurrent builders never load a half-written library.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), HEADER.read_bytes(), repr(arch).encode(),
                 nvcc_version(nvcc).encode(), repr(NVCC_FLAGS).encode()):
        h.update(part)
        h.update(b"\0")
    out_dir = cache_root() / h.hexdigest()[:20]
    lib = out_dir / "sparse_gemv.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = compile_command(nvcc, arch, Path(tmp))
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
    os.replace(tmp, lib)
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.sparsify_gemv_workspace_bytes.argtypes = [i, i]
    lib.sparsify_gemv_workspace_bytes.restype = z
    # wtype, w, scales, x, factor, threshold, y, k, n, workspace, workspace_bytes, variant,
    # blocks_per_sm, stream
    lib.sparsify_gemv_tuned.argtypes = [i, p, p, p, p, p, p, i, i, p, z, i, i, p]
    lib.sparsify_gemv_tuned.restype = i
    lib.sparsify_gemv_error_string.argtypes = [i]
    lib.sparsify_gemv_error_string.restype = ctypes.c_char_p
    return lib


def load(device: torch.device | int | None = None) -> ctypes.CDLL:
    """The kernel library built for ``device``'s architecture (built and cached on first use)."""
    if not torch.cuda.is_available():
        raise RuntimeError("sparse GEMV CUDA kernels need a CUDA device; none is available")
    arch = tuple(torch.cuda.get_device_capability(device))
    with _lock:
        lib = _libs.get(arch)
        if lib is None:
            lib = _bind(ctypes.CDLL(str(build(arch))))
            _libs[arch] = lib
    return lib


def workspace_bytes(k: int, n: int) -> int:
    """Workspace bytes a (K, N) call needs, for any weight format and device."""
    return int(load().sparsify_gemv_workspace_bytes(int(k), int(n)))


def make_workspace(k: int, n: int, device: torch.device | int | str) -> torch.Tensor:
    """A zeroed uint8 CUDA tensor usable as ``workspace`` for calls up to (K, N).

    Pass one per stream when GEMVs may run concurrently on several streams, or to fix the
    workspace before capturing a CUDA graph.
    """
    return torch.zeros(workspace_bytes(k, n), dtype=torch.uint8, device=device)


def _default_workspace(k: int, n: int, device: torch.device) -> torch.Tensor:
    need = workspace_bytes(k, n)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        ws = _workspaces.get(idx)
        if ws is not None and ws.numel() >= need:
            return ws
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"sparse GEMV workspace for (K={k}, N={n}) needs {need} bytes and none that large "
                "exists yet; call once with this shape before capturing the graph, or pass "
                "workspace=make_workspace(...)")
        if ws is not None:
            _retired.append(ws)
        ws = torch.zeros(need, dtype=torch.uint8, device=device)
        _workspaces[idx] = ws
        return ws


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"sparse_gemv: {msg}")


def _check_vec(t: torch.Tensor, name: str, shape: tuple, device: torch.device) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor")
    _check(t.device == device, f"{name} is on {t.device}, the weights on {device}")
    _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    _check(tuple(t.shape) == shape, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _check(t.is_contiguous(), f"{name} must be contiguous")
    _check(t.data_ptr() % 4 == 0, f"{name} must be 4-byte aligned")


def sparse_gemv(
    w: torch.Tensor,
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    *,
    factor: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    variant: int = 0,
    blocks_per_sm: int = 0,
) -> torch.Tensor:
    """``y[n] = sum_i w[i, n] * x[i] * keep[i]`` with ``keep[i] = NOT(score[i] <= threshold)``.

    Args:
        w: (K, N) input-major weights on a CUDA device, contiguous; float16, bfloat16, or int8
            (symmetric, value = w * scale).
        x: (K,) float32 activations, same device.
        threshold: a float32 CUDA tensor with one element (read by the kernel when it runs, so a
            captured graph follows later writes to it) or a Python float.
        factor: optional (K,) float32 score factor (weight-aware criterion); None: ``|x|``.
        scales: int8 only, (K, ceil(N / INT8_GROUP)) float32, one per group of outputs.
        out: optional (N,) float32 output; allocated when None. Every element is written.
        workspace: optional uint8 CUDA tensor from ``make_workspace``; default: one per device,
            grown outside graph capture. Concurrent streams need their own.
        variant, blocks_per_sm: launch configuration for benchmarks (see sparse_gemv.h).

    Returns:
        ``out``: (N,) float32. Launched asynchronously on torch's current stream of ``w``'s
        device; no host synchronisation.
    """
    _check(isinstance(w, torch.Tensor) and w.is_cuda, "w must be a CUDA tensor")
    _check(w.dtype in _WTYPE, f"w must be float16, bfloat16 or int8, got {w.dtype}")
    _check(w.dim() == 2, f"w must be 2-D (K, N), got shape {tuple(w.shape)}")
    _check(w.is_contiguous(), "w must be contiguous (input-major, row i = weights of x[i])")
    _check(w.data_ptr() % w.element_size() == 0, "w must be aligned to its element size")
    k, n = w.shape
    _check(k < 2**31 and n < 2**31, f"K={k} and N={n} must each fit in int32")
    dev = w.device
    _check_vec(x, "x", (k,), dev)
    if factor is not None:
        _check_vec(factor, "factor", (k,), dev)
    if w.dtype == torch.int8:
        _check(scales is not None, "int8 weights need scales")
        groups = -(-n // INT8_GROUP)
        _check_vec(scales, "scales", (k, groups), dev)
    else:
        _check(scales is None, f"scales are only for int8 weights, not {w.dtype}")
    if isinstance(threshold, torch.Tensor):
        _check(threshold.numel() == 1, "threshold tensor must have exactly one element")
        _check_vec(threshold.reshape(()), "threshold", (), dev)
    else:
        threshold = torch.full((1,), float(threshold), dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=dev)
    else:
        _check_vec(out, "out", (n,), dev)
    if workspace is None:
        workspace = _default_workspace(k, n, dev)
    else:
        _check(workspace.device == dev, f"workspace is on {workspace.device}, not {dev}")
        _check(workspace.dtype == torch.uint8 and workspace.is_contiguous(),
               "workspace must be a contiguous uint8 tensor")
        _check(workspace.data_ptr() % 16 == 0, "workspace must be 16-byte aligned")
        _check(workspace.numel() >= workspace_bytes(k, n),
               f"workspace has {workspace.numel()} bytes, (K={k}, N={n}) needs "
               f"{workspace_bytes(k, n)}")
    lib = load(dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.sparsify_gemv_tuned(
            _WTYPE[w.dtype], w.data_ptr(), scales.data_ptr() if scales is not None else None,
            x.data_ptr(), factor.data_ptr() if factor is not None else None,
            threshold.data_ptr(), out.data_ptr(), k, n, workspace.data_ptr(),
            workspace.numel(), variant, blocks_per_sm, stream)
    if rc != 0:
        msg = lib.sparsify_gemv_error_string(rc).decode()
        raise RuntimeError(f"sparse_gemv launch failed (K={k}, N={n}, {w.dtype}): {msg}")
    return out


def dense_gemv(w_out_major: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dense reference path through cuBLAS: ``w_out_major`` (N, K) fp16/bf16, x (K,) -> (N,).

    ``x`` is cast to the weight dtype (as a dense fp16 engine would); the result is float32.
    """
    out = torch.nn.functional.linear(x.to(w_out_major.dtype), w_out_major)
    return out.float()
