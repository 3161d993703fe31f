"""Numba CPU kernels: sparse GEMV on input-major weights, fp32 and int8 (group scales).

Semantics (same as :mod:`.reference`, see there for the full statement)::

    keep[i] = NOT (score[i] <= float32(t)),  score = |x[i]|  or  |x[i]| * c[i]
    out     = sum over kept i of x[i] * W_row[i]        (float32 accumulation)

Layout: ``wt`` float32 (K, N) C-contiguous, row i multiplies x[i]; int8 weights ``q`` (K, N) with
``scales`` float32 (K, ceil(N/G)) per group of G output channels (:mod:`.quant`). A dropped x[i]
skips its weight row (and its scale row) entirely: that row is never read.

How a call runs:
1. ``select_rows`` compacts the indices of kept channels into the caller's int32 ``rows`` buffer
   (branch-free: it writes every index and advances only on a keep, so a ~50 % mask costs no
   branch mispredictions).
2. The kept rows are streamed eight at a time: ``out[j] += a0*w0[j] + ... + a7*w7[j]``.
   Eight rows per pass cut the read-modify-write traffic on ``out`` by eight while the
   loop over j stays unit-stride, so LLVM vectorizes it (AVX2/AVX-512 FMAs).
3. Parallel variants split the *kept-row list* (split-K): chunk c of ``partial.shape[0]`` streams
   its share of the rows, full width, into ``partial[c]``; the chunks are then summed into
   ``out``. Every thread reads whole weight rows, the longest contiguous runs the layout has;
   splitting the outputs instead cuts every row into pieces, which measured slower, most of all
   for K > N (see kernels/README.md).

Nothing is allocated per call: ``out`` (overwritten, not accumulated into), ``rows`` and
``partial`` come from the caller (:func:`workspace` makes them once). ``fastmath`` is limited to
``contract`` (FMA fusion) in the streaming loops: no ``nnan``/``ninf`` flags anywhere, so the
NaN-keeping compare and NaN propagation stay IEEE-exact.

Two levels of API:
- raw njit functions (``sparse_fp32_serial`` ... ``dense_int8_parallel``, ``select_rows``) for
  callers that validated their buffers once (the decode loop);
- checked wrappers (``*_into``) that validate dtype, shape, contiguity and aliasing and raise
  TypeError/ValueError, and allocating conveniences (``sparse_gemv_fp32`` ...).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quant import DEFAULT_GROUP, check_int8_layout

__all__ = [
    "dense_fp32_parallel",
    "dense_fp32_serial",
    "dense_fp32_tiled",
    "dense_gemv_fp32",
    "dense_gemv_fp32_into",
    "dense_gemv_int8",
    "dense_gemv_int8_into",
    "dense_int8_parallel",
    "dense_int8_serial",
    "dense_int8_tiled",
    "select_rows",
    "sparse_fp32_parallel",
    "sparse_fp32_serial",
    "sparse_gemv_fp32",
    "sparse_gemv_fp32_into",
    "sparse_gemv_int8",
    "sparse_gemv_int8_into",
    "sparse_int8_parallel",
    "sparse_int8_serial",
    "workspace",
]

# FMA contraction only. Reassociation is not needed (the inner loop is elementwise, so it
# vectorizes without it) and nnan/ninf would let LLVM rewrite NOT(s <= t) as (s > t).
_FAST = {"contract"}


# ---------------------------------------------------------------------------------------------
# raw kernels (no checks: contiguous arrays of the documented dtypes and shapes only)
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def select_rows(x, threshold, channel_scale, rows):
    """Write the indices of kept channels to ``rows[:m]`` and return m.

    x float32 (K,); threshold: compared as float32; channel_scale None or float32 (K,);
    rows int32 (K,) scratch. Kept means NOT(score <= t), so NaN scores are kept.
    """
    t = np.float32(threshold)
    m = 0
    if channel_scale is None:
        for i in range(x.shape[0]):
            rows[m] = i
            m += not (abs(x[i]) <= t)
    else:
        for i in range(x.shape[0]):
            rows[m] = i
            m += not (abs(x[i]) * channel_scale[i] <= t)
    return m


@njit(cache=True, inline="always")
def _row(rows, r):
    # rows=None is the dense twin: the same loops with the identity row list; numba prunes the
    # branch at compile time for each specialization.
    if rows is None:
        return r
    return rows[r]


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache line holding ``arr[idx]`` (1-D contiguous array) into all cache levels.

    The kept rows of a sparse call are scattered, so the hardware stream prefetcher loses the
    thread at every gap, and even dense rows of small matrices are too short for it to ramp up:
    on 2 cores, 576x1536 int8 streamed at ~9 GB/s without hints and ~20 GB/s with them
    (kernels/README.md). ``llvm.prefetch`` unmangled is auto-upgraded by LLVM to the overload
    its pointer type needs, on typed and opaque pointers alike.
    """
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [i]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch")
        # rw = 0 (read), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _ahead(rows, r, last):
    # The row list entry r passes ahead, clamped to the last kept row (re-hinting a line already
    # in cache costs next to nothing).
    return _row(rows, min(r, last))


