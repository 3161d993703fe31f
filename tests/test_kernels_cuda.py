"""CUDA sparse GEMV (kernels/cuda) against a float64 reference.

GPU tests carry the `gpu` marker and skip without a CUDA device or nvcc; the build test needs only
nvcc, so CI without a GPU still proves that the kernel source and the C header compile.
"""

from __future__ import annotations

import math
import subprocess
import zlib

import pytest
import torch
from sparsify_kernels import cuda as kc

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
    cmd = kc.compile_command(NVCC, (9, 0), tmp_path / "sparse_gemv.o", shared=False)
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    src = tmp_path / "use_header.c"
    src.write_text(
        '#include "sparse_gemv.h"\n'
        "int main(void) {\n"
        "  size_t b = sparsify_gemv_workspace_bytes(4096, 4096);\n"
        "  cudaError_t (*f)(const void *, const float *, const float *, const float *, float *,\n"
        "                   int, int, void *, size_t, cudaStream_t) = sparsify_gemv_f16;\n"
        "  return (b == 0) + (f == 0) + (SPARSIFY_GEMV_INT8_GROUP != 128);\n"
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
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 6, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launch_variants_agree(gen, dtype, variant):
    if variant == 3 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cluster reduction needs compute capability 9.0")
    k, n = 4096, 1024
    w, scales = make_weights(gen, k, n, dtype)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.7)
    ref, bound = reference(w, x, t, scales=scales), abs_bound(w, x, t, scales=scales)
    for bps in (0, 1):
        check(run(w, x, t, scales=scales, variant=variant, blocks_per_sm=bps), ref, bound)


@on_gpu
def test_deterministic(gen):
    k, n = 14336, 1024
    w, _ = make_weights(gen, k, n, torch.float16)
    x = torch.randn(k, generator=gen)
    t = threshold_for(x.abs(), 0.4)
    first = run(w, x, t)
    for _ in range(3):
        assert torch.equal(run(w, x, t), first)


@on_gpu
@pytest.mark.parametrize("variant", [0, 3])
def test_back_to_back_launches_respect_dependencies(gen, variant):
    # Each step reads the previous step's output and overwrites the buffer the previous step
    # read (read-after-write and write-after-read across kernels). Launched back to back with no
    # host synchronisation, the chain must equal, bit for bit, the same chain synchronised after
    # every step: the kernel is deterministic, so any stale read shows as a difference.
    if variant == 3 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cluster reduction needs compute capability 9.0")
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
