"""CUDA kernels (kernels/cuda) against float64 references.

The sparse GEMV (plain, grouped, gated input) answers to a float64 masked product; the decode
kernels (residual add + RMS norm, attention) to :mod:`sparsify_kernels.cuda.reference_ops`. GPU
tests carry the `gpu` marker and skip without a CUDA device or nvcc; the build test needs only
nvcc, so CI without a GPU still proves that the kernel sources and the C headers compile.
"""

from __future__ import annotations

import math
import subprocess
import zlib

import pytest
import torch
from sparsify_kernels import cuda as kc
from sparsify_kernels.cuda import reference_ops as ref_ops

NVCC = kc.find_nvcc()
HAVE_GPU = torch.cuda.is_available() and NVCC is not None
G = kc.INT8_GROUP
U32 = 2.0**-24  # unit roundoff of float32


def on_gpu(fn):
    """Mark a test as needing a CUDA device and nvcc."""
    skip = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA device and nvcc")
    return pytest.mark.gpu(skip(fn))


@pytest.fixture
def gen(request) -> torch.Generator:
    """CPU generator seeded from the test's id: reproducible, distinct per test case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---- helpers ------------------------------------------------------------------------------------

def make_weights(gen, k: int, n: int, dtype: torch.dtype):
    """Random input-major (K, N) weights on CPU, plus int8 scales (K, ceil(N / G)) or None."""
    if dtype is torch.int8:
        w = torch.randint(-127, 128, (k, n), generator=gen, dtype=torch.int8)
        scales = torch.rand(k, -(-n // G), generator=gen) * 0.02 + 1e-3
        return w, scales
    return torch.randn(k, n, generator=gen).to(dtype), None


def threshold_for(score: torch.Tensor, sparsity: float) -> float:
    """float32 threshold that drops round(sparsity * K) channels of ``score`` (ties aside)."""
    drop = round(sparsity * score.numel())
    if drop == 0:
        return -1.0
    return float(torch.sort(score).values[drop - 1])


def kept(x, t, factor=None) -> torch.Tensor:
    """float64 x with dropped channels zeroed; the mask is evaluated in float32 like the kernel."""
    score = x.abs() if factor is None else x.abs() * factor
    return torch.where(~(score <= t), x.double(), torch.zeros((), dtype=torch.float64))


def dequant(w, scales=None) -> torch.Tensor:
    """float64 (K, N) weights; int8 times its per-group scale."""
    wd = w.double()
    if scales is not None:
        wd = wd * scales.double().repeat_interleave(G, dim=1)[:, : w.shape[1]]
    return wd


def reference(w, x, t, factor=None, scales=None) -> torch.Tensor:
    """float64 y (N,) = W^T (x * keep)."""
    return kept(x, t, factor) @ dequant(w, scales)


def abs_bound(w, x, t, factor=None, scales=None) -> torch.Tensor:
    """Per-output rounding bound for a float32 sum of the kept products, in any order.

    Higham's bound |fl(sum) - sum| <= gamma_K * sum|terms| with gamma_K ~ K * u, plus 2u for
    rounding x * scale and each product.
    """
    mag = kept(x, t, factor).abs() @ dequant(w, scales).abs()
    return (w.shape[0] + 2) * U32 * mag + 1e-30


def check(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Every element written and within the float32 bound; the norm-wise error is tiny."""
    y = y.double().cpu()
    assert not torch.isnan(y).any(), "output still holds NaN poison or produced NaN"
    err = (y - ref).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"element {worst}: got {y[worst]}, want {ref[worst]}, bound {bound[worst]}")
    denom = float(ref.norm())
    if denom > 0:
        # float32 accumulation of a few thousand random terms lands near 1e-7 relative; a single
        # missing or repeated row would show as about 1/sqrt(active rows) >= 1e-2.
        assert float((y - ref).norm()) / denom < 1e-5


def run(w, x, t, factor=None, scales=None, **kw) -> torch.Tensor:
    """Call the kernel on the GPU with a NaN-poisoned output."""
    dev = torch.device("cuda")
    out = torch.full((w.shape[1],), float("nan"), device=dev)
    kc.sparse_gemv(
        w.to(dev), x.to(dev), torch.tensor([t], dtype=torch.float32, device=dev),
        factor=None if factor is None else factor.to(dev),
        scales=None if scales is None else scales.to(dev), out=out, **kw)
    torch.cuda.synchronize()
    return out


DTYPES = [torch.float16, torch.bfloat16, torch.int8]
# (K, N): scalar path (odd N), vector path with a partial tile and a short int8 scale group,
# single row / column, and a full-size vector shape.
SHAPES = [(1, 1), (31, 33), (577, 1537), (1537, 576), (33, 4096), (4096, 4096)]


# ---- build (no GPU needed) ----------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_source_compiles_for_sm90_and_header_is_c(tmp_path):
    for source in kc.SOURCES:
        cmd = kc.compile_command(NVCC, (9, 0), tmp_path / f"{source.stem}.o", shared=False,
                                 source=source)
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    src = tmp_path / "use_header.c"
    src.write_text(
        '#include "sparse_gemv.h"\n'
        '#include "decode_ops.h"\n'
        "int main(void) {\n"
        "  size_t b = sparsify_gemv_workspace_bytes(4096, 4096);\n"
        "  cudaError_t (*f)(const void *, const float *, const float *, const float *, float *,\n"
        "                   int, int, void *, size_t, cudaStream_t) = sparsify_gemv_f16;\n"
        "  sparsify_gemv_segment seg = {0, 0, 0, 0, 0, 0};\n"
        "  size_t a = sparsify_attention_smem_bytes(128, 128, 64);\n"
        "  return (b == 0) + (f == 0) + (SPARSIFY_GEMV_INT8_GROUP != 128) + seg.n + (a == 0)\n"
        "         + (SPARSIFY_GEMV_MAX_SEGMENTS != 3);\n"
        "}\n")
    cmd = [NVCC, "-x", "c", "-Xcompiler", "-std=c11,-Wall,-Wextra,-Wpedantic,-Werror",
           f"-I{kc.HERE}", "-c", str(src), "-o", str(tmp_path / "use_header.o")]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---- correctness on the device ------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(gen, dtype, shape, sparsity):
    k, n = shape
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), sparsity)
    y = run(w, x, t, scales=scales)
    check(y, reference(w, x, t, scales=scales), abs_bound(w, x, t, scales=scales))
    if sparsity == 1.0:
        assert bool((y == 0).all())


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_input(gen, dtype):
    k, n = 577, 1024
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.zeros(k)
    for t in (0.0, -1.0):  # 0: every channel dropped; -1: every zero channel kept
        y = run(w, x, t, scales=scales)
        assert bool((y == 0).all()), f"threshold {t}"


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_active_channel(gen, dtype):
    k, n = 1537, 576
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.rand(k, generator=gen) * 0.5
    i = int(torch.randint(0, k, (1,), generator=gen))
    x[i] = 3.0
    y = run(w, x, 1.0, scales=scales)
    check(y, reference(w, x, 1.0, scales=scales), abs_bound(w, x, 1.0, scales=scales))
    assert bool((y != 0).sum() > 0)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_aware_factor(gen, dtype):
    k, n = 4096, 1024
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen)
    factor = torch.rand(k, generator=gen) * 4
    t = threshold_for(x.abs() * factor, 0.6)
    y = run(w, x, t, factor=factor, scales=scales)
    check(y, reference(w, x, t, factor, scales), abs_bound(w, x, t, factor, scales))
    # the factor changes which channels are kept, so the magnitude-only result must differ
    assert not torch.equal(y, run(w, x, t, scales=scales))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_policy(gen, dtype):
    k, n = 1537, 1024
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.5)
    xn = x.clone()
    xn[7] = float("nan")  # a NaN channel is kept and poisons every output
    assert bool(torch.isnan(run(w, xn, t, scales=scales)).all())
    # a NaN threshold keeps every channel: the dense product
    y = run(w, x, float("nan"), scales=scales)
    check(y, reference(w, x, -1.0, scales=scales), abs_bound(w, x, -1.0, scales=scales))
    if dtype is not torch.int8:
        # Inf in a dropped row is never read
        dropped = int(torch.argmin(x.abs()))
        wi = w.clone()
        wi[dropped] = float("inf")
        y = run(wi, x, t)
        check(y, reference(w, x, t), abs_bound(w, x, t))


