"""CUDA kernels for batch-1 decode: build the ``.cu`` sources, load with ctypes, call from torch.

``sparse_gemv`` computes ``y = W^T (x * keep)`` with ``keep = NOT(score(x) <= t)``, ``score = |x|``
or ``|x| * factor``, for input-major weights ``W`` of shape (K, N) (row i multiplies ``x[i]``), in
fp16, bf16 or int8 with float32 scales per group of ``INT8_GROUP`` outputs; ``sparse_gemv_group``
does several such products of one x in one launch, and both take a gated input
``act(x) * up``. ``add_rms_norm`` and ``attention_decode`` are the rest of a decoder block for
one token. See ``sparse_gemv.h`` and ``decode_ops.h`` for the full contracts; this module adds
argument checks and launches on torch's current stream. Plain torch references for every kernel
are in :mod:`.reference_ops`.

The shared library is compiled with nvcc for the device's own architecture on first use and cached
under ``~/.cache/sparsify/kernels/<hash of source, header, arch, nvcc version and flags>/``.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
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
SOURCES = (SOURCE, HERE / "decode_ops.cu")
HEADERS = (HEADER, HERE / "decode_ops.h", HERE / "common.cuh")
MAX_SEGMENTS = 3
"""Segments per grouped GEMV launch (SPARSIFY_GEMV_MAX_SEGMENTS)."""
ACTS = {"silu": 1, "gelu_tanh": 2}
"""Gated-input activations (SPARSIFY_GEMV_ACT_*)."""
SM90_VARIANTS = frozenset({3, 14, 15, 16, 17})
"""Launch variants of sparsify_gemv_tuned that need compute capability 9.0 (thread-block
clusters); below it they return cudaErrorNotSupported."""

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


def compile_command(nvcc: str, arch: tuple[int, int], output: Path, shared: bool = True,
                    source: Path | None = None) -> list:
    """nvcc command line for ``arch``: every source into the shared library ``output``, or
    (``shared=False``) one ``source`` (default SOURCE) into the object file ``output``."""
    if shared:
        return [nvcc, *NVCC_FLAGS, gencode(arch), "--shared", "-o", str(output),
                *map(str, SOURCES)]
    return [nvcc, *NVCC_FLAGS, gencode(arch), "-c", "-o", str(output), str(source or SOURCE)]


def cache_root() -> Path:
    """Directory of the built libraries ($XDG_CACHE_HOME or ~/.cache, then sparsify/kernels)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsify" / "kernels"


