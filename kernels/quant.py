"""Int8 weight format for the input-major kernels: symmetric int8 + float32 scale per output group.

Layout: ``q`` int8 (K, N), C-contiguous, row i = the quantized weights multiplying x[i];
``scales`` float32 (K, ceil(N / G)), scale ``[i, g]`` covers output channels
``g*G .. min(N, (g+1)*G) - 1`` of row i. When G does not divide N the last group of every row is
simply shorter; nothing is padded, so ``q`` keeps the exact (K, N) shape of the float weights.

Grouping along the *output* axis (not the input axis as in GGUF's Q8_0) keeps each input row
self-contained: dropping x[i] skips ``q[i]`` and ``scales[i]``, two contiguous runs of memory.
Quantization runs once at load time, so it is plain numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_GROUP", "check_int8_layout", "dequantize_int8", "quantize_int8"]

# Output channels per scale. 64 costs 4 bytes per 64 weights (+6.25 % over 1 byte/weight) and
# divides every projection width of the bundled models (576, 192, 1536, 640, 256, 1024, 2048) and
# of 4096/14336; the error-vs-bytes measurement behind the choice is in kernels/README.md.
DEFAULT_GROUP = 64

_ROWS_PER_STEP = 256


def quantize_int8(w_input_major: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one float32 scale per group of output channels.

    w_input_major: float (K, N), row i = weights multiplying x[i]. group: G >= 1 consecutive
    output channels share a scale. Returns ``(q, scales)``: q int8 (K, N) C-contiguous with values
    in [-127, 127] (the -128 code is unused so the grid is symmetric), scales float32
    (K, ceil(N / G)) with ``scale = max|w| / 127`` over the group (0 for an all-zero group). The
    last group of a row covers the remaining N - G * (ceil(N / G) - 1) channels.
    """
    w = np.asarray(w_input_major)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (K, N), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"weights must be floating point, got {w.dtype}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or Inf; int8 quantization needs finite weights")
    k, n = w.shape
    group = int(group)
    n_groups = -(-n // group)
    q = np.empty((k, n), dtype=np.int8)
    scales = np.empty((k, n_groups), dtype=np.float32)
    pad = n_groups * group - n
    # Row blocks bound the temporary memory for large matrices (load time only).
    for r0 in range(0, k, _ROWS_PER_STEP):
        # Zero padding only serves the per-group max (zeros never raise it); it is cut off below.
        wp = np.pad(w[r0 : r0 + _ROWS_PER_STEP].astype(np.float32), ((0, 0), (0, pad)))
        wp = wp.reshape(wp.shape[0], n_groups, group)  # (rows, groups, G)
        s = np.abs(wp).max(axis=2) / np.float32(127)  # (rows, groups)
        safe = np.where(s > 0, s, np.float32(1))
        qb = np.clip(np.rint(wp / safe[:, :, None]), -127, 127).astype(np.int8)
        q[r0 : r0 + _ROWS_PER_STEP] = qb.reshape(qb.shape[0], n_groups * group)[:, :n]
        scales[r0 : r0 + _ROWS_PER_STEP] = s
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: float32 (K, N) = q * scale of its group (in float32)."""
    check_int8_layout(q, scales, group)
    n = q.shape[1]
    per_column = np.repeat(scales, group, axis=1)[:, :n]  # (K, N): scale of each weight's group
    return q.astype(np.float32) * per_column


def check_int8_layout(q: np.ndarray, scales: np.ndarray, group: int) -> None:
    """Raise TypeError/ValueError unless (q, scales, group) form a valid int8 weight set."""
    if not isinstance(q, np.ndarray) or q.dtype != np.int8 or q.ndim != 2:
        raise TypeError(f"q must be a 2-D int8 ndarray (K, N), got {_describe(q)}")
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.ndim != 2:
        raise TypeError(f"scales must be a 2-D float32 ndarray, got {_describe(scales)}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    k, n = q.shape
    want = (k, -(-n // int(group)))
    if scales.shape != want:
        raise ValueError(
            f"scales shape {scales.shape} does not match q {q.shape} with group {group}: "
            f"expected {want}"
        )


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"ndarray {a.dtype} shape {a.shape}"
    return type(a).__name__
