"""Numba CPU GEMV kernels against the numpy reference (sparsify_kernels.reference)."""

from __future__ import annotations

import numpy as np
import pytest
from sparsify_kernels import cpu
from sparsify_kernels import reference as ref
from sparsify_kernels.quant import dequantize_int8, quantize_int8

U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


def _gamma(n: int) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): bound on the relative error of n float32 roundings."""
    return n * U32 / (1 - n * U32)


def _bound(w_rows: np.ndarray, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Worst-case |kernel - reference| for a float32 GEMV over the kept rows, per output (N,).

    A float32 dot product of K terms in any summation order (the kernel adds four rows per pass,
    fused multiply-adds or not) is off by at most gamma_K * sum|x_i * w_ij|; one more rounding
    each for the int8 path's x*scale and the reference's final cast to float32, and one of slack,
    gives gamma_(K+3). The float64 reference itself is exact to far below that.
    """
    k = w_rows.shape[0]
    mag = np.abs(x[keep]).astype(np.float64) @ np.abs(w_rows[keep]).astype(np.float64)
    return _gamma(k + 3) * mag


def _threshold_for(x: np.ndarray, sparsity: float) -> float:
    """A threshold dropping floor(sparsity*K) channels of |x| (-1 keeps everything)."""
    n_drop = int(np.floor(sparsity * x.size))
    if n_drop == 0:
        return -1.0
    return float(np.sort(np.abs(x))[n_drop - 1])