@njit(cache=True, inline="always")
def _hint8(r0, r1, r2, r3, r4, r5, r6, r7, j):
    # The line holding element j of each of the next pass's eight rows.
    _prefetch(r0, j)
    _prefetch(r1, j)
    _prefetch(r2, j)
    _prefetch(r3, j)
    _prefetch(r4, j)
    _prefetch(r5, j)
    _prefetch(r6, j)
    _prefetch(r7, j)


# Output columns per prefetch step in the fp32 loop: 64 floats, four cache lines of each row.
_FP32_BLOCK = 64


@njit(cache=True, fastmath=_FAST)
def _fp32_rows(wt, x, rows, r0, r1, out, c0, c1):
    """out[c0:c1] = sum over r in [r0, r1) of x[i] * wt[i, c0:c1], i = rows[r] (or r if rows is
    None); the other entries of out are not touched.

    While a pass streams its eight rows, block by block, the next pass's eight rows are hinted
    block by block at the same columns (one pass ahead)."""
    for j in range(c0, c1):
        out[j] = 0.0
    n_blk = (c1 - c0) // _FP32_BLOCK
    last = r1 - 1
    r = r0
    while r + 8 <= r1:
        i0 = _row(rows, r)
        i1 = _row(rows, r + 1)
        i2 = _row(rows, r + 2)
        i3 = _row(rows, r + 3)
        i4 = _row(rows, r + 4)
        i5 = _row(rows, r + 5)
        i6 = _row(rows, r + 6)
        i7 = _row(rows, r + 7)
        n0, n1 = wt[_ahead(rows, r + 8, last)], wt[_ahead(rows, r + 9, last)]
        n2, n3 = wt[_ahead(rows, r + 10, last)], wt[_ahead(rows, r + 11, last)]
        n4, n5 = wt[_ahead(rows, r + 12, last)], wt[_ahead(rows, r + 13, last)]
        n6, n7 = wt[_ahead(rows, r + 14, last)], wt[_ahead(rows, r + 15, last)]
        a0, a1, a2, a3 = x[i0], x[i1], x[i2], x[i3]
        a4, a5, a6, a7 = x[i4], x[i5], x[i6], x[i7]
        w0, w1, w2, w3 = wt[i0], wt[i1], wt[i2], wt[i3]
        w4, w5, w6, w7 = wt[i4], wt[i5], wt[i6], wt[i7]
        for c in range(n_blk):
            j0 = c0 + c * _FP32_BLOCK
            for h in range(0, _FP32_BLOCK, 16):
                _hint8(n0, n1, n2, n3, n4, n5, n6, n7, j0 + h)
            # Slices make every inner index start at 0 (see _int8_rows).
            o = out[j0 : j0 + _FP32_BLOCK]
            p0, p1, p2, p3 = w0[j0:], w1[j0:], w2[j0:], w3[j0:]
            p4, p5, p6, p7 = w4[j0:], w5[j0:], w6[j0:], w7[j0:]
            for j in range(_FP32_BLOCK):
                o[j] += (a0 * p0[j] + a1 * p1[j] + a2 * p2[j] + a3 * p3[j]) + (
                    a4 * p4[j] + a5 * p5[j] + a6 * p6[j] + a7 * p7[j]
                )
        for j in range(c0 + n_blk * _FP32_BLOCK, c1):  # columns past the last full block
            out[j] += (a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]) + (
                a4 * w4[j] + a5 * w5[j] + a6 * w6[j] + a7 * w7[j]
            )
        r += 8
    while r < r1:  # at most 7 leftover rows
        i0 = _row(rows, r)
        a0 = x[i0]
        w0 = wt[i0]
        for j in range(c0, c1):
            out[j] += a0 * w0[j]
        r += 1