@on_gpu
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
                                     18])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launch_variants_agree(gen, dtype, variant):
    if variant in kc.SM90_VARIANTS and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    k, n = 4096, 1024
    w, scales = make_weights(gen, k, n, dtype)
    # Dense, mid (the pipelined loop's partial batches), and empty active lists.
    for sparsity in (0.0, 0.7, 1.0):
        x = torch.randn(k, generator=gen)
        t = threshold_for(x.abs(), sparsity)
        ref, bound = reference(w, x, t, scales=scales), abs_bound(w, x, t, scales=scales)
        for bps in (0, 1):
            check(run(w, x, t, scales=scales, variant=variant, blocks_per_sm=bps), ref, bound)


@on_gpu
def test_variant_environment_override(gen, monkeypatch):
    # SPARSIFY_GEMV_VARIANT switches the default launches (plain and grouped) to another launch
    # variant for benchmarks; the result stays the same function, and a bad value is an error.
    k, n = 1537, 576
    w, _ = make_weights(gen, k, n, torch.float16)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.5)
    ref, bound = reference(w, x, t), abs_bound(w, x, t)
    for v in ("10", "13"):
        monkeypatch.setenv("SPARSIFY_GEMV_VARIANT", v)
        check(run(w, x, t), ref, bound)
    monkeypatch.setenv("SPARSIFY_GEMV_VARIANT", "99")
    with pytest.raises(RuntimeError):
        run(w, x, t)


@on_gpu
def test_blocks_per_sm_environment_cap(gen, monkeypatch):
    # SPARSIFY_GEMV_BLOCKS_PER_SM caps the resident blocks every default launch sizes its grid
    # for: fewer splits (the grouped launch's partial-output count follows it), the same product.
    dev = torch.device("cuda")
    k, ns = 4096, (4096, 1024, 1024)
    ws = [make_weights(gen, k, n, torch.float16)[0] for n in ns]
    wd = [w.to(dev) for w in ws]
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.5)
    splits = {}
    for cap in ("", "2", "1"):
        monkeypatch.setenv("SPARSIFY_GEMV_BLOCKS_PER_SM", cap)
        splits[cap] = kc.group_splits(wd, x.to(dev))
        outs = kc.sparse_gemv_group(wd, x.to(dev), [t] * 3)
        for w, y in zip(ws, outs):
            check(y, reference(w, x, t), abs_bound(w, x, t))
        check(run(ws[1], x, t), reference(ws[1], x, t), abs_bound(ws[1], x, t))
    assert splits[""] > splits["2"] > splits["1"] >= 1


def skewed_input(gen, k: int, where: str) -> torch.Tensor:
    """x whose large entries sit in one stretch of K (first or last 600 rows, or every 97th row),
    so that at mid sparsity the kept rows crowd into a few K-splits."""
    x = torch.randn(k, generator=gen) * 0.01
    sel = {"head": slice(0, 600), "tail": slice(k - 600, k), "comb": slice(0, k, 97)}[where]
    x[sel] = torch.randn(x[sel].numel(), generator=gen) * 10
    return x


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "normed", "gated", "rows_in", "rows_out"])
@pytest.mark.parametrize("variant", [14, 18])
def test_balanced_splits_match_reference(gen, dtype, mode, variant, monkeypatch):
    # Variants 14 and 18 cut the K-splits by kept count: every block streams rows of other
    # blocks' chunks (14: from their lists, through the cluster; 18: from a whole-K compaction
    # of its own). The product must not change, whichever way the kept rows fall: spread out,
    # crowded into the first or last split, a sparse comb, or none at all.
    if variant == 14 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    monkeypatch.setenv("SPARSIFY_GEMV_VARIANT", str(variant))
    dev = torch.device("cuda")
    on = lambda t: None if t is None else t.to(dev)
    # 8192 is variant 18's largest K; 8193 takes the chunked launch
    for k, n in ((4096, 1024), (1537, 576), (3000, 2304), (8192, 512), (8193, 256)):
        w, sc = make_weights(gen, k, n, dtype)
        wd = w.to(dev)
        # crowded cases keep fewer rows than the stretch holds, so every kept row is in it
        for where, sparsity in (("spread", 0.0), ("spread", 0.5), ("head", 1 - 500 / k),
                                ("tail", 1 - 300 / k), ("comb", 1 - 10 / k), ("spread", 1.0)):
            x = torch.randn(k, generator=gen) if where == "spread" else skewed_input(gen, k, where)
            kw, xa, bound_scale = {}, x, 1
            if mode == "normed":
                nw = torch.rand(k, generator=gen) + 0.5
                kw = {"norm": nw.to(dev), "eps": 1e-5}
                xa, bound_scale = normed_input(x, nw, 1e-5), 2
            elif mode == "gated":
                u = torch.randn(k, generator=gen)
                kw, xa = {"up": u.to(dev), "act": "silu"}, ref_ops.gated_input(x, u, "silu")
            elif mode == "rows_in":
                # three partial rows of the same skew; the kernel adds them in row order
                parts = torch.stack([x * 0.5, x * 0.3, x * 0.2])
                xa = (parts[0] + parts[1]) + parts[2]
            t = threshold_mid(xa.abs(), sparsity)
            ref = reference(w, xa, t, scales=sc)
            bound = bound_scale * abs_bound(w, xa, t, scales=sc)
            if mode == "rows_in":
                out = torch.full((n,), float("nan"), device=dev)
                kc.sparse_gemv_group([wd], parts.to(dev), [t], [out], scales=[on(sc)])
                check(out, ref, bound)
            elif mode == "rows_out":
                splits = kc.group_splits([wd], x.to(dev))
                rows = torch.full((splits, n), float("nan"), device=dev)
                kc.sparse_gemv_group([wd], x.to(dev), [t], [rows], scales=[on(sc)])
                r = rows.double().cpu()
                assert not r.isnan().any(), "a partial row was not written"
                check(r.sum(0), ref, bound + splits * U32 * r.abs().sum(0))
            else:
                check(run(w, x, t, scales=sc, **kw), ref, bound)


@on_gpu
def test_deterministic(gen):
    k, n = 14336, 1024
    w, _ = make_weights(gen, k, n, torch.float16)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.4)
    for variant in (0, 14, 18) if torch.cuda.get_device_capability()[0] >= 9 else (0, 18):
        first = run(w, x, t, variant=variant)
        for _ in range(3):
            assert torch.equal(run(w, x, t, variant=variant), first)


