"""Plain numpy reference for every kernel format: the oracle the fast kernels are tested against.

Semantics (DESIGN.md, "Kernels"), identical for every backend::

    score[i] = |x[i]|                (magnitude)
             = |x[i]| * c[i]         (weight-aware, c[i] = ||W[:, i]||, given by the caller)
    keep[i]  = NOT (score[i] <= t)   (computed in float32; t is rounded to float32 first)
    y        = sum over kept i of x[i] * wt[i, :]

Writing the compare as NOT(score <= t) rather than (score > t) keeps a NaN input channel: its NaN
reaches the output exactly as in a dense product, so a numerical fault upstream stays visible
instead of being silently masked. A dropped channel contributes nothing at all, not ``0 * w``:
its weight row is never read, which is the point of the kernels.

Weights are **input-major**: ``wt`` has shape (K, N), row i holds the N weights that multiply
x[i]. The int8 format stores symmetric int8 weights ``q`` (K, N) plus float32 scales (K, ceil(N/G)),
one per group of G consecutive output channels of each input row; the last group of a row is
shorter when G does not divide N (nothing is padded). The quantizer is in :mod:`.quant`.

The references accumulate in float64, so they are more accurate than any float32 kernel; tests
bound the kernel's distance from them by the float32 rounding error of a length-K dot product.
"""

from __future__ import annotations

import numpy as np

from .quant import dequantize_int8

__all__ = [
    "dense_gemv_fp32_ref",
    "dense_gemv_int8_ref",
    "keep_mask",
    "sparse_gemv_fp32_ref",
    "sparse_gemv_int8_ref",
]


def keep_mask(
    x: np.ndarray, threshold: float, channel_scale: np.ndarray | None = None
) -> np.ndarray:
    """Which input channels survive: bool (K,), ``NOT(score <= float32(threshold))``.

    x: float32 (K,). channel_scale: None (magnitude score) or float32 (K,) (weight-aware score).
    The score is formed in float32, exactly as the kernels form it, so masks agree bit for bit.
    """
    x = np.asarray(x, dtype=np.float32)
    score = np.abs(x)
    if channel_scale is not None:
        score = score * np.asarray(channel_scale, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return ~(score <= np.float32(threshold))


def _kept_product(wt: np.ndarray, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """sum over kept rows of x[i] * wt[i, :], accumulated in float64, returned as float32 (N,)."""
    rows = np.flatnonzero(keep)
    acc = x[rows].astype(np.float64) @ wt[rows].astype(np.float64)  # (m,) @ (m, N) -> (N,)
    return np.asarray(acc, dtype=np.float64).reshape(wt.shape[1]).astype(np.float32)


def sparse_gemv_fp32_ref(
    wt: np.ndarray,
    x: np.ndarray,
    threshold: float,
    channel_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Reference sparse GEMV on input-major float32 weights.

    wt: float32 (K, N), row i multiplies x[i]. x: float32 (K,). Returns float32 (N,).
    """
    return _kept_product(wt, np.asarray(x, np.float32), keep_mask(x, threshold, channel_scale))


def dense_gemv_fp32_ref(wt: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference dense GEMV on input-major float32 weights: ``x @ wt``, float32 (N,)."""
    return _kept_product(wt, np.asarray(x, np.float32), np.ones(wt.shape[0], dtype=bool))


def sparse_gemv_int8_ref(
    q: np.ndarray,
    scales: np.ndarray,
    group: int,
    x: np.ndarray,
    threshold: float,
    channel_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Reference sparse GEMV on int8 input-major weights: the fp32 reference on the dequantized
    weights. q int8 (K, N), scales float32 (K, ceil(N/G)), x float32 (K,). Returns float32 (N,)."""
    return sparse_gemv_fp32_ref(dequantize_int8(q, scales, group), x, threshold, channel_scale)


def dense_gemv_int8_ref(q: np.ndarray, scales: np.ndarray, group: int, x: np.ndarray) -> np.ndarray:
    """Reference dense GEMV on int8 input-major weights, float32 (N,)."""
    return dense_gemv_fp32_ref(dequantize_int8(q, scales, group), x)