@njit(cache=True, fastmath=_FAST)
def _int8_rows(q, scales, group, x, rows, r0, r1, out, c0, c1):
    """As :func:`_fp32_rows` for int8 codes with group scales. Called with a literal group (64)
    the loop over a group's outputs has a constant trip count that LLVM unrolls fully. The next
    pass's rows are hinted group by group (one line of codes per row when G = 64), their scale
    rows every 16 groups (one line of scales). Columns [c0, c1) as in :func:`_fp32_rows`; c0 is
    a multiple of group, and so is c1 unless it is N."""
    g0 = c0 // group
    n_full = c1 // group
    for j in range(c0, c1):
        out[j] = 0.0
    last = r1 - 1
    r = r0
    while r + 8 <= r1:
        i0 = _row(rows, r)
        i1 = _row(rows, r + 1)
        i2 = _row(rows, r + 2)
        i3 = _row(rows, r + 3)
        i4 = _row(rows, r + 4)
        i5 = _row(rows, r + 5)
        i6 = _row(rows, r + 6)
        i7 = _row(rows, r + 7)
        f0, f1 = _ahead(rows, r + 8, last), _ahead(rows, r + 9, last)
        f2, f3 = _ahead(rows, r + 10, last), _ahead(rows, r + 11, last)
        f4, f5 = _ahead(rows, r + 12, last), _ahead(rows, r + 13, last)
        f6, f7 = _ahead(rows, r + 14, last), _ahead(rows, r + 15, last)
        n0, n1, n2, n3 = q[f0], q[f1], q[f2], q[f3]
        n4, n5, n6, n7 = q[f4], q[f5], q[f6], q[f7]
        a0, a1, a2, a3 = x[i0], x[i1], x[i2], x[i3]
        a4, a5, a6, a7 = x[i4], x[i5], x[i6], x[i7]
        q0, q1, q2, q3 = q[i0], q[i1], q[i2], q[i3]
        q4, q5, q6, q7 = q[i4], q[i5], q[i6], q[i7]
        s0, s1, s2, s3 = scales[i0], scales[i1], scales[i2], scales[i3]
        s4, s5, s6, s7 = scales[i4], scales[i5], scales[i6], scales[i7]
        for g in range(g0, n_full):
            j0 = g * group
            _hint8(n0, n1, n2, n3, n4, n5, n6, n7, j0)
            if (g - g0) % 16 == 0:
                _hint8(scales[f0], scales[f1], scales[f2], scales[f3], scales[f4], scales[f5],
                       scales[f6], scales[f7], g)
            # x[i] * scale once per group; the inner loop is then a plain int8 -> fp32 FMA stream.
            b0, b1, b2, b3 = a0 * s0[g], a1 * s1[g], a2 * s2[g], a3 * s3[g]
            b4, b5, b6, b7 = a4 * s4[g], a5 * s5[g], a6 * s6[g], a7 * s7[g]
            # Slices make every inner index start at 0: with a variable lower bound numba's
            # negative-index wraparound check would stay in the loop and block vectorization.
            o = out[j0 : j0 + group]
            p0, p1, p2, p3 = q0[j0:], q1[j0:], q2[j0:], q3[j0:]
            p4, p5, p6, p7 = q4[j0:], q5[j0:], q6[j0:], q7[j0:]
            for j in range(group):
                o[j] += (
                    b0 * np.float32(p0[j])
                    + b1 * np.float32(p1[j])
                    + b2 * np.float32(p2[j])
                    + b3 * np.float32(p3[j])
                ) + (
                    b4 * np.float32(p4[j])
                    + b5 * np.float32(p5[j])
                    + b6 * np.float32(p6[j])
                    + b7 * np.float32(p7[j])
                )
        r += 8
    # Leftover rows (at most 7) over the full groups, then every row over the short last group
    # that exists only when group does not divide N: one row at a time, rare.
    n_groups = n_full + (n_full * group < c1)
    for rr in range(r0, r1):
        i0 = _row(rows, rr)
        g_from = n_full if rr < r else g0
        for g in range(g_from, n_groups):
            b0 = x[i0] * scales[i0, g]
            j0 = g * group
            o = out[j0 : min(c1, j0 + group)]
            p0 = q[i0, j0 : j0 + o.shape[0]]
            for j in range(o.shape[0]):
                o[j] += b0 * np.float32(p0[j])