@on_gpu
@pytest.mark.parametrize("variant", [0, 3, 10, 13, 14, 18])
def test_back_to_back_launches_respect_dependencies(gen, variant):
    # Each step reads the previous step's output and overwrites the buffer the previous step
    # read (read-after-write and write-after-read across kernels). Launched back to back with no
    # host synchronisation, the chain must equal, bit for bit, the same chain synchronised after
    # every step: the kernel is deterministic, so any stale read shows as a difference.
    if variant in kc.SM90_VARIANTS and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    dev = torch.device("cuda")
    k = 2048
    w = (torch.randn(k, k, generator=gen) / math.sqrt(k)).half().to(dev)
    x0 = torch.randn(k, generator=gen).to(dev)
    t = torch.tensor([0.5], device=dev)

    def chain(sync: bool) -> torch.Tensor:
        a, b = x0.clone(), torch.empty_like(x0)
        for _ in range(6):
            kc.sparse_gemv(w, a, t, out=b, variant=variant)
            if sync:
                torch.cuda.synchronize()
            a, b = b, a
        torch.cuda.synchronize()
        return a

    assert torch.equal(chain(sync=False), chain(sync=True))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_replay_follows_threshold(gen, dtype):
    dev = torch.device("cuda")
    k, n = 4096, 1536
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen)
    wd, sd = w.to(dev), None if scales is None else scales.to(dev)
    xd = x.to(dev)
    td = torch.zeros(1, device=dev)
    out = torch.empty(n, device=dev)
    ws = kc.make_workspace(k, n, dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch recommends
        kc.sparse_gemv(wd, xd, td, scales=sd, out=out, workspace=ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kc.sparse_gemv(wd, xd, td, scales=sd, out=out, workspace=ws)
    for sparsity in (0.3, 0.9, 0.0, 0.9):
        xn = torch.randn(k, generator=gen)
        t = threshold_for(xn.abs(), sparsity)
        xd.copy_(xn)
        td.fill_(t)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(w, xn, t, scales=scales), abs_bound(w, xn, t, scales=scales))


@on_gpu
def test_rejects_bad_arguments(gen):
    dev = torch.device("cuda")
    w = torch.randn(64, 128, device=dev).half()
    x = torch.randn(64, device=dev)
    with pytest.raises(ValueError, match="float32"):
        kc.sparse_gemv(w, x.half(), 0.5)
    with pytest.raises(ValueError, match="shape"):
        kc.sparse_gemv(w, x[:63], 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        kc.sparse_gemv(w.t(), torch.randn(128, device=dev), 0.5)
    with pytest.raises(ValueError, match="CUDA"):
        kc.sparse_gemv(w.cpu(), x, 0.5)
    with pytest.raises(ValueError, match="scales"):
        kc.sparse_gemv(w.to(torch.int8), x, 0.5)
    with pytest.raises(ValueError, match="float16, bfloat16 or int8"):
        kc.sparse_gemv(w.float(), x, 0.5)
    with pytest.raises(ValueError, match="out"):
        kc.sparse_gemv(w, x, 0.5, out=torch.empty(127, device=dev))
    assert math.isfinite(float(kc.sparse_gemv(w, x, 0.5).sum()))


# ---- grouped launch and gated input ---------------------------------------------------------

def threshold_mid(score: torch.Tensor, sparsity: float) -> float:
    """Threshold halfway between the scores either side of the cut: values computed on two
    devices (float32 activations on the CPU and in the kernel) may differ in the last bits, and
    a channel sitting exactly at the threshold would then be kept by one side only."""
    drop = round(sparsity * score.numel())
    if drop == 0:
        return -1.0
    v = torch.sort(score).values
    return float(v[-1]) * 2 + 1 if drop == v.numel() else float((v[drop - 1] + v[drop]) / 2)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", [(512, 128, 136), (33, 576, 7), (4096, 1024, 1024), (200, 200)],
                         ids=lambda ns: "-".join(map(str, ns)))
def test_group_matches_reference(gen, dtype, ns):
    # Segments of one launch share x but not their thresholds, factors or outputs: one runs at
    # half sparsity, one dense (or weight-aware), one with every channel dropped.
    k = 577 if ns[0] != 4096 else 4096
    dev = torch.device("cuda")
    x = torch.randn(k, generator=gen)
    ws, scs, thr, fac = [], [], [], []
    for j, n in enumerate(ns):
        w, sc = make_weights(gen, k, n, dtype)
        ws.append(w)
        scs.append(sc)
        f = torch.rand(k, generator=gen) * 3 if j == 1 and len(ns) == 3 else None
        fac.append(f)
        score = x.abs() if f is None else x.abs() * f
        thr.append([threshold_for(score, 0.5), -1.0 if f is None else threshold_for(score, 0.3),
                    threshold_for(score, 1.0)][j])
    outs = [torch.full((n,), float("nan"), device=dev) for n in ns]
    kc.sparse_gemv_group([w.to(dev) for w in ws], x.to(dev),
                         [torch.tensor([t], device=dev) for t in thr], outs,
                         factors=[None if f is None else f.to(dev) for f in fac],
                         scales=[None if sc is None else sc.to(dev) for sc in scs])
    torch.cuda.synchronize()
    for j in range(len(ns)):
        check(outs[j], reference(ws[j], x, thr[j], fac[j], scs[j]),
              abs_bound(ws[j], x, thr[j], fac[j], scs[j]))
    if len(ns) == 3:
        assert bool((outs[2] == 0).all())


@on_gpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_input_matches_reference(gen, dtype, act):
    dev = torch.device("cuda")
    for k, n in ((1537, 1024), (577, 33)):
        w, sc = make_weights(gen, k, n, dtype)
        g, u = torch.randn(k, generator=gen) * 3, torch.randn(k, generator=gen)
        xa = ref_ops.gated_input(g, u, act)  # float32, as the kernel forms it
        for sparsity in (0.0, 0.5, 1.0):
            t = threshold_mid(xa.abs(), sparsity)
            y = run(w, g, t, scales=sc, up=u.to(dev), act=act)
            check(y, reference(w, xa, t, scales=sc), abs_bound(w, xa, t, scales=sc))


def normed_input(x: torch.Tensor, nw: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 RMS-normed input (the kernel's x', rounded once from float64)."""
    return ref_ops.rms_norm(x, nw, eps).float()


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kn", [(4096, 1024), (1537, 576), (577, 33)],
                         ids=lambda kn: f"{kn[0]}x{kn[1]}")
def test_normed_input_matches_reference(gen, dtype, kn):
    # The residual stream at its natural scale (not unit): the norm must actually rescale.
    k, n = kn
    dev = torch.device("cuda")
    w, sc = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen) * 7 + 0.5
    nw = torch.rand(k, generator=gen) * 2 - 0.5  # signs mixed, some weights near zero
    eps = 1e-5
    xa = normed_input(x, nw, eps)
    f = torch.rand(k, generator=gen) * 3
    for sparsity, factor in ((0.0, None), (0.5, None), (0.5, f), (0.9, None), (1.0, None)):
        score = xa.abs() if factor is None else xa.abs() * factor
        t = threshold_mid(score, sparsity)
        y = run(w, x, t, factor=factor, scales=sc, norm=nw.to(dev), eps=eps)
        # The kernel's scale sums K squares in float32: up to ~K u relative on each input, on
        # top of the product's own rounding (abs_bound), hence twice the bound.
        check(y, reference(w, xa, t, factor, sc), 2 * abs_bound(w, xa, t, factor, sc))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_adds_into_out(gen, dtype):
    # Plain, gated and normed inputs, one segment and three: out += result, every element.
    dev = torch.device("cuda")
    k = 1537
    ns = (1024, 33, 576)
    ws, scs = zip(*(make_weights(gen, k, n, dtype) for n in ns))
    g, u = torch.randn(k, generator=gen) * 3, torch.randn(k, generator=gen)
    nw = torch.rand(k, generator=gen) + 0.5
    for mode in ("plain", "gated", "normed"):
        if mode == "plain":
            xa, kw = g, {}
        elif mode == "gated":
            xa, kw = ref_ops.gated_input(g, u, "silu"), {"up": u.to(dev), "act": "silu"}
        else:
            xa, kw = normed_input(g, nw, 1e-6), {"norm": nw.to(dev), "eps": 1e-6}
        t = threshold_mid(xa.abs(), 0.5)
        y0 = [torch.randn(n, generator=gen) * 10 for n in ns]
        outs = [v.to(dev) for v in y0]
        kc.sparse_gemv_group([w.to(dev) for w in ws], g.to(dev), [t] * 3, outs,
                             scales=[None if sc is None else sc.to(dev) for sc in scs],
                             accumulate=True, **kw)
        single = y0[0].to(dev)
        kc.sparse_gemv(ws[0].to(dev), g.to(dev), t, out=single, accumulate=True,
                       scales=None if scs[0] is None else scs[0].to(dev), **kw)
        torch.cuda.synchronize()
        for j, (w, sc) in enumerate(zip(ws, scs)):
            ref = y0[j].double() + reference(w, xa, t, scales=sc)
            bound = 2 * abs_bound(w, xa, t, scales=sc) + 2 * U32 * ref.abs()
            check(outs[j], ref, bound)
            if j == 0:
                check(single, ref, bound)
    # K = 0: nothing to add, the output is left as it was.
    out = torch.randn(8, generator=gen).to(dev)
    before = out.clone()
    kc.sparse_gemv(torch.zeros(0, 8, device=dev).half(), torch.zeros(0, device=dev), 0.5,
                   out=out, accumulate=True)
    torch.cuda.synchronize()
    assert torch.equal(out, before)


@on_gpu
def test_group_and_gate_reject_bad_arguments(gen):
    dev = torch.device("cuda")
    w = torch.randn(64, 128, device=dev).half()
    x = torch.randn(64, device=dev)
    with pytest.raises(ValueError, match="segments"):
        kc.sparse_gemv_group([w] * 4, x, [0.5] * 4)
    with pytest.raises(ValueError, match="K="):
        kc.sparse_gemv_group([w, torch.randn(63, 128, device=dev).half()], x, [0.5, 0.5])
    with pytest.raises(ValueError, match="act"):
        kc.sparse_gemv(w, x, 0.5, up=x, act="relu")
    with pytest.raises(ValueError, match="act needs up"):
        kc.sparse_gemv(w, x, 0.5, act="silu")
    nw = torch.ones(64, device=dev)
    with pytest.raises(ValueError, match="either gated"):
        kc.sparse_gemv(w, x, 0.5, up=x, act="silu", norm=nw)
    with pytest.raises(ValueError, match="eps"):
        kc.sparse_gemv(w, x, 0.5, norm=nw, eps=-1.0)
    with pytest.raises(ValueError, match="norm must have shape"):
        kc.sparse_gemv(w, x, 0.5, norm=torch.ones(63, device=dev))
    with pytest.raises(ValueError, match="give every out"):
        kc.sparse_gemv(w, x, 0.5, accumulate=True)
    with pytest.raises(ValueError, match="default launch"):
        kc.sparse_gemv(w, x, 0.5, norm=nw, variant=1)
    buf = torch.zeros(192, device=dev)  # x and the output in one buffer: a race, refused
    with pytest.raises(ValueError, match="overlap"):
        kc.sparse_gemv(w, buf[:64], 0.5, out=buf[32:160])


# ---- deferred split-K reduction (partial rows out, partial rows in) ------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "normed"])
@pytest.mark.parametrize("kns", [(4096, (4096, 1024, 1024)), (1537, (576, 33)), (577, (136,))],
                         ids=lambda c: f"{c[0]}x{'-'.join(map(str, c[1]))}")
def test_partial_outputs_add_up_to_reference(gen, dtype, mode, kns):
    # Segments side by side in one (splits, width) buffer, as the engine lays out q/k/v: row s
    # holds split s's sums; the rows add up to the product, and every row is written.
    k, ns = kns
    dev = torch.device("cuda")
    ws, scs = zip(*(make_weights(gen, k, n, dtype) for n in ns))
    x = torch.randn(k, generator=gen) * 3 + 0.25
    nw = torch.rand(k, generator=gen) + 0.5
    xa, kw = (x, {}) if mode == "plain" else (normed_input(x, nw, 1e-5),
                                              {"norm": nw.to(dev), "eps": 1e-5})
    thr = [threshold_mid(xa.abs(), s) for s in (0.5, 0.0, 0.9)[:len(ns)]]
    wd = [w.to(dev) for w in ws]
    splits = kc.group_splits(wd, x.to(dev), norm=kw.get("norm"))
    assert splits >= 1
    width = sum(ns) + 5  # a row stride wider than the rows
    buf = torch.full((splits, width), float("nan"), device=dev)
    offs = [sum(ns[:j]) for j in range(len(ns))]
    outs = [buf[:, o:o + n] for o, n in zip(offs, ns)]
    kc.sparse_gemv_group(wd, x.to(dev), thr, outs,
                         scales=[None if sc is None else sc.to(dev) for sc in scs], **kw)
    reduced = kc.sparse_gemv_group(wd, x.to(dev), thr,
                                   scales=[None if sc is None else sc.to(dev) for sc in scs], **kw)
    torch.cuda.synchronize()
    assert bool(buf[:, sum(ns):].isnan().all()), "wrote past the segments"
    for j, (w, sc) in enumerate(zip(ws, scs)):
        rows = outs[j].double().cpu()
        assert not rows.isnan().any(), f"segment {j}: a partial row was not written"
        ref = reference(w, xa, thr[j], scales=sc)
        bound = (2 if mode == "normed" else 1) * abs_bound(w, xa, thr[j], scales=sc)
        check(rows.sum(0), ref, bound + splits * U32 * rows.abs().sum(0))
        # Against the launch that reduces itself: only the order of the split additions differs.
        check(reduced[j], rows.sum(0), splits * 4 * U32 * rows.abs().sum(0) + 1e-30)


def partial_rows(gen, rows: int, k: int, scale: float = 1.0):
    """(rows, k) views with a row stride wider than k, and their float32 sum in row order."""
    buf = torch.randn(rows, 2 * k + 7, generator=gen) * scale
    a, b = buf[:, :k], buf[:, k + 3:2 * k + 3]
    sa, sb = a[0].clone(), b[0].clone()
    for r in range(1, rows):
        sa, sb = sa + a[r], sb + b[r]
    return buf, a, b, sa, sb


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [2, 3, 5, 9])
def test_partial_input_rows(gen, dtype, act, rows):
    # The input as partial rows (plain, or gate and up for a gated input): the same product as
    # one row holding their float32 sum in row order, bit for bit (same splits, same values).
    dev = torch.device("cuda")
    for k, n in ((1537, 1024), (577, 33), (4096, 512)):
        w, sc = make_weights(gen, k, n, dtype)
        buf, _, _, gs, us = partial_rows(gen, rows, k)
        bd = buf.to(dev)
        g2, u2 = bd[:, :k], bd[:, k + 3:2 * k + 3]
        xa = gs if act is None else ref_ops.gated_input(gs, us, act)
        for sparsity in (0.0, 0.5, 1.0):
            t = threshold_mid(xa.abs(), sparsity)
            out = torch.full((n,), float("nan"), device=dev)
            sd = None if sc is None else sc.to(dev)
            rows_kw = {} if act is None else {"up": u2, "act": act}
            one_kw = {} if act is None else {"up": us.to(dev), "act": act}
            kc.sparse_gemv_group([w.to(dev)], g2, [t], [out], scales=[sd], **rows_kw)
            one = run(w, gs, t, scales=sc, **one_kw)
            check(out, reference(w, xa, t, scales=sc), abs_bound(w, xa, t, scales=sc))
            same_grid = (kc.group_splits([w.to(dev)], g2, **rows_kw)
                         == kc.group_splits([w.to(dev)], gs.to(dev), **one_kw))
            if same_grid:
                assert torch.equal(out, one)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deferred_gate_up_feeds_down(gen, dtype):
    # The engine's FFN chain: normed gate/up with partial outputs, then ffn_down adding the
    # rows while it forms act(gate) * up; against the chain with both reductions in place.
    dev = torch.device("cuda")
    d, f = 1024, 2816
    (wg, sg), (wu, su) = make_weights(gen, d, f, dtype), make_weights(gen, d, f, dtype)
    wdn, sdn = make_weights(gen, f, d, dtype)
    on = lambda t: None if t is None else t.to(dev)
    h = (torch.randn(d, generator=gen) * 5).to(dev)
    nw = (torch.rand(d, generator=gen) + 0.5).to(dev)
    ws = [wg.to(dev), wu.to(dev)]
    splits = kc.group_splits(ws, h, norm=nw)
    gu = torch.full((splits, 2 * f), float("nan"), device=dev)
    kc.sparse_gemv_group(ws, h, [0.3, 0.3], [gu[:, :f], gu[:, f:]], scales=[on(sg), on(su)],
                         norm=nw, eps=1e-5)
    g1, u1 = kc.sparse_gemv_group(ws, h, [0.3, 0.3], scales=[on(sg), on(su)], norm=nw, eps=1e-5)
    y_def = kc.sparse_gemv(wdn.to(dev), gu[:, :f], 0.05, scales=on(sdn), up=gu[:, f:],
                           act="silu")
    y_red = kc.sparse_gemv(wdn.to(dev), g1, 0.05, scales=on(sdn), up=u1, act="silu")
    torch.cuda.synchronize()
    assert splits > 1 and not gu.isnan().any()
    # Channels within rounding of the threshold could flip; none do at these random values
    # unless the sums differ grossly. The outputs differ only by the split order's rounding.
    err = float((y_def - y_red).abs().max() / y_red.abs().max())
    assert err < 1e-5, err


@on_gpu
def test_partial_rows_reject_bad_arguments(gen):
    dev = torch.device("cuda")
    w = torch.randn(64, 128, device=dev).half()
    x = torch.randn(64, device=dev)
    s = kc.group_splits([w], x)
    with pytest.raises(ValueError, match="rows"):
        kc.sparse_gemv_group([w], x, [0.5], [torch.zeros(s + 1, 128, device=dev)])
    with pytest.raises(ValueError, match="no accumulate"):
        kc.sparse_gemv_group([w], x, [0.5], [torch.zeros(s, 128, device=dev)], accumulate=True)
    rows = torch.randn(3, 64, device=dev)
    with pytest.raises(ValueError, match="normed input"):
        kc.sparse_gemv_group([w], rows, [0.5], norm=torch.ones(64, device=dev))
    with pytest.raises(ValueError, match="same rows"):
        kc.sparse_gemv(w, rows, 0.5, up=x, act="silu")
    with pytest.raises(ValueError, match="count and stride"):
        kc.sparse_gemv(w, rows, 0.5, up=torch.randn(2, 64, device=dev), act="silu")
    with pytest.raises(ValueError, match="apart"):
        kc.sparse_gemv_group([w], torch.randn(64, 3, device=dev).t(), [0.5])


# ---- residual add + RMS norm --------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("d", [1, 577, 4129])
@pytest.mark.parametrize("mode", ["no_add", "add", "post_norm"])
def test_add_rms_norm_matches_reference(gen, d, mode):
    dev = torch.device("cuda")
    h = torch.randn(d, generator=gen) * 2
    r = None if mode == "no_add" else torch.randn(d, generator=gen) * 5
    w = torch.randn(d, generator=gen)
    pw = torch.rand(d, generator=gen) + 0.5 if mode == "post_norm" else None
    eps = 1e-5
    hd = h.to(dev)
    out = torch.full((d,), float("nan"), device=dev)
    kc.add_rms_norm(hd, None if r is None else r.to(dev), w.to(dev), eps, out,
                    None if pw is None else pw.to(dev))
    torch.cuda.synchronize()
    h_ref, x_ref = ref_ops.add_rms_norm(h, r, w, eps, pw)
    # float32: a sum of d squares is within d*u of exact, rsqrt and each product add a few u,
    # and h + r' rounds once relative to |h| + |r'| (r' itself carries the norm's error).
    rp = torch.zeros(d, dtype=torch.float64) if r is None else (h_ref - h.double()).abs()
    tol_h = (d + 8) * U32 * (h.double().abs() + rp) + 1e-30
    s = x_ref.abs() / h_ref.abs().clamp_min(1e-30)  # |rsqrt(mean h^2 + eps) * w|
    tol_x = (d + 8) * U32 * (x_ref.abs() + s * (h.double().abs() + rp)) + 1e-30
    assert not torch.isnan(out).any()
    assert bool(((hd.double().cpu() - h_ref).abs() <= tol_h).all())
    assert bool(((out.double().cpu() - x_ref).abs() <= tol_x).all())


# ---- decode attention ---------------------------------------------------------------------------

def rope_tables(gen, L: int, dk: int, neox: bool):
    """cos/sin tables (L, dk) and partner index (dk,) int32 in the engine's layout, at random
    angles; the last quarter of the features does not rotate (cos 1, sin 0, perm identity)."""
    rd = dk // 2 if dk >= 8 else dk
    rd -= rd % 2
    half = rd // 2
    pairs = torch.arange(half)
    lo, hi = (pairs, pairs + half) if neox else (2 * pairs, 2 * pairs + 1)
    perm = torch.arange(dk)
    perm[lo], perm[hi] = hi, lo
    ang = torch.rand(L, half, generator=gen) * 6.3
    cos, sin = torch.ones(L, dk), torch.zeros(L, dk)
    cos[:, lo], cos[:, hi] = torch.cos(ang), torch.cos(ang)
    sin[:, lo], sin[:, hi] = -torch.sin(ang), torch.sin(ang)
    return cos, sin, perm.to(torch.int32)


ATTN_CASES = [  # n_head, n_head_kv, dk, dv, max_len, pos, window, qk_norm, neox
    (6, 3, 8, 8, 40, 0, 0, False, False),
    (6, 2, 36, 44, 97, 50, 0, False, True),
    (32, 8, 128, 128, 300, 299, 0, False, False),
    (4, 1, 256, 256, 64, 40, 7, True, True),
    (4, 4, 64, 64, 1025, 1000, 0, True, False),
    (8, 2, 128, 128, 600, 555, 512, False, True),
]


def check_attention(gen, case, rows: int = 0, splits: int = 1, group: bool = False,
                    cache: torch.dtype = torch.float32) -> None:
    """The attention kernel on one case against the reference: q/k/v as one vector (rows = 0)
    or as `rows` unreduced split rows of the q/k/v GEMV, which the kernel adds (in its own fixed
    order) before use, against the reference on their float32 sum in row order; with `splits`,
    the visible keys cut into ranges over up to that many blocks per head (with `group`, per
    key/value head, each block serving the group's query heads); `cache` the caches' element
    type. Checks the output, the new key and value at pos, and that no other cache entry
    moved."""
    nh, nkv, dk, dv, L, pos, window, qk_norm, neox = case
    dev = torch.device("cuda")
    width = nh * dk + nkv * (dk + dv)
    if rows:
        buf = torch.randn(rows, width + 9, generator=gen) / math.sqrt(rows)
        parts = buf[:, 3:3 + width]  # a row stride wider than the rows
        qkv = parts[0].clone()
        for r in range(1, rows):
            qkv = qkv + parts[r]
        arg = buf.to(dev)[:, 3:3 + width]
    else:
        qkv = torch.randn(width, generator=gen)
        arg = qkv.to(dev)
    kc_ = torch.randn(nkv, L, dk, generator=gen).to(cache)
    vc_ = torch.randn(nkv, L, dv, generator=gen).to(cache)
    # NaN wherever the kernel must not read: after pos, and before the window.
    t0 = max(0, pos - window + 1) if window else 0
    for c in (kc_, vc_):
        c[:, pos + 1:] = float("nan")
        c[:, :t0] = float("nan")
    cos, sin, perm = rope_tables(gen, L, dk, neox)
    qn = torch.rand(dk, generator=gen) + 0.5 if qk_norm else None
    kn = torch.rand(dk, generator=gen) + 0.5 if qk_norm else None
    scale, eps = 1.0 / math.sqrt(dk), 1e-6
    out_ref, kc_ref, vc_ref = ref_ops.attention_decode(
        qkv, kc_, vc_, pos, cos, sin, perm, n_head=nh, scale=scale, eps=eps, window=window,
        q_norm=qn, k_norm=kn)
    kd, vd = kc_.to(dev), vc_.to(dev)
    out = torch.full((nh * dv,), float("nan"), device=dev)
    ws = kc.attention_workspace(nh, dv, splits, dev) if splits > 1 else None
    kc.attention_decode(arg, kd, vd, torch.tensor([pos], device=dev), cos.to(dev), sin.to(dev),
                        perm.to(dev), out, n_head=nh, scale=scale, eps=eps, window=window,
                        q_norm=None if qn is None else qn.to(dev),
                        k_norm=None if kn is None else kn.to(dev), splits=splits,
                        workspace=ws, group_heads=group)
    torch.cuda.synchronize()
    got = out.double().cpu()
    assert not torch.isnan(got).any()
    ks, vs = kd[:, pos].double().cpu(), vd[:, pos].double().cpu()
    if cache == torch.float16:
        # The kernel rounds its float32 key and value, the reference its float64 ones: where
        # the two fall on either side of a float16 tie they differ by one float16 step (2^-10
        # relative), and the kernel must then use its own rounding at pos, as it stores it.
        for a, b in ((ks, kc_ref[:, pos]), (vs, vc_ref[:, pos])):
            assert bool(((a - b).abs() <= 2.0 ** -10 * b.abs() + 2.0 ** -24).all())
        out_ref, _, _ = ref_ops.attention_decode(
            qkv, kc_, vc_, pos, cos, sin, perm, n_head=nh, scale=scale, eps=eps, window=window,
            q_norm=qn, k_norm=kn, stored=(ks, vs))
    # float32 dot products of <= 512 terms and a softmax over <= 1025 keys land near 1e-6 of
    # the result's scale; a missing key, a wrong rotation or a wrong head is >= 1e-2.
    err = float((got - out_ref).abs().max() / out_ref.abs().max())
    assert err < 2e-5, err
    # The cache: position pos holds the rotated key (float32 rounding; the rows' sum in another
    # order adds a few ulps) and the value (exact from one vector; from rows, their sum in the
    # kernel's order); every other entry is untouched, NaN included.
    if cache == torch.float32:
        assert float((ks - kc_ref[:, pos]).abs().max()) < 1e-5 * float(
            kc_ref[:, pos].abs().max())
        if rows:
            assert float((vs - vc_ref[:, pos]).abs().max()) <= rows * 4 * U32 * float(
                buf.abs().sum(0).max())
        else:
            assert torch.equal(vd[:, pos].cpu(), vc_ref[:, pos].float())
    elif not rows:  # one float32 value, rounded once the same way by both
        assert torch.equal(vd[:, pos].cpu(), vc_ref[:, pos].half())
    others = torch.ones(L, dtype=torch.bool)
    others[pos] = False
    for got_c, want_c in ((kd, kc_), (vd, vc_)):
        a, b = got_c[:, others].cpu(), want_c[:, others]
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@on_gpu
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "h{}-{}_d{}-{}_L{}_p{}_w{}".format(*c))
def test_attention_decode_matches_reference(gen, case):
    check_attention(gen, case)


@on_gpu
@pytest.mark.parametrize("rows", [2, 7, 22, 40])
@pytest.mark.parametrize("case", [ATTN_CASES[1], ATTN_CASES[2], ATTN_CASES[3]],
                         ids=lambda c: "h{}-{}_d{}-{}".format(*c[:4]))
def test_attention_decode_partial_rows(gen, case, rows):
    check_attention(gen, case, rows)


def test_reference_attention_rounds_a_half_cache(gen):
    """The reference the float16 kernels are held to (CPU): with float16 caches the new key and
    value are stored rounded from float32, used rounded at pos (so the output is the float32
    cache's computation over the rounded rows), and ``stored`` replaces them."""
    nh, nkv, dk, dv, L, pos, window, _, neox = ATTN_CASES[1]
    qkv = torch.randn(nh * dk + nkv * (dk + dv), generator=gen)
    kc32, vc32 = torch.randn(nkv, L, dk, generator=gen), torch.randn(nkv, L, dv, generator=gen)
    kc16, vc16 = kc32.half(), vc32.half()
    cos, sin, perm = rope_tables(gen, L, dk, neox)
    args = (pos, cos, sin, perm)
    kw = {"n_head": nh, "scale": 0.2, "window": window}
    out32, k32, v32 = ref_ops.attention_decode(qkv, kc16.float(), vc16.float(), *args, **kw)
    out16, k16, v16 = ref_ops.attention_decode(qkv, kc16, vc16, *args, **kw)
    assert torch.equal(k16[:, pos], k32[:, pos].float().half().double())
    assert torch.equal(v16[:, pos], v32[:, pos].float().half().double())
    assert not torch.equal(k16[:, pos], k32[:, pos])  # the rounding is real
    others = torch.arange(L) != pos
    assert torch.equal(k16[:, others], kc16[:, others].double())
    # the same computation as a float32 cache that already holds the rounded rows
    kr, vr = kc16.float(), vc16.float()
    kr[:, pos], vr[:, pos] = k16[:, pos].float(), v16[:, pos].float()
    want, _, _ = ref_ops.attention_decode(qkv, kr, vr, *args, **kw,
                                          stored=(kr[:, pos], vr[:, pos]))
    assert torch.allclose(out16, want, rtol=0, atol=1e-12)
    assert float((out16 - out32).abs().max()) > 0
    # `stored` takes precedence over the reference's own rounding
    ks, vs = torch.zeros(nkv, dk), torch.ones(nkv, dv)
    _, k_s, v_s = ref_ops.attention_decode(qkv, kc16, vc16, *args, **kw, stored=(ks, vs))
    assert torch.equal(k_s[:, pos], ks.double()) and torch.equal(v_s[:, pos], vs.double())


@on_gpu
@pytest.mark.parametrize("rows", [0, 22])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "h{}-{}_d{}-{}_L{}_p{}_w{}".format(*c))
def test_attention_decode_half_cache_matches_reference(gen, case, rows):
    check_attention(gen, case, rows, cache=torch.float16)


# Split-KV cases: long enough for several ranges of 256 keys (or of fewer, under
# SPARSIFY_ATTN_SPLIT_KEYS), windows and grouped heads included.
SPLIT_CASES = [  # case, splits, SPARSIFY_ATTN_SPLIT_KEYS ("" = the default 256)
    (ATTN_CASES[2], 4, "100"),  # 300 keys: 3 ranges of 100
    (ATTN_CASES[2], 4, ""),  # 300 keys: below two ranges of 256, one block
    (ATTN_CASES[4], 4, ""),  # 1001 keys: 3 ranges (uneven: 334, 334, 333)
    (ATTN_CASES[4], 2, ""),  # 1001 keys, 2 ranges at most
    (ATTN_CASES[5], 8, ""),  # window 512: 2 ranges, the first starting at pos - 511
    ((6, 2, 36, 44, 2000, 1999, 0, False, True), 7, ""),  # run-time head sizes, 7 ranges
    ((4, 1, 256, 256, 900, 899, 0, True, True), 2, ""),
    (ATTN_CASES[0], 5, "8"),  # 1 key at pos 0: one range whatever the setting
    ((6, 3, 8, 8, 40, 39, 0, False, False), 5, "8"),  # 40 keys, 5 ranges of 8
    ((6, 3, 8, 8, 40, 39, 0, False, False), 64, "1"),  # keys per range raised to 64: 1 range
    ((2, 1, 16, 16, 300, 257, 3, False, False), 4, "1"),  # a window of 3 keys: 1 range
]


# Grouped split-KV: the split cases (splits now per key/value head, ranges of at least
# ceil(pairs / heads per group) keys) and groups of 3, 5 and 8 query heads (the kernel for up
# to 8, with two keys and value rows in flight per thread).
GROUP_CASES = SPLIT_CASES + [
    ((9, 3, 64, 64, 800, 799, 0, False, True), 4, ""),  # SmolLM2's grouping: 86-key ranges
    ((10, 2, 32, 32, 700, 650, 0, True, False), 5, "100"),  # 5 per group, q/k norm, 5 ranges
    ((16, 2, 64, 64, 1100, 1099, 0, False, False), 16, ""),  # 8 per group, 16 ranges of 68-69
    ((16, 2, 128, 128, 3000, 2999, 1000, False, True), 16, "128"),  # 8 per group, window
    ((8, 1, 256, 256, 600, 599, 0, True, True), 8, "128"),  # 8 on one key/value head, dk 256
]


@on_gpu
@pytest.mark.parametrize("case,splits,keys,group",
                         [(*c, False) for c in SPLIT_CASES] + [(*c, True) for c in GROUP_CASES],
                         ids=lambda c: "h{}-{}_d{}-{}_L{}_p{}_w{}".format(*c) if isinstance(
                             c, tuple) else ("grouped" if c is True else "per-head"
                                             if c is False else str(c)))
def test_attention_decode_split_matches_reference(gen, case, splits, keys, group, monkeypatch):
    monkeypatch.setenv("SPARSIFY_ATTN_SPLIT_KEYS", keys)
    check_attention(gen, case, splits=splits, group=group)
    # as in decode: q/k/v as 22 split rows, and with a float16 cache
    check_attention(gen, case, rows=22, splits=splits, group=group)
    check_attention(gen, case, rows=22, splits=splits, group=group, cache=torch.float16)


@on_gpu
@pytest.mark.parametrize("cache", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows", [0, 22])
@pytest.mark.parametrize("generic", ["0", "1"])
def test_attention_decode_grouped_one_range_is_unsplit(gen, rows, generic, cache, monkeypatch):
    """With one range (splits = 1, any position) the grouped kernel forms every sum of a head
    in the unsplit kernel's order: the outputs and caches are equal bit for bit, for every
    attention case, q/k/v as one vector or as partial rows, compiled head sizes or not, float32
    and float16 caches."""
    monkeypatch.setenv("SPARSIFY_ATTN_GENERIC", generic)
    dev = torch.device("cuda")
    cases = ATTN_CASES + [  # groups of 3, 5 and 8 (shorter caches: one range holds every score)
        (9, 3, 64, 64, 800, 799, 0, False, True), (10, 2, 32, 32, 700, 650, 0, True, False),
        (16, 2, 64, 64, 1100, 1099, 0, False, False),
        (16, 2, 128, 128, 1200, 1199, 1000, False, True),
        (8, 1, 256, 256, 600, 599, 0, True, True)]
    for nh, nkv, dk, dv, L, pos, window, qk_norm, neox in cases:
        width = nh * dk + nkv * (dk + dv)
        qkv = (torch.randn(rows, width, generator=gen) / 4 if rows
               else torch.randn(width, generator=gen)).to(dev)
        kc0 = torch.randn(nkv, L, dk, generator=gen).to(dev, cache)
        vc0 = torch.randn(nkv, L, dv, generator=gen).to(dev, cache)
        cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, neox))
        norms = ({"q_norm": (torch.rand(dk, generator=gen) + 0.5).to(dev),
                  "k_norm": (torch.rand(dk, generator=gen) + 0.5).to(dev)} if qk_norm else {})
        res = []
        for group in (False, True):
            out = torch.full((nh * dv,), float("nan"), device=dev)
            k, v = kc0.clone(), vc0.clone()
            kc.attention_decode(qkv, k, v, torch.tensor([pos], device=dev), cos, sin, perm, out,
                                n_head=nh, scale=0.3, eps=1e-6, window=window,
                                group_heads=group, **norms)
            res.append((out, k, v))
        torch.cuda.synchronize()
        (o1, k1, v1), (o2, k2, v2) = res
        assert not o1.isnan().any()
        assert torch.equal(o1, o2), (nh, nkv, dk, pos)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@on_gpu
@pytest.mark.parametrize("group", [False, True], ids=["per-head", "grouped"])
def test_attention_decode_split_replays_in_a_graph(gen, group):
    """One captured launch with up to 4 ranges per head (grouped: per key/value head),
    replayed at device-side positions that take 1, 2, 3 and 4 ranges (grouped: 3 and 4, and 1
    at 101 keys): each replay's output is bit for bit that of a direct launch at that position
    with its own fresh workspace, and equals the unsplit launch bit for bit where one range
    covers every key (fewer than two ranges' minimum). So the tickets reset themselves between
    launches and nothing depends on the capture-time position."""
    nh, nkv, dk, L = 8, 2, 64, 1100
    dev = torch.device("cuda")
    width = nh * dk + 2 * nkv * dk
    qkv = torch.randn(width, generator=gen).to(dev)
    kc0, vc0 = (torch.randn(nkv, L, dk, generator=gen).to(dev) for _ in range(2))
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    kd, vd = kc0.clone(), vc0.clone()
    pos = torch.tensor([0], device=dev)
    out = torch.zeros(nh * dk, device=dev)
    ws = kc.attention_workspace(nh, dk, 4, dev)
    # 256 keys a range (grouped: 64, ceil(256 / 4)), so 1 to 4 ranges by 200 / 512 keys
    one_range_below = kc.attention_split_keys(4, dev, n_head=nh, n_head_kv=nkv, group_heads=group)
    assert one_range_below == (64 if group else 256)

    def launch(o, k, v, p, splits, w):
        kc.attention_decode(qkv, k, v, p, cos, sin, perm, o, n_head=nh, scale=0.125,
                            splits=splits, workspace=w, group_heads=group and splits > 1)

    launch(out, kd, vd, pos, 4, ws)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        launch(out, kd, vd, pos, 4, ws)
    for p in (200, 600, 800, 1099, 100):
        pos.fill_(p)
        kd.copy_(kc0)
        vd.copy_(vc0)
        g.replay()
        want = torch.zeros_like(out)
        kw, vw = kc0.clone(), vc0.clone()
        launch(want, kw, vw, torch.tensor([p], device=dev), 4,
               kc.attention_workspace(nh, dk, 4, dev))
        plain = torch.zeros_like(out)
        launch(plain, kc0.clone(), vc0.clone(), torch.tensor([p], device=dev), 1, None)
        torch.cuda.synchronize()
        assert torch.equal(out, want), p
        assert torch.equal(kd, kw) and torch.equal(vd, vw), p
        if p + 1 < 2 * one_range_below:
            assert torch.equal(out, plain), p
        else:
            err = float((out - plain).abs().max() / plain.abs().max())
            assert 0 < err < 1e-5 or torch.equal(out, plain), (p, err)
    assert not ws[:4 * nh].any()  # every ticket back at zero


@on_gpu
def test_attention_decode_split_arguments(gen, monkeypatch):
    dev = torch.device("cuda")
    nh, nkv, dk, L = 4, 2, 16, 10
    qkv = torch.randn(nh * dk + nkv * 2 * dk, generator=gen).to(dev)
    kd, vd = torch.zeros(nkv, L, dk, device=dev), torch.zeros(nkv, L, dk, device=dev)
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    out = torch.zeros(nh * dk, device=dev)
    pos = torch.tensor([3], device=dev)
    args = (qkv, kd, vd, pos, cos, sin, perm, out)
    with pytest.raises(ValueError, match="workspace"):
        kc.attention_decode(*args, n_head=nh, scale=0.25, splits=2)
    small = torch.zeros(kc.attention_workspace(nh, dk, 2, dev).numel() - 16, dtype=torch.uint8,
                        device=dev)
    with pytest.raises(ValueError, match="workspace has"):
        kc.attention_decode(*args, n_head=nh, scale=0.25, splits=2, workspace=small)
    with pytest.raises(ValueError, match="splits"):
        kc.attention_decode(*args, n_head=nh, scale=0.25, splits=65,
                            workspace=kc.attention_workspace(nh, dk, 64, dev))
    assert 1 <= kc.attention_splits(nh, dev) <= kc.MAX_ATTN_SPLITS
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    assert nh * kc.attention_splits(nh, dev) <= max(sms, nh)
    # Groups of more than MAX_GROUP_HEADS query heads: refused before any launch.
    many = 2 * (kc.MAX_GROUP_HEADS + 1)
    q9 = torch.randn(many * dk + 4 * dk, generator=gen).to(dev)
    o9 = torch.zeros(many * dk, device=dev)
    with pytest.raises(ValueError, match="group_heads takes at most"):
        kc.attention_decode(q9, kd, vd, pos, cos, sin, perm, o9, n_head=many, scale=0.25,
                            splits=2, workspace=kc.attention_workspace(many, dk, 2, dev),
                            group_heads=True)
    # The split-key rule as the kernel applies it: 256, at least `splits`, or the setting.
    # Grouped: 256 query-key pairs per block, so ceil(256 / heads per group) keys.
    assert kc.attention_split_keys(4, dev) == 256 and kc.attention_split_keys(64, dev) == 256
    assert kc.attention_split_keys(4, dev, n_head=32, n_head_kv=8, group_heads=True) == 64
    assert kc.attention_split_keys(4, dev, n_head=9, n_head_kv=3, group_heads=True) == 86
    assert kc.attention_split_keys(64, dev, n_head=32, n_head_kv=4, group_heads=True) == 64
    monkeypatch.setenv("SPARSIFY_ATTN_SPLIT_KEYS", "100")
    assert kc.attention_split_keys(4, dev) == 100
    assert kc.attention_split_keys(4, dev, n_head=32, n_head_kv=8, group_heads=True) == 25
    monkeypatch.setenv("SPARSIFY_ATTN_SPLIT_KEYS", "1")
    assert kc.attention_split_keys(4, dev) == 4
    monkeypatch.delenv("SPARSIFY_ATTN_SPLIT_KEYS")
    assert not kc.attention_supported(dk, dk, L, dev, n_head=many, n_head_kv=2,
                                      group_heads=True)
    assert kc.attention_supported(dk, dk, L, dev, n_head=nh, n_head_kv=nkv, splits=2,
                                  group_heads=True)
    # Cache types: float32 or float16, the same for both; the float16 launch's extra shared
    # memory is counted.
    with pytest.raises(ValueError, match="vc is torch.float16 but kc is torch.float32"):
        kc.attention_decode(qkv, kd, vd.half(), pos, cos, sin, perm, out, n_head=nh, scale=0.25)
    with pytest.raises(ValueError, match="float32 or float16"):
        kc.attention_decode(qkv, kd.bfloat16(), vd.bfloat16(), pos, cos, sin, perm, out,
                            n_head=nh, scale=0.25)
    assert not kc.attention_supported(dk, dk, L, dev, cache_dtype=torch.bfloat16)
    lib = kc.load(dev)
    f32 = lib.sparsify_attention_launch_smem_bytes(128, 128, 4096, 32, 8, 4, 0)
    f16 = lib.sparsify_attention_launch_smem_bytes(128, 128, 4096, 32, 8, 4, kc.ATTN_CACHE_F16)
    assert f16 - f32 == 512  # (128 + 128) halves
    assert lib.sparsify_attention_launch_smem_bytes(128, 128, 4096, 32, 8, 4, 8) == 0


@on_gpu
@pytest.mark.parametrize("case", [c for c in ATTN_CASES if c[2] == c[3] and c[2] in (64, 128, 256)],
                         ids=lambda c: "h{}-{}_d{}-{}_L{}_p{}_w{}".format(*c))
@pytest.mark.parametrize("cache", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attention_decode_specialised_kernel_matches_run_time_one(gen, case, cache, monkeypatch):
    """Head dimensions 64 / 128 / 256 run a kernel compiled for them; SPARSIFY_ATTN_GENERIC=1
    makes the launch take the one that reads them at run time. Same arithmetic in the same
    order: the output and the cache agree bit for bit, from 22 partial rows as in decode."""
    nh, nkv, dk, dv, L, pos, window, qk_norm, neox = case
    dev = torch.device("cuda")
    rows, width = 22, nh * dk + nkv * (dk + dv)
    buf = (torch.randn(rows, width + 5, generator=gen) / math.sqrt(rows)).to(dev)
    kc0, vc0 = (torch.randn(nkv, L, d, generator=gen).to(dev, cache) for d in (dk, dv))
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, neox))
    qn, kn = ((torch.rand(dk, generator=gen) + 0.5).to(dev) if qk_norm else None
              for _ in range(2))

    def run():
        kd, vd = kc0.clone(), vc0.clone()
        out = torch.full((nh * dv,), float("nan"), device=dev)
        kc.attention_decode(buf[:, 2:2 + width], kd, vd, torch.tensor([pos], device=dev), cos,
                            sin, perm, out, n_head=nh, scale=1.0 / math.sqrt(dk), eps=1e-6,
                            window=window, q_norm=qn, k_norm=kn)
        torch.cuda.synchronize()
        return out, kd, vd

    fixed = run()
    monkeypatch.setenv("SPARSIFY_ATTN_GENERIC", "1")
    generic = run()
    assert not torch.isnan(fixed[0]).any()
    for a, b in zip(fixed, generic):
        assert torch.equal(a, b)


@on_gpu
@pytest.mark.parametrize("fmt,n,weight_aware", [
    ("fp16", 4096, False), ("bf16", 1000, True), ("int8", 4096, True), ("fp16", 1001, False),
    ("int8", 200, False)], ids=lambda v: str(v))
def test_attention_decode_prefetch_changes_nothing(gen, fmt, n, weight_aware):
    """Told about the next projection (attn_output), the kernel prefetches the rows it will keep
    into L2 (one bulk prefetch per row where rows are 16-byte multiples, per line otherwise),
    and the cache rows before pos ahead of its wait: hints, so the output and the cache are bit
    for bit those of the launch without them. The threshold keeps about half the rows, so both
    branches run in every block."""
    nh, nkv, dk, dv, L, pos = 8, 2, 64, 64, 50, 31
    dev = torch.device("cuda")
    qkv = torch.randn(nh * dk + nkv * (dk + dv), generator=gen).to(dev)
    kc0, vc0 = (torch.randn(nkv, L, d, generator=gen).to(dev) for d in (dk, dv))
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    rows = nh * dv
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[fmt]
    if fmt == "int8":
        w = torch.randint(-127, 128, (rows, n), generator=gen, dtype=torch.int8).to(dev)
        scales = torch.rand(rows, -(-n // kc.INT8_GROUP), generator=gen).to(dev)
    else:
        w = torch.randn(rows, n, generator=gen).to(dtype).to(dev)
        scales = None
    factor = (torch.rand(rows, generator=gen) + 0.5).to(dev) if weight_aware else None

    def run(**nxt):
        kd, vd = kc0.clone(), vc0.clone()
        out = torch.full((rows,), float("nan"), device=dev)
        kc.attention_decode(qkv, kd, vd, torch.tensor([pos], device=dev), cos, sin, perm, out,
                            n_head=nh, scale=0.125, **nxt)
        torch.cuda.synchronize()
        return out, kd, vd

    plain = run()
    score = plain[0].abs() * (factor if factor is not None else 1.0)
    thr = score.median().view(1)
    results = [plain, run(next_w=w, next_threshold=thr, next_scales=scales, next_factor=factor,
                          prefetch_cache=True)]
    out = plain[0]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="next_threshold"):
        kc.attention_decode(qkv, kc0, vc0, torch.tensor([pos], device=dev), cos, sin, perm, out,
                            n_head=nh, scale=0.125, next_w=w)
    with pytest.raises(ValueError, match="next_w"):
        kc.attention_decode(qkv, kc0, vc0, torch.tensor([pos], device=dev), cos, sin, perm, out,
                            n_head=nh, scale=0.125, next_w=w[1:], next_threshold=thr)


@on_gpu
def test_attention_decode_refuses_shared_memory_past_the_limit(gen):
    """A cache length whose dynamic shared memory fits the per-block limit only without the
    kernel's static bytes is refused as not supported (not an invalid-argument launch), and the
    next launch is not blamed for it."""
    dev = torch.device("cuda")
    nh, nkv, dk = 2, 1, 16
    limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    L = (limit - 64) // 4 - (5 * dk + 4096)  # dynamic bytes = limit - 64
    lib = kc.load(dev)
    assert lib.sparsify_attention_smem_bytes(dk, dk, L) == limit - 64
    assert not kc.attention_supported(dk, dk, L, dev)
    qkv = torch.randn(nh * dk + nkv * 2 * dk, generator=gen).to(dev)
    kd, vd = torch.zeros(nkv, L, dk, device=dev), torch.zeros(nkv, L, dk, device=dev)
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    out = torch.zeros(nh * dk, device=dev)
    pos = torch.tensor([3], device=dev)
    rc = lib.sparsify_attention_decode_ex(
        qkv.data_ptr(), 1, 0, kd.data_ptr(), vd.data_ptr(), pos.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), perm.data_ptr(), None, None, out.data_ptr(), nh, nkv, dk, dk, L, 0,
        0.25, 0.0, None, 0, torch.cuda.current_stream(dev).cuda_stream)
    assert rc == 801  # cudaErrorNotSupported
    L = 16
    kd, vd = torch.zeros(nkv, L, dk, device=dev), torch.zeros(nkv, L, dk, device=dev)
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    kc.attention_decode(qkv, kd, vd, pos, cos, sin, perm, out, n_head=nh, scale=0.25)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()


@on_gpu
def test_attention_decode_position_out_of_range(gen):
    dev = torch.device("cuda")
    nh, nkv, dk, L = 4, 2, 16, 10
    qkv = torch.randn(nh * dk + nkv * 2 * dk, generator=gen, device="cpu").to(dev)
    kd, vd = torch.zeros(nkv, L, dk, device=dev), torch.zeros(nkv, L, dk, device=dev)
    cos, sin, perm = (t.to(dev) for t in rope_tables(gen, L, dk, False))
    out = torch.zeros(nh * dk, device=dev)
    kc.attention_decode(qkv, kd, vd, torch.tensor([L], device=dev), cos, sin, perm, out,
                        n_head=nh, scale=0.25)
    torch.cuda.synchronize()
    assert bool(torch.isnan(out).all())  # no silent garbage, and nothing written out of bounds
    assert not kd.any() and not vd.any()
    with pytest.raises(ValueError, match="multiple"):
        kc.attention_decode(qkv, kd, vd, torch.tensor([0], device=dev), cos, sin, perm, out,
                            n_head=3, scale=0.25)