def build(arch: tuple[int, int], nvcc: str | None = None) -> Path:
    """Compile the kernels for ``arch`` unless a cached build exists; return the .so path.

    The cache key hashes the sources, the headers, the architecture, the nvcc version text and
    the flags, so any change to one of them builds anew. Writes go to a temporary file renamed into
    place, so concurrent builders never load a half-written library.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    h = hashlib.sha256()
    parts = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
    for part in (*parts, repr(arch).encode(), nvcc_version(nvcc).encode(),
                 repr(NVCC_FLAGS).encode()):
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


class _Segment(ctypes.Structure):
    """sparsify_gemv_segment (sparse_gemv.h)."""

    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("factor", ctypes.c_void_p),
                ("threshold", ctypes.c_void_p), ("y", ctypes.c_void_p), ("n", ctypes.c_int)]


class _Input(ctypes.Structure):
    """sparsify_gemv_input (sparse_gemv.h)."""

    _fields_ = [("x", ctypes.c_void_p), ("x_up", ctypes.c_void_p), ("act", ctypes.c_int),
                ("norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float),
                ("accumulate", ctypes.c_int), ("x_parts", ctypes.c_int),
                ("x_stride", ctypes.c_int), ("y_parts", ctypes.c_int),
                ("y_stride", ctypes.c_int)]


class _NextRows(ctypes.Structure):
    """sparsify_next_rows (decode_ops.h)."""

    _fields_ = [("w", ctypes.c_void_p), ("row_bytes", ctypes.c_size_t),
                ("scales", ctypes.c_void_p), ("scale_row", ctypes.c_int),
                ("factor", ctypes.c_void_p), ("threshold", ctypes.c_void_p)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, z, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_float
    lib.sparsify_gemv_workspace_bytes.argtypes = [i, i]
    lib.sparsify_gemv_workspace_bytes.restype = z
    lib.sparsify_gemv_group_workspace_bytes.argtypes = [i, ctypes.POINTER(i), i]
    lib.sparsify_gemv_group_workspace_bytes.restype = z
    # wtype, segments, nseg, x, x_up, act, k, workspace, workspace_bytes, stream
    lib.sparsify_gemv_group.argtypes = [i, ctypes.POINTER(_Segment), i, p, p, i, i, p, z, p]
    lib.sparsify_gemv_group.restype = i
    # wtype, segments, nseg, input, k, workspace, workspace_bytes, stream
    lib.sparsify_gemv_group_ex.argtypes = [i, ctypes.POINTER(_Segment), i,
                                           ctypes.POINTER(_Input), i, p, z, p]
    lib.sparsify_gemv_group_ex.restype = i
    # wtype, segments, nseg, input, k, splits (out)
    lib.sparsify_gemv_group_splits.argtypes = [i, ctypes.POINTER(_Segment), i,
                                               ctypes.POINTER(_Input), i, ctypes.POINTER(i)]
    lib.sparsify_gemv_group_splits.restype = i
    # h, r, post_w, w, x, d, eps, stream
    lib.sparsify_add_rms_norm.argtypes = [p, p, p, p, p, i, f, p]
    lib.sparsify_add_rms_norm.restype = i
    # qkv, kc, vc, pos, cos, sin, perm, q_norm, k_norm, out, n_head, n_head_kv, dk, dv, max_len,
    # window, scale, eps, stream
    lib.sparsify_attention_decode.argtypes = [p] * 10 + [i] * 6 + [f, f, p]
    lib.sparsify_attention_decode.restype = i
    # qkv, qkv_parts, qkv_stride, then as sparsify_attention_decode from kc on
    lib.sparsify_attention_decode_parts.argtypes = [p, i, i] + [p] * 9 + [i] * 6 + [f, f, p]
    lib.sparsify_attention_decode_parts.restype = i
    # as sparsify_attention_decode_parts, then next (sparsify_next_rows *), flags, stream
    lib.sparsify_attention_decode_ex.argtypes = ([p, i, i] + [p] * 9 + [i] * 6 + [f, f]
                                                 + [ctypes.POINTER(_NextRows), i, p])
    lib.sparsify_attention_decode_ex.restype = i
    # as sparsify_attention_decode_ex up to flags, then splits, workspace, workspace_bytes, stream
    lib.sparsify_attention_decode_split.argtypes = ([p, i, i] + [p] * 9 + [i] * 6 + [f, f]
                                                    + [ctypes.POINTER(_NextRows), i, i, p, z, p])
    lib.sparsify_attention_decode_split.restype = i
    lib.sparsify_attention_smem_bytes.argtypes = [i, i, i]
    lib.sparsify_attention_smem_bytes.restype = z
    lib.sparsify_attention_workspace_bytes.argtypes = [i, i, i]
    lib.sparsify_attention_workspace_bytes.restype = z
    # dk, dv, max_len, n_head, n_head_kv, splits, flags
    lib.sparsify_attention_launch_smem_bytes.argtypes = [i] * 7
    lib.sparsify_attention_launch_smem_bytes.restype = z
    lib.sparsify_attention_split_keys.argtypes = [i, i, i, i]  # n_head, n_head_kv, splits, flags
    lib.sparsify_attention_split_keys.restype = i
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


def group_workspace_bytes(k: int, ns: list[int]) -> int:
    """Workspace bytes a grouped call (K inputs, segment widths ``ns``) needs."""
    arr = (ctypes.c_int * len(ns))(*[int(n) for n in ns])
    return int(load().sparsify_gemv_group_workspace_bytes(int(k), arr, len(ns)))


def _default_workspace(k: int, n: int, device: torch.device, need: int | None = None
                       ) -> torch.Tensor:
    need = workspace_bytes(k, n) if need is None else need
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


def _check_weights(w: torch.Tensor, name: str = "w") -> tuple[int, int]:
    _check(isinstance(w, torch.Tensor) and w.is_cuda, f"{name} must be a CUDA tensor")
    _check(w.dtype in _WTYPE, f"{name} must be float16, bfloat16 or int8, got {w.dtype}")
    _check(w.dim() == 2, f"{name} must be 2-D (K, N), got shape {tuple(w.shape)}")
    _check(w.is_contiguous(),
           f"{name} must be contiguous (input-major, row i = weights of x[i])")
    _check(w.data_ptr() % w.element_size() == 0, f"{name} must be aligned to its element size")
    k, n = w.shape
    _check(k < 2**31 and n < 2**31, f"K={k} and N={n} must each fit in int32")
    return k, n


def _check_segment(w, threshold, factor, scales, out, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks one (weights, threshold, factor, scales, out) set; returns (threshold, out)."""
    k, n = w.shape
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
    return threshold, out