@njit(cache=True)
def _int8_dispatch(q, scales, group, x, rows, r0, r1, out, c0, c1):
    # The default group as a compile-time constant: ~5-10 % faster on 4096x14336 than the same
    # code with a run-time group (measured), for one extra specialization.
    if group == DEFAULT_GROUP:
        _int8_rows(q, scales, DEFAULT_GROUP, x, rows, r0, r1, out, c0, c1)
    else:
        _int8_rows(q, scales, group, x, rows, r0, r1, out, c0, c1)


@njit(cache=True, fastmath=_FAST)
def _sum_partials(partial, out):
    """out (N,) = sum over chunks of partial (C, N)."""
    n = out.shape[0]
    p0 = partial[0]
    for j in range(n):
        out[j] = p0[j]
    for c in range(1, partial.shape[0]):
        pc = partial[c]
        for j in range(n):
            out[j] += pc[j]


@njit(cache=True, parallel=True)
def _fp32_split(wt, x, rows, m, out, partial):
    n_chunks = partial.shape[0]
    for c in prange(n_chunks):
        # Chunk c takes rows [c*m/C, (c+1)*m/C) of the kept list: shares differ by at most one.
        _fp32_rows(wt, x, rows, c * m // n_chunks, (c + 1) * m // n_chunks, partial[c],
                   0, out.shape[0])
    _sum_partials(partial, out)


@njit(cache=True, parallel=True)
def _int8_split(q, scales, group, x, rows, m, out, partial):
    n_chunks = partial.shape[0]
    for c in prange(n_chunks):
        r0 = c * m // n_chunks
        _int8_dispatch(q, scales, group, x, rows, r0, (c + 1) * m // n_chunks, partial[c],
                       0, out.shape[0])
    _sum_partials(partial, out)


@njit(cache=True)
def sparse_fp32_serial(wt, x, threshold, channel_scale, out, rows):
    """out (N,) = sparse GEMV of input-major float32 wt (K, N); returns the kept-row count."""
    m = select_rows(x, threshold, channel_scale, rows)
    _fp32_rows(wt, x, rows, 0, m, out, 0, out.shape[0])
    return m


@njit(cache=True)
def dense_fp32_serial(wt, x, out):
    """out (N,) = x @ wt for input-major float32 wt (K, N): the same loop with every row kept."""
    _fp32_rows(wt, x, None, 0, wt.shape[0], out, 0, out.shape[0])


@njit(cache=True)
def sparse_fp32_parallel(wt, x, threshold, channel_scale, out, rows, partial):
    """Parallel :func:`sparse_fp32_serial`, split-K over ``partial.shape[0]`` chunks run under
    prange; partial float32 (C, N) scratch, C >= 1 (one chunk per thread is best)."""
    m = select_rows(x, threshold, channel_scale, rows)
    _fp32_split(wt, x, rows, m, out, partial)
    return m