def _data(rng: np.random.Generator, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    wt = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal(k, dtype=np.float32)
    return wt, x


def _run_fp32(wt, x, t, c, parallel, n_chunks=2):
    """Checked sparse fp32 call; parallel runs the split-K kernel over n_chunks chunks."""
    k, n = wt.shape
    out = np.full(n, np.nan, dtype=np.float32)  # NaN fill: a skipped output write would show
    rows, partial = cpu.workspace(k, n, n_chunks)
    partial = partial if parallel else None
    m = cpu.sparse_gemv_fp32_into(wt, x, t, out, rows, partial, channel_scale=c)
    return out, rows, m


SHAPES = [(1, 31), (31, 1), (33, 577), (577, 33), (1537, 1537)]


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_fp32_sparse_matches_reference(rng, k, n, parallel):
    wt, x = _data(rng, k, n)
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        t = _threshold_for(x, sparsity)
        keep = ref.keep_mask(x, t)
        out, rows, m = _run_fp32(wt, x, t, None, parallel)
        assert m == keep.sum()
        np.testing.assert_array_equal(rows[:m], np.flatnonzero(keep))
        want = ref.sparse_gemv_fp32_ref(wt, x, t)
        assert np.all(np.abs(out - want) <= _bound(wt, x, keep)), f"sparsity {sparsity}"
    assert np.all(out == 0)  # sparsity 1.0 came last: no row read, exact zeros


@pytest.mark.parametrize(("k", "n"), [(33, 577), (1537, 33)])
def test_fp32_dense_twin_matches_reference(rng, k, n):
    wt, x = _data(rng, k, n)
    keep = np.ones(k, dtype=bool)
    want = ref.dense_gemv_fp32_ref(wt, x)
    for parallel in (False, True):
        out = cpu.dense_gemv_fp32(wt, x, parallel=parallel)
        assert np.all(np.abs(out - want) <= _bound(wt, x, keep))


@pytest.mark.parametrize(("k", "n"), [(7, 100), (33, 2 * cpu.TILE + 37), (130, cpu.TILE)])
def test_tiled_dense_twins_match_reference(rng, k, n):
    """The output-tiled dense twins (the output head's kernels): every column written once, on
    one tile, a short last tile, and N below one tile; int8 with a group that divides the tile
    and one (48) that does not, so tiles are cut to whole groups."""
    wt, x = _data(rng, k, n)
    keep = np.ones(k, dtype=bool)
    out = np.full(n, np.nan, dtype=np.float32)
    cpu.dense_fp32_tiled(wt, x, out)
    assert np.all(np.abs(out - ref.dense_gemv_fp32_ref(wt, x)) <= _bound(wt, x, keep))
    for group in (64, 48):
        q, s = quantize_int8(wt, group)
        deq = dequantize_int8(q, s, group)
        out = np.full(n, np.nan, dtype=np.float32)
        cpu.dense_int8_tiled(q, s, group, x, out)
        want = ref.dense_gemv_int8_ref(q, s, group, x)
        assert np.all(np.abs(out - want) <= _bound(deq, x, keep)), f"group {group}"


@pytest.mark.parametrize("n_chunks", [1, 3, 7, 64])
def test_parallel_chunk_edges(rng, n_chunks):
    # 100 kept rows split 1..64 ways: shares of 100, 33/34, 14/15 and 1/2 rows, so chunks end
    # mid-block of eight and some hold only leftover rows.
    wt, x = _data(rng, 200, 577)
    t = _threshold_for(x, 0.5)
    out, _, _ = _run_fp32(wt, x, t, None, True, n_chunks=n_chunks)
    want = ref.sparse_gemv_fp32_ref(wt, x, t)
    assert np.all(np.abs(out - want) <= _bound(wt, x, ref.keep_mask(x, t)))


def test_all_zero_input(rng):
    wt, _ = _data(rng, 577, 33)
    x = np.zeros(577, dtype=np.float32)
    for parallel in (False, True):
        out, _, m = _run_fp32(wt, x, 0.0, None, parallel)  # 0 <= 0: every channel dropped
        assert m == 0 and np.all(out == 0)
        out, _, m = _run_fp32(wt, x, -1.0, None, parallel)  # all kept: 0 * w sums to exact 0
        assert m == 577 and np.all(out == 0)


def test_single_active_channel_is_exact(rng):
    wt, _ = _data(rng, 577, 1537)
    x = np.zeros(577, dtype=np.float32)
    x[301] = rng.standard_normal(dtype=np.float32)
    for parallel in (False, True):
        out, _, m = _run_fp32(wt, x, 0.0, None, parallel)
        assert m == 1
        # One product per output, one rounding in both: bit-exact.
        np.testing.assert_array_equal(out, x[301] * wt[301])


def test_threshold_is_compared_in_float32():
    # float64 0.1 < float32(0.1): compared in float64 the channel would be kept.
    wt = np.ones((1, 3), dtype=np.float32)
    x = np.array([0.1], dtype=np.float32)
    out, _, m = _run_fp32(wt, x, 0.1, None, False)
    assert m == 0 and not ref.keep_mask(x, 0.1)[0]
    assert np.all(out == 0)


@pytest.mark.parametrize("parallel", [False, True])
def test_weight_aware_scores(rng, parallel):
    k, n = 577, 33
    wt, x = _data(rng, k, n)
    wt *= rng.uniform(0.1, 3.0, size=(k, 1)).astype(np.float32)  # rows of unequal norm
    c = np.linalg.norm(wt, axis=1).astype(np.float32)  # ||W[:, i]|| = norm of input row i
    score = np.abs(x) * c
    t = float(np.median(score))
    keep = ref.keep_mask(x, t, c)
    assert not np.array_equal(keep, ref.keep_mask(x, t))  # the scale changes the mask
    out, rows, m = _run_fp32(wt, x, t, c, parallel)
    np.testing.assert_array_equal(rows[:m], np.flatnonzero(keep))
    want = ref.sparse_gemv_fp32_ref(wt, x, t, c)
    assert np.all(np.abs(out - want) <= _bound(wt, x, keep))


@pytest.mark.parametrize("parallel", [False, True])
def test_nan_input_is_kept_and_propagates(rng, parallel):
    wt, x = _data(rng, 577, 33)
    x[17] = np.nan
    t = _threshold_for(np.nan_to_num(x), 0.99)
    out, rows, m = _run_fp32(wt, x, t, None, parallel)
    assert 17 in rows[:m]
    assert np.all(np.isnan(out))  # as in a dense product: every output sees the NaN
    assert np.all(np.isnan(ref.sparse_gemv_fp32_ref(wt, x, t)))
    c = np.ones(577, dtype=np.float32)
    out_wa, _, _ = _run_fp32(wt, x, t, c, parallel)
    assert np.all(np.isnan(out_wa))
    q, s = quantize_int8(wt, 8)
    assert np.all(np.isnan(cpu.sparse_gemv_int8(q, s, 8, x, t, parallel=parallel)))
    assert np.all(np.isnan(cpu.dense_gemv_fp32(wt, x, parallel=parallel)))


@pytest.mark.parametrize("group", [1, 7, 64])
def test_int8_quantizer(rng, group):
    k, n = 33, 577
    w = rng.standard_normal((k, n), dtype=np.float32)
    w[3] = 0  # an all-zero row: scale 0, codes 0
    q, s = quantize_int8(w, group)
    assert q.dtype == np.int8 and q.shape == (k, n) and q.flags.c_contiguous
    assert s.dtype == np.float32 and s.shape == (k, -(-n // group))
    assert np.abs(q.astype(np.int32)).max() == 127 and q.min() >= -127
    assert np.all(s[3] == 0) and np.all(q[3] == 0)
    deq = dequantize_int8(q, s, group)
    per_col = np.repeat(s, group, axis=1)[:, :n]
    # Round to nearest: at most half a step per weight, plus float32 roundings of w/s and q*s.
    assert np.all(np.abs(deq - w) <= per_col * (0.5 + 1e-5) + 2 * U32 * np.abs(w))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(("k", "n", "group"), [(31, 33, 8), (577, 1537, 64), (1537, 31, 64)])
def test_int8_matches_its_dequantized_reference(rng, k, n, group, parallel):
    # Oracle: the float64 product with the dequantized weights. The kernel differs only by float32
    # rounding: x*scale once per group, then the same K-term sum as fp32, so the fp32 bound holds
    # with deq = q*scale in place of w. (Quantization error itself is not part of this test.)
    wt, x = _data(rng, k, n)
    q, s = quantize_int8(wt, group)
    deq = dequantize_int8(q, s, group)
    for sparsity in (0.0, 0.5, 1.0):
        t = _threshold_for(x, sparsity)
        keep = ref.keep_mask(x, t)
        out = np.full(n, np.nan, dtype=np.float32)
        rows, partial = cpu.workspace(k, n, 3)
        partial = partial if parallel else None
        m = cpu.sparse_gemv_int8_into(q, s, group, x, t, out, rows, partial)
        assert m == keep.sum()
        want = ref.sparse_gemv_int8_ref(q, s, group, x, t)
        assert np.all(np.abs(out - want) <= _bound(deq, x, keep)), f"sparsity {sparsity}"
    dense = cpu.dense_gemv_int8(q, s, group, x, parallel=parallel)
    want = ref.dense_gemv_int8_ref(q, s, group, x)
    assert np.all(np.abs(dense - want) <= _bound(deq, x, np.ones(k, dtype=bool)))


def test_int8_weight_aware_and_chunks(rng):
    k, n, group = 300, 577, 16
    wt, x = _data(rng, k, n)
    q, s = quantize_int8(wt, group)
    c = rng.uniform(0.5, 2.0, size=k).astype(np.float32)
    t = float(np.median(np.abs(x) * c))
    keep = ref.keep_mask(x, t, c)
    want = ref.sparse_gemv_int8_ref(q, s, group, x, t, c)
    bound = _bound(dequantize_int8(q, s, group), x, keep)
    for n_chunks in (1, 2, 5):
        out = np.empty(n, dtype=np.float32)
        rows, partial = cpu.workspace(k, n, n_chunks)
        m = cpu.sparse_int8_parallel(q, s, group, x, np.float32(t), c, out, rows, partial)
        assert m == keep.sum()
        assert np.all(np.abs(out - want) <= bound)


def test_launcher_validation(rng):
    wt, x = _data(rng, 33, 31)
    out = np.empty(31, dtype=np.float32)
    rows = np.empty(33, dtype=np.int32)
    call = cpu.sparse_gemv_fp32_into
    with pytest.raises(TypeError, match="wt must be"):
        call(wt.astype(np.float64), x, 0.5, out, rows)
    with pytest.raises(ValueError, match="C-contiguous"):
        call(np.asfortranarray(wt), x, 0.5, out, rows)
    with pytest.raises(ValueError, match="x has shape"):
        call(wt, x[:-1], 0.5, out, rows)
    with pytest.raises(TypeError, match="x must be"):
        call(wt, x.astype(np.float16), 0.5, out, rows)
    with pytest.raises(ValueError, match="out has shape"):
        call(wt, x, 0.5, np.empty(32, np.float32), rows)
    with pytest.raises(TypeError, match="rows must be"):
        call(wt, x, 0.5, out, rows.astype(np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        call(wt, x, 0.5, np.empty(62, np.float32)[::2], rows)
    ro = np.empty(31, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        call(wt, x, 0.5, ro, rows)
    with pytest.raises(ValueError, match="overlaps"):
        call(wt, x, 0.5, wt[0], rows)
    with pytest.raises(ValueError, match="threshold is NaN"):
        call(wt, x, float("nan"), out, rows)
    with pytest.raises(TypeError, match="threshold must be"):
        call(wt, x, True, out, rows)
    with pytest.raises(ValueError, match="partial has shape"):
        call(wt, x, 0.5, out, rows, np.empty((2, 30), np.float32))
    with pytest.raises(TypeError, match="partial must be"):
        call(wt, x, 0.5, out, rows, np.empty(31, np.float32))
    with pytest.raises(ValueError, match="n_chunks"):
        cpu.workspace(33, 31, 0)
    with pytest.raises(ValueError, match="channel_scale has shape"):
        call(wt, x, 0.5, out, rows, channel_scale=np.ones(32, np.float32))
    with pytest.raises(TypeError, match="wt must be"):
        cpu.dense_gemv_fp32(wt.tolist(), x)
    q, s = quantize_int8(wt, 8)
    with pytest.raises(ValueError, match="scales shape"):
        cpu.sparse_gemv_int8(q, s[:, :-1].copy(), 8, x, 0.5)
    with pytest.raises(ValueError, match="scales shape"):
        cpu.dense_gemv_int8(q, s, 16, x)
    with pytest.raises(TypeError, match="q must be"):
        cpu.dense_gemv_int8(q.astype(np.int16), s, 8, x)
    with pytest.raises(ValueError, match="group must be"):
        cpu.dense_gemv_int8(q, s, 0, x)
    bad = wt.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8(bad, 8)