def _check_workspace(workspace: torch.Tensor, need: int, dev: torch.device, shape: str) -> None:
    _check(workspace.device == dev, f"workspace is on {workspace.device}, not {dev}")
    _check(workspace.dtype == torch.uint8 and workspace.is_contiguous(),
           "workspace must be a contiguous uint8 tensor")
    _check(workspace.data_ptr() % 16 == 0, "workspace must be 16-byte aligned")
    _check(workspace.numel() >= need,
           f"workspace has {workspace.numel()} bytes, {shape} needs {need}")


def _check_gate(up: torch.Tensor | None, act: str | None, k: int, dev: torch.device) -> int:
    """The gated-input arguments as the kernel's act code (0: plain input)."""
    if up is None:
        _check(act is None, "act needs up (the gated input is act(x) * up)")
        return 0
    _check(act in ACTS, f"act must be one of {sorted(ACTS)} with up, got {act!r}")
    _check_vec(up, "up", (k,), dev)
    return ACTS[act]


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to the end of its last (strided views included)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """True when the memory spans of ``a`` and ``b`` intersect."""
    if b is None:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _extent(b) and b0 < a0 + _extent(a)


def _check_rows(t: torch.Tensor, name: str, width: int, dev: torch.device) -> tuple[int, int]:
    """A (width,) vector, or (P, width) partial rows with unit column stride: (P, row stride)."""
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor")
    if t.dim() != 2:
        _check_vec(t, name, (width,), dev)
        return 1, 0
    _check(t.device == dev, f"{name} is on {t.device}, the weights on {dev}")
    _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    parts, w = t.shape
    _check(w == width and parts >= 1,
           f"{name} must have shape ({width},) or (parts, {width}), got {tuple(t.shape)}")
    _check(t.stride(1) == 1 and (parts == 1 or t.stride(0) >= width),
           f"{name}: partial rows need unit column stride and rows at least {width} apart")
    _check(t.stride(0) < 2**31, f"{name}: row stride must fit in int32")
    _check(t.data_ptr() % 4 == 0, f"{name} must be 4-byte aligned")
    return parts, (t.stride(0) if parts > 1 else 0)


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _raise_on(rc: int, what: str) -> None:
    if rc != 0:
        msg = load().sparsify_gemv_error_string(rc).decode()
        raise RuntimeError(f"{what} failed: {msg}")