@njit(cache=True)
def dense_fp32_parallel(wt, x, out, partial):
    """Parallel :func:`dense_fp32_serial`, split as :func:`sparse_fp32_parallel`."""
    _fp32_split(wt, x, None, wt.shape[0], out, partial)


@njit(cache=True)
def sparse_int8_serial(q, scales, group, x, threshold, channel_scale, out, rows):
    """out (N,) = sparse GEMV of int8 q (K, N) with scales (K, ceil(N/G)); returns kept rows."""
    m = select_rows(x, threshold, channel_scale, rows)
    _int8_dispatch(q, scales, group, x, rows, 0, m, out, 0, out.shape[0])
    return m


@njit(cache=True)
def dense_int8_serial(q, scales, group, x, out):
    """out (N,) = x @ dequant(q, scales) with every row kept."""
    _int8_dispatch(q, scales, group, x, None, 0, q.shape[0], out, 0, out.shape[0])


@njit(cache=True)
def sparse_int8_parallel(q, scales, group, x, threshold, channel_scale, out, rows, partial):
    """Parallel :func:`sparse_int8_serial`, split as :func:`sparse_fp32_parallel`."""
    m = select_rows(x, threshold, channel_scale, rows)
    _int8_split(q, scales, group, x, rows, m, out, partial)
    return m


@njit(cache=True)
def dense_int8_parallel(q, scales, group, x, out, partial):
    """Parallel :func:`dense_int8_serial`, split as :func:`sparse_fp32_parallel`."""
    _int8_split(q, scales, group, x, None, q.shape[0], out, partial)


# Output columns per tile of the tiled dense twins: the tile's 32 KB of float32 sums stay in
# L1/L2 while every input row streams past it, and each row is read in 8 KB (int8) runs. On the
# gemma3-270m head (640 x 262144 int8, 2 threads) 2048 / 4096 / 8192 / 16384 columns took
# 9.7 / 9.2 / 7.9 / 7.7 ms; split-K took 10.7 ms.
TILE = 8192


@njit(cache=True, parallel=True)
def dense_fp32_tiled(wt, x, out):
    """out (N,) = x @ wt, parallel over tiles of :data:`TILE` output columns, each tile over
    every row. For K << N (the output head: 576 or 640 inputs, 49152 or 262144 outputs),
    where split-K would stream each chunk's full-width (N,) partial sums through the cache
    once per eight rows, more bytes than the weights themselves."""
    n = out.shape[0]
    for t in prange((n + TILE - 1) // TILE):
        _fp32_rows(wt, x, None, 0, wt.shape[0], out, t * TILE, min(n, (t + 1) * TILE))


@njit(cache=True, parallel=True)
def dense_int8_tiled(q, scales, group, x, out):
    """int8 :func:`dense_fp32_tiled`; TILE is a multiple of every group that divides it, so
    tiles start on group boundaries (check_int8_layout bounds the group)."""
    n = out.shape[0]
    tile = max(TILE // group, 1) * group
    for t in prange((n + tile - 1) // tile):
        _int8_dispatch(q, scales, group, x, None, 0, q.shape[0], out, t * tile,
                       min(n, (t + 1) * tile))


# ---------------------------------------------------------------------------------------------
# checked wrappers
# ---------------------------------------------------------------------------------------------


def workspace(k: int, n: int, n_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scratch for one (K, N) projection: ``rows`` int32 (K,) and ``partial`` float32 (C, N),
    C = n_chunks or numba's current thread count. Allocate once, reuse for every call."""
    c = numba.get_num_threads() if n_chunks is None else int(n_chunks)
    if c < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    return np.empty(k, dtype=np.int32), np.empty((c, n), dtype=np.float32)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"ndarray {a.dtype} shape {a.shape}"
    return type(a).__name__


def _check_array(name: str, a: object, dtype: type, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != len(shape):
        want = f"{len(shape)}-D {np.dtype(dtype).name} ndarray"
        raise TypeError(f"{name} must be a {want}, got {_describe(a)}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


def _check_out(name: str, a: object, dtype: type, shape: tuple[int, ...], *inputs: object) -> None:
    _check_array(name, a, dtype, shape)
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for other in inputs:
        if other is not None and np.may_share_memory(a, other):
            raise ValueError(f"{name} overlaps an input array; pass a separate buffer")


def _check_weights_fp32(wt: object) -> tuple[int, int]:
    if not isinstance(wt, np.ndarray) or wt.dtype != np.float32 or wt.ndim != 2:
        raise TypeError(f"wt must be a 2-D float32 ndarray (K, N), got {_describe(wt)}")
    if not wt.flags.c_contiguous:
        raise ValueError("wt must be C-contiguous input-major (K, N) (use np.ascontiguousarray)")
    return wt.shape


def _check_weights_int8(q: object, scales: object, group: object) -> tuple[int, int]:
    check_int8_layout(q, scales, group)
    if not q.flags.c_contiguous or not scales.flags.c_contiguous:
        raise ValueError("q and scales must be C-contiguous")
    return q.shape


def _check_threshold(threshold: object) -> np.float32:
    real = (int, float, np.integer, np.floating)
    if isinstance(threshold, bool) or not isinstance(threshold, real):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return np.float32(threshold)


def _check_channel_scale(channel_scale: object, k: int) -> None:
    if channel_scale is not None:
        _check_array("channel_scale", channel_scale, np.float32, (k,))


def _check_partial(partial: object, n: int, *inputs: object) -> None:
    if partial is not None:
        if not isinstance(partial, np.ndarray) or partial.ndim != 2:
            raise TypeError("partial must be a 2-D float32 ndarray (C, N), "
                            f"got {_describe(partial)}")
        _check_out("partial", partial, np.float32, (max(partial.shape[0], 1), n), *inputs)


def sparse_gemv_fp32_into(
    wt: np.ndarray,
    x: np.ndarray,
    threshold: float,
    out: np.ndarray,
    rows: np.ndarray,
    partial: np.ndarray | None = None,
    *,
    channel_scale: np.ndarray | None = None,
) -> int:
    """Checked sparse GEMV on input-major float32 weights; writes ``out``, returns kept rows.

    wt float32 (K, N) C-contiguous, row i multiplies x[i]; x float32 (K,); threshold: a real
    number, rounded to float32; out float32 (N,) (overwritten); rows int32 (K,) scratch;
    partial: None runs the serial kernel, a float32 (C, N) scratch runs the parallel kernel
    split over C chunks (see :func:`workspace`); channel_scale None (magnitude score) or
    float32 (K,) (weight-aware score |x|*c).
    """
    k, n = _check_weights_fp32(wt)
    _check_array("x", x, np.float32, (k,))
    _check_channel_scale(channel_scale, k)
    t = _check_threshold(threshold)
    _check_out("out", out, np.float32, (n,), x, wt, channel_scale)
    _check_out("rows", rows, np.int32, (k,), x, wt, channel_scale, out)
    _check_partial(partial, n, x, wt, channel_scale, out, rows)
    if partial is None:
        return int(sparse_fp32_serial(wt, x, t, channel_scale, out, rows))
    return int(sparse_fp32_parallel(wt, x, t, channel_scale, out, rows, partial))


def dense_gemv_fp32_into(
    wt: np.ndarray, x: np.ndarray, out: np.ndarray, partial: np.ndarray | None = None
) -> None:
    """Checked dense twin of :func:`sparse_gemv_fp32_into`: out (N,) = x @ wt, wt (K, N)."""
    k, n = _check_weights_fp32(wt)
    _check_array("x", x, np.float32, (k,))
    _check_out("out", out, np.float32, (n,), x, wt)
    _check_partial(partial, n, x, wt, out)
    if partial is None:
        dense_fp32_serial(wt, x, out)
    else:
        dense_fp32_parallel(wt, x, out, partial)


def sparse_gemv_int8_into(
    q: np.ndarray,
    scales: np.ndarray,
    group: int,
    x: np.ndarray,
    threshold: float,
    out: np.ndarray,
    rows: np.ndarray,
    partial: np.ndarray | None = None,
    *,
    channel_scale: np.ndarray | None = None,
) -> int:
    """Checked sparse GEMV on int8 input-major weights; writes ``out``, returns kept rows.

    q int8 (K, N), scales float32 (K, ceil(N/group)) from :func:`quant.quantize_int8`; the other
    arguments as in :func:`sparse_gemv_fp32_into`.
    """
    k, n = _check_weights_int8(q, scales, group)
    _check_array("x", x, np.float32, (k,))
    _check_channel_scale(channel_scale, k)
    t = _check_threshold(threshold)
    _check_out("out", out, np.float32, (n,), x, q, scales, channel_scale)
    _check_out("rows", rows, np.int32, (k,), x, q, scales, channel_scale, out)
    _check_partial(partial, n, x, q, scales, channel_scale, out, rows)
    g = int(group)
    if partial is None:
        return int(sparse_int8_serial(q, scales, g, x, t, channel_scale, out, rows))
    return int(sparse_int8_parallel(q, scales, g, x, t, channel_scale, out, rows, partial))


def dense_gemv_int8_into(
    q: np.ndarray,
    scales: np.ndarray,
    group: int,
    x: np.ndarray,
    out: np.ndarray,
    partial: np.ndarray | None = None,
) -> None:
    """Checked dense twin of :func:`sparse_gemv_int8_into`."""
    k, n = _check_weights_int8(q, scales, group)
    _check_array("x", x, np.float32, (k,))
    _check_out("out", out, np.float32, (n,), x, q, scales)
    _check_partial(partial, n, x, q, scales, out)
    if partial is None:
        dense_int8_serial(q, scales, int(group), x, out)
    else:
        dense_int8_parallel(q, scales, int(group), x, out, partial)


# ---------------------------------------------------------------------------------------------
# allocating conveniences (casual use and tests; the decode loop should use *_into or raw)
# ---------------------------------------------------------------------------------------------


def sparse_gemv_fp32(
    wt: np.ndarray,
    x: np.ndarray,
    threshold: float,
    *,
    channel_scale: np.ndarray | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Sparse GEMV, float32 (N,) result; see :func:`sparse_gemv_fp32_into`."""
    k, n = _check_weights_fp32(wt)
    out = np.empty(n, dtype=np.float32)
    rows, partial = workspace(k, n)
    partial = partial if parallel else None
    sparse_gemv_fp32_into(wt, x, threshold, out, rows, partial, channel_scale=channel_scale)
    return out


def dense_gemv_fp32(wt: np.ndarray, x: np.ndarray, *, parallel: bool = True) -> np.ndarray:
    """Dense twin, float32 (N,) result; see :func:`dense_gemv_fp32_into`."""
    k, n = _check_weights_fp32(wt)
    out = np.empty(n, dtype=np.float32)
    dense_gemv_fp32_into(wt, x, out, workspace(k, n)[1] if parallel else None)
    return out


def sparse_gemv_int8(
    q: np.ndarray,
    scales: np.ndarray,
    group: int,
    x: np.ndarray,
    threshold: float,
    *,
    channel_scale: np.ndarray | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Sparse int8 GEMV, float32 (N,) result; see :func:`sparse_gemv_int8_into`."""
    k, n = _check_weights_int8(q, scales, group)
    out = np.empty(n, dtype=np.float32)
    rows, partial = workspace(k, n)
    partial = partial if parallel else None
    sparse_gemv_int8_into(
        q, scales, group, x, threshold, out, rows, partial, channel_scale=channel_scale
    )
    return out


def dense_gemv_int8(
    q: np.ndarray, scales: np.ndarray, group: int, x: np.ndarray, *, parallel: bool = True
) -> np.ndarray:
    """Dense int8 twin, float32 (N,) result; see :func:`dense_gemv_int8_into`."""
    k, n = _check_weights_int8(q, scales, group)
    out = np.empty(n, dtype=np.float32)
    dense_gemv_int8_into(q, scales, group, x, out, workspace(k, n)[1] if parallel else None)
    return out