def sparse_gemv(
    w: torch.Tensor,
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    *,
    factor: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    act: str | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    accumulate: bool = False,
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
        up, act: gated input: with ``up`` (K,) float32 and ``act`` "silu" or "gelu_tanh", the
            input is ``act(x) * up`` (computed in the kernel, thresholded as the input).
        norm, eps: normed input: with ``norm`` (K,) float32 the input is the RMS norm
            ``x * rsqrt(mean(x^2) + eps) * norm`` (computed in the kernel; exclusive with ``up``).
        accumulate: add the result into ``out`` (which must then be given and hold values)
            instead of overwriting it: a residual add inside the projection.
        With ``up``, ``x`` and ``up`` may also be (P, K) partial rows that the kernel adds
        first (see :func:`sparse_gemv_group`).
        variant, blocks_per_sm: launch configuration for benchmarks (see sparse_gemv.h); plain
            inputs only.

    Returns:
        ``out``: (N,) float32. Launched asynchronously on torch's current stream of ``w``'s
        device; no host synchronisation.
    """
    if up is not None or act is not None or norm is not None or accumulate:
        _check(variant == 0 and blocks_per_sm == 0,
               "a gated or normed input, or accumulate, runs the default launch")
        return sparse_gemv_group([w], x, [threshold], [out],
                                 factors=[factor], scales=[scales], up=up, act=act,
                                 norm=norm, eps=eps, accumulate=accumulate,
                                 workspace=workspace)[0]
    k, n = _check_weights(w)
    dev = w.device
    _check_vec(x, "x", (k,), dev)
    threshold, out = _check_segment(w, threshold, factor, scales, out, dev)
    _check(not _overlap(out, x), "out must not overlap the input x")
    if workspace is None:
        workspace = _default_workspace(k, n, dev)
    else:
        _check_workspace(workspace, workspace_bytes(k, n), dev, f"(K={k}, N={n})")
    lib = load(dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.sparsify_gemv_tuned(
            _WTYPE[w.dtype], w.data_ptr(), _ptr(scales), x.data_ptr(), _ptr(factor),
            threshold.data_ptr(), out.data_ptr(), k, n, workspace.data_ptr(),
            workspace.numel(), variant, blocks_per_sm, stream)
    _raise_on(rc, f"sparse_gemv launch (K={k}, N={n}, {w.dtype})")
    return out


def sparse_gemv_group(
    ws: list[torch.Tensor],
    x: torch.Tensor,
    thresholds: list[torch.Tensor | float],
    outs: list[torch.Tensor | None] | None = None,
    *,
    factors: list[torch.Tensor | None] | None = None,
    scales: list[torch.Tensor | None] | None = None,
    up: torch.Tensor | None = None,
    act: str | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    accumulate: bool = False,
    workspace: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Several ``sparse_gemv`` products of one input in one launch (at most ``MAX_SEGMENTS``).

    Segment j is ``y_j = w_j^T (x * keep_j)`` with its own (K, N_j) weights (all the same dtype
    and K), threshold, factor and int8 scales; ``outs[j]`` (N_j,) float32 or None (allocated).
    ``up``/``act`` make the shared input gated, ``norm``/``eps`` RMS-normed, and ``accumulate``
    adds into the outputs, as in :func:`sparse_gemv`. Returns the outputs.

    Partial rows (a deferred split-K reduction, sparse_gemv.h): ``x`` (and ``up``) may be
    (P, K) views with unit column stride, whose P rows are added to form the input (not with
    ``norm``); and every ``outs[j]`` may be a (S, N_j) view, all with one row stride, into
    which split s writes its unreduced sums, S being :func:`group_splits` for the same call
    (not with ``accumulate``).
    """
    nseg = len(ws)
    _check(1 <= nseg <= MAX_SEGMENTS, f"1 to {MAX_SEGMENTS} segments, got {nseg}")
    outs = list(outs) if outs is not None else [None] * nseg
    factors = list(factors) if factors is not None else [None] * nseg
    scales = list(scales) if scales is not None else [None] * nseg
    _check(len(thresholds) == nseg and len(outs) == nseg and len(factors) == nseg
           and len(scales) == nseg, "one threshold, out, factor and scales entry per segment")
    k, dev, inp = _group_input(ws, x, up, act, norm, eps)
    if accumulate:
        _check(all(o is not None for o in outs), "accumulate adds into outs: give every out")
    y_parts, y_stride = 0, 0
    if any(o is not None and o.dim() == 2 for o in outs):
        _check(not accumulate, "partial outputs (2-D outs) are stores: no accumulate")
        rows = [_check_rows(o, f"outs[{j}]", int(w.shape[1]), dev) if o is not None else None
                for j, (o, w) in enumerate(zip(outs, ws))]
        _check(all(r is not None and outs[j].dim() == 2 for j, r in enumerate(rows)),
               "partial outputs: every out must be a 2-D (splits, N_j) view")
        y_parts = rows[0][0]
        strides = {r[1] for r in rows if r[0] > 1}
        _check(len(strides) <= 1, "partial outputs: every out needs the same row stride")
        _check(all(r[0] == y_parts for r in rows), "partial outputs: one row count for all outs")
        want = _splits(ws, inp, k, dev)
        _check(y_parts == want, f"partial outputs need {want} rows (the launch's splits), "
               f"got {y_parts}")
        y_stride = strides.pop() if strides else 0
    segs = (_Segment * nseg)()
    checked_thr = []
    for j, w in enumerate(ws):
        o = outs[j]
        if y_parts:  # checked above as rows; _check_segment sees row 0
            t, _ = _check_segment(w, thresholds[j], factors[j], scales[j], o[0], dev)
        else:
            t, o = _check_segment(w, thresholds[j], factors[j], scales[j], o, dev)
        checked_thr.append(t)  # keeps a temporary threshold alive through the launch
        outs[j] = o
        _check(not any(_overlap(o, t) for t in (x, up, norm)),
               f"outs[{j}] must not overlap the input (x, up or norm)")
        segs[j] = _Segment(w.data_ptr(), _ptr(scales[j]), _ptr(factors[j]), t.data_ptr(),
                           o.data_ptr(), int(w.shape[1]))
    ns = [int(w.shape[1]) for w in ws]
    need = group_workspace_bytes(k, ns)
    if workspace is None:
        workspace = _default_workspace(k, sum(ns), dev, need)
    else:
        _check_workspace(workspace, need, dev, f"(K={k}, N={ns})")
    lib = load(dev)
    inp.accumulate = int(bool(accumulate))
    inp.y_parts, inp.y_stride = y_parts, y_stride
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.sparsify_gemv_group_ex(_WTYPE[ws[0].dtype], segs, nseg, ctypes.byref(inp), k,
                                        workspace.data_ptr(), workspace.numel(), stream)
    _raise_on(rc, f"sparse_gemv_group launch (K={k}, N={ns}, {ws[0].dtype})")
    return outs


def _group_input(ws, x, up, act, norm, eps) -> tuple[int, torch.device, _Input]:
    """Checks the weights and the shared input of a grouped call; returns (K, device, input)."""
    k, _ = _check_weights(ws[0], "ws[0]")
    dev = ws[0].device
    for j, w in enumerate(ws):
        kj, _ = _check_weights(w, f"ws[{j}]")
        _check(w.device == dev, f"ws[{j}] is on {w.device}, ws[0] on {dev}")
        _check(w.dtype == ws[0].dtype, f"ws[{j}] is {w.dtype}, ws[0] {ws[0].dtype}")
        _check(kj == k, f"ws[{j}] has K={kj}, ws[0] K={k}")
    x_parts, x_stride = _check_rows(x, "x", k, dev)
    if up is not None and up.dim() == 2:
        _check(act in ACTS, f"act must be one of {sorted(ACTS)} with up, got {act!r}")
        _check(_check_rows(up, "up", k, dev) == (x_parts, x_stride),
               "up must have the rows (count and stride) of x")
        code = ACTS[act]
    else:
        _check(up is None or x_parts == 1, "partial rows of x need up in the same rows")
        code = _check_gate(up, act, k, dev)
    if norm is not None:
        _check(up is None, "an input is either gated (up) or normed (norm), not both")
        _check(x_parts == 1, "a normed input is one row of x, not partial rows")
        _check_vec(norm, "norm", (k,), dev)
        _check(math.isfinite(eps) and eps >= 0.0, f"eps must be finite and >= 0, got {eps}")
    inp = _Input(x.data_ptr(), _ptr(up), code, _ptr(norm), float(eps), 0,
                 x_parts if x_parts > 1 else 0, x_stride, 0, 0)
    return k, dev, inp


def group_splits(ws: list[torch.Tensor], x: torch.Tensor, *, up: torch.Tensor | None = None,
                 act: str | None = None, norm: torch.Tensor | None = None) -> int:
    """Rows of partial outputs :func:`sparse_gemv_group` writes for these weights and input on
    this device (its split count; ``sparsify_gemv_group_splits``). Nothing is launched."""
    _check(1 <= len(ws) <= MAX_SEGMENTS, f"1 to {MAX_SEGMENTS} segments, got {len(ws)}")
    k, dev, inp = _group_input(ws, x, up, act if up is not None else None, norm, 0.0)
    return _splits(ws, inp, k, dev)


def _splits(ws: list[torch.Tensor], inp: _Input, k: int, dev: torch.device) -> int:
    """The split count of a grouped launch whose weights and input are already checked."""
    segs = (_Segment * len(ws))()
    for j, w in enumerate(ws):
        segs[j] = _Segment(w.data_ptr(), None, None, None, None, int(w.shape[1]))
    out = ctypes.c_int(0)
    lib = load(dev)
    with torch.cuda.device(dev):
        rc = lib.sparsify_gemv_group_splits(_WTYPE[ws[0].dtype], segs, len(ws),
                                            ctypes.byref(inp), k, ctypes.byref(out))
    _raise_on(rc, f"sparsify_gemv_group_splits (K={k})")
    return int(out.value)


def add_rms_norm(h: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor, post_weight: torch.Tensor | None = None) -> torch.Tensor:
    """In place ``h += r'`` (``r' = r``, or ``rms_norm(r) * post_weight``), then
    ``out = h * rsqrt(mean(h^2) + eps) * weight``; all (d,) float32 on one CUDA device.

    ``r=None`` skips the add. ``out`` must be a buffer of its own. Returns ``out``.
    """
    _check(isinstance(h, torch.Tensor) and h.is_cuda, "h must be a CUDA tensor")
    dev = h.device
    (d,) = h.shape if h.dim() == 1 else (None,)
    _check(d is not None and d >= 1, f"h must be 1-D and non-empty, got {tuple(h.shape)}")
    for t, name in ((h, "h"), (weight, "weight"), (out, "out"), (r, "r"),
                    (post_weight, "post_weight")):
        if t is not None:
            _check_vec(t, name, (d,), dev)
    _check(post_weight is None or r is not None, "post_weight needs r")
    others = {h.data_ptr(), weight.data_ptr()} | ({r.data_ptr()} if r is not None else set())
    _check(out.data_ptr() not in others, "out must not alias h, r or weight")
    lib = load(dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.sparsify_add_rms_norm(h.data_ptr(), _ptr(r), _ptr(post_weight),
                                       weight.data_ptr(), out.data_ptr(), d, float(eps), stream)
    _raise_on(rc, f"add_rms_norm launch (d={d})")
    return out


def attention_supported(dk: int, dv: int, max_len: int, device: torch.device | int | str, *,
                        n_head: int | None = None, n_head_kv: int | None = None,
                        splits: int = 1, group_heads: bool = False,
                        cache_dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`attention_decode` runs these sizes on ``device`` (see decode_ops.h) with a
    cache of ``cache_dtype`` (float32 or float16): with the head counts, for a launch with
    ``splits`` and ``group_heads`` as given; without them, for every ``splits`` without
    grouping (the unsplit launch needs the most shared memory)."""
    if dk % 4 or dv % 4 or not (0 < dk <= 512 and 0 < dv <= 512) or max_len < 1:
        return False
    if cache_dtype not in CACHE_DTYPES:
        return False
    flags = _attn_flags(group_heads=group_heads, cache_dtype=cache_dtype)
    if n_head is None:
        n_head, n_head_kv, splits = 1, 1, 1
    smem = int(load(device).sparsify_attention_launch_smem_bytes(
        dk, dv, max_len, int(n_head), int(n_head_kv or n_head), int(splits), flags))
    if smem == 0:
        return False
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    # room for the kernels' static shared memory: 0.6 KB, grouped 5.3 KB at most
    return smem + (6 if group_heads else 1) * 1024 <= limit


MAX_ATTN_SPLITS = 64  # decode_ops.h
MAX_GROUP_HEADS = 8
"""Query heads per key/value head that ``group_heads`` takes (decode_ops.cu)."""
ATTN_PREFETCH_CACHE = 1  # SPARSIFY_ATTN_PREFETCH_CACHE
ATTN_GROUP_HEADS = 2  # SPARSIFY_ATTN_GROUP_HEADS
ATTN_CACHE_F16 = 4  # SPARSIFY_ATTN_CACHE_F16
CACHE_DTYPES = (torch.float32, torch.float16)
"""Element types of the KV cache :func:`attention_decode` reads and writes."""


def _attn_flags(*, prefetch_cache: bool = False, group_heads: bool = False,
                cache_dtype: torch.dtype = torch.float32) -> int:
    return ((ATTN_PREFETCH_CACHE if prefetch_cache else 0)
            | (ATTN_GROUP_HEADS if group_heads else 0)
            | (ATTN_CACHE_F16 if cache_dtype == torch.float16 else 0))


def attention_splits(n_head: int, device: torch.device | int | str) -> int:
    """Key-range splits per head that fill ``device`` without queueing blocks: the largest s
    with n_head * s <= multiprocessors (at least 1, at most MAX_ATTN_SPLITS). For
    ``group_heads`` launches pass the key/value head count: their blocks are per group."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_ATTN_SPLITS, sms // max(1, int(n_head))))


def attention_split_keys(splits: int, device: torch.device | int | str | None = None, *,
                         n_head: int = 1, n_head_kv: int = 1, group_heads: bool = False) -> int:
    """Keys a split-KV range takes at least in a launch with ``splits`` (the kernel's own rule,
    SPARSIFY_ATTN_SPLIT_KEYS included, read now; with ``group_heads``, 256 query-key pairs per
    block make ceil(256 / heads per group) keys): such a launch uses more than one range from
    twice this many visible keys on."""
    _check(1 <= splits <= MAX_ATTN_SPLITS, f"splits must be 1 to {MAX_ATTN_SPLITS}, got {splits}")
    keys = int(load(device).sparsify_attention_split_keys(
        int(n_head), int(n_head_kv), int(splits), _attn_flags(group_heads=group_heads)))
    _check(keys > 0, f"no split rule for n_head={n_head}, n_head_kv={n_head_kv}")
    return keys


def attention_workspace(n_head: int, dv: int, splits: int, device: torch.device | int | str
                        ) -> torch.Tensor:
    """A zeroed uint8 CUDA tensor for :func:`attention_decode` with ``splits`` > 1."""
    need = int(load(device).sparsify_attention_workspace_bytes(int(n_head), int(dv), int(splits)))
    _check(need > 0, f"no attention workspace for n_head={n_head}, dv={dv}, splits={splits}")
    return torch.zeros(need, dtype=torch.uint8, device=device)


def attention_decode(qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor, out: torch.Tensor,
                     *, n_head: int, scale: float, eps: float = 0.0, window: int = 0,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                     next_w: torch.Tensor | None = None, next_threshold: torch.Tensor | None = None,
                     next_scales: torch.Tensor | None = None,
                     next_factor: torch.Tensor | None = None,
                     prefetch_cache: bool = False, splits: int = 1,
                     workspace: torch.Tensor | None = None,
                     group_heads: bool = False) -> torch.Tensor:
    """Attention of one query position over the cache, RoPE and the cache write included.

    Args:
        qkv: (n_head*dk + n_head_kv*(dk + dv),) float32: q heads, k heads, v heads; or
            (P, that width) with unit column stride: P partial rows (the unreduced splits of a
            q/k/v GEMV with partial outputs), added in the kernel.
        kc, vc: (n_head_kv, max_len, dk) and (n_head_kv, max_len, dv) caches, both float32
            or both float16; position ``pos`` is written (k normed and rotated, v as is;
            float16 rounded to nearest, and the step itself then uses the rounded new key and
            value, as later steps read them back). Sums are float32 either way.
        pos: (1,) int64 device position, read when the kernel runs.
        cos, sin: (max_len, dk) float32 RoPE tables, perm (dk,) int32 partner index:
            ``x' = x * cos[pos] + x[perm] * sin[pos]``.
        out: (n_head * dv,) float32 result, head-major.
        scale: multiplies q.k; window: sliding window (0: causal only); q_norm/k_norm: (dk,)
            per-head RMS-norm weights applied before RoPE (both or neither), with ``eps``.
        next_w, next_threshold, next_scales, next_factor: the projection that reads ``out``
            next, as :func:`sparse_gemv` takes it ((n_head * dv, N) input-major weights, its
            (1,) threshold, int8 scales, weight-aware factor): the rows it will keep are
            prefetched into L2 as each head finishes.
        prefetch_cache: prefetch into L2, before waiting for the previous kernel, the cache
            rows before ``pos`` that the heads will read.
        splits, workspace: split-KV (decode_ops.h): up to ``splits`` blocks per head, each over
            a range of at least 256 visible keys, combined by the head's last block;
            ``workspace`` from :func:`attention_workspace` (needed when ``splits`` > 1, one per
            launch that may run concurrently). Below 512 visible keys (one range) the result is
            bit for bit the unsplit one; beyond, it differs only in rounding.
        group_heads: one block per key/value head and range works out all the group's query
            heads (at most ``MAX_GROUP_HEADS``), reading each cache row once per group;
            ``splits`` then counts ranges per key/value head. With one range the result is bit
            for bit the unsplit one's.
        The prefetches are hints only: ``out`` and the caches come out the same.
    """
    _check(isinstance(kc, torch.Tensor) and kc.is_cuda, "kc must be a CUDA tensor")
    dev = kc.device
    _check(kc.dim() == 3 and vc.dim() == 3, "kc and vc must be (n_head_kv, max_len, dim)")
    hkv, L, dk = kc.shape
    dv = vc.shape[2]
    _check(tuple(vc.shape[:2]) == (hkv, L), f"vc shape {tuple(vc.shape)} does not match kc's")
    _check(n_head >= 1 and n_head % hkv == 0, f"n_head {n_head} is not a multiple of {hkv}")
    for t, name in ((kc, "kc"), (vc, "vc")):
        _check(t.dtype in CACHE_DTYPES and t.is_contiguous() and t.device == dev,
               f"{name} must be contiguous float32 or float16 on {dev}")
    _check(vc.dtype == kc.dtype, f"vc is {vc.dtype} but kc is {kc.dtype}")
    parts, stride = _check_rows(qkv, "qkv", n_head * dk + hkv * (dk + dv), dev)
    _check_vec(out, "out", (n_head * dv,), dev)
    _check_vec(cos, "cos", (L, dk), dev)
    _check_vec(sin, "sin", (L, dk), dev)
    _check(pos.device == dev and pos.dtype == torch.int64 and pos.numel() == 1,
           "pos must be one int64 on the cache's device")
    _check(perm.device == dev and perm.dtype == torch.int32 and tuple(perm.shape) == (dk,)
           and perm.is_contiguous(), f"perm must be contiguous int32 ({dk},)")
    _check((q_norm is None) == (k_norm is None), "q_norm and k_norm go together")
    if q_norm is not None:
        _check_vec(q_norm, "q_norm", (dk,), dev)
        _check_vec(k_norm, "k_norm", (dk,), dev)
    _check(window >= 0, f"window must be >= 0, got {window}")
    if group_heads:
        _check(n_head // hkv <= MAX_GROUP_HEADS,
               f"group_heads takes at most {MAX_GROUP_HEADS} query heads per key/value head, "
               f"not {n_head // hkv}")
    _check(1 <= splits <= MAX_ATTN_SPLITS, f"splits must be 1 to {MAX_ATTN_SPLITS}, got {splits}")
    _check(attention_supported(dk, dv, L, dev, n_head=n_head, n_head_kv=hkv, splits=int(splits),
                               group_heads=group_heads, cache_dtype=kc.dtype),
           f"attention_decode does not run dk={dk}, dv={dv}, max_len={L} (decode_ops.h limits)")
    nxt = None
    if next_w is not None:
        rows = n_head * dv
        _check(next_threshold is not None, "next_w needs next_threshold")
        _check(next_w.device == dev and next_w.dim() == 2 and next_w.shape[0] == rows
               and next_w.is_contiguous() and next_w.dtype in _WTYPE,
               f"next_w must be contiguous fp16/bf16/int8 ({rows}, N) on {dev}")
        _check_vec(next_threshold, "next_threshold", (1,), dev)
        if next_factor is not None:
            _check_vec(next_factor, "next_factor", (rows,), dev)
        _check((next_scales is not None) == (next_w.dtype == torch.int8),
               "next_scales go with int8 next_w, and only with it")
        groups = -(-int(next_w.shape[1]) // INT8_GROUP)
        if next_scales is not None:
            _check_vec(next_scales, "next_scales", (rows, groups), dev)
        nxt = _NextRows(next_w.data_ptr(), next_w.shape[1] * next_w.element_size(),
                        _ptr(next_scales), groups if next_scales is not None else 0,
                        _ptr(next_factor), next_threshold.data_ptr())
    ws_ptr, ws_bytes = None, 0
    if splits > 1:
        _check(workspace is not None, "splits > 1 needs workspace=attention_workspace(...)")
        need = int(load(dev).sparsify_attention_workspace_bytes(n_head, dv, splits))
        _check_workspace(workspace, need, dev, f"attention over {splits} splits")
        ws_ptr, ws_bytes = workspace.data_ptr(), workspace.numel()
    lib = load(dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.sparsify_attention_decode_split(
            qkv.data_ptr(), parts, stride, kc.data_ptr(), vc.data_ptr(), pos.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), perm.data_ptr(), _ptr(q_norm), _ptr(k_norm),
            out.data_ptr(), n_head, hkv, dk, dv, L, int(window), float(scale), float(eps),
            ctypes.byref(nxt) if nxt is not None else None,
            _attn_flags(prefetch_cache=prefetch_cache, group_heads=group_heads,
                        cache_dtype=kc.dtype),
            int(splits), ws_ptr, ws_bytes, stream)
    _raise_on(rc, f"attention_decode launch (heads {n_head}/{hkv}, dk={dk}, dv={dv}, L={L})")
    return out


def dense_gemv(w_out_major: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dense reference path through cuBLAS: ``w_out_major`` (N, K) fp16/bf16, x (K,) -> (N,).

    ``x`` is cast to the weight dtype (as a dense fp16 engine would); the result is float32.
    """
    out = torch.nn.functional.linear(x.to(w_out_major.dtype), w_out_major)
    return out.float()
