"""The GPU decode engine against the torch model definition.

Every test needs a CUDA device (module-level skip). ``SPARSIFY_ENGINE_TEST_DEVICE=cpu`` runs the
same tests on the engine's CPU stand-in for the kernel (a masked matmul, no graph), which checks
the glue on machines without a GPU.

Models: the bundled ones when their files are already in the cache (nothing is downloaded here),
and two synthetic llama files written into a temporary directory: ``tiny`` (odd widths: FFN 200,
3 KV heads, F32) and a small F16 one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparsify.engine_cuda import rounded_model
from sparsify.model import KVCache
from sparsify.sparse import MaskingProjector

DEVICE = os.environ.get("SPARSIFY_ENGINE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device"),
]

BUNDLED = ("smollm2-135m", "gemma3-270m")
SYNTHETIC = ("synthetic-tiny", "synthetic-small")
PROMPT = "The history of the bicycle"
N_TOKENS = 40
U16 = 2.0**-11  # unit roundoff of fp16 (bf16: 2**-8)


def _bundled_path(name: str):
    from sparsify.bundled import BUNDLED as TABLE
    from sparsify.bundled import cache_dir

    p = cache_dir() / "models" / TABLE[name].file
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> Loaded, built on first use; a bundled model not in the cache skips its test."""
    from sparsify.loader import load
    from sparsify.synthetic import preset, write_synthetic_gguf

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name in BUNDLED:
                path = _bundled_path(name)
                if path is None:
                    pytest.skip(f"{name} is not in the model cache (tests here never download)")
            else:
                spec = preset("tiny") if name == "synthetic-tiny" else preset(
                    "tiny", n_layer=3, d_model=256, d_ff=704, n_head=4, n_head_kv=2,
                    vocab_size=1024, dtype="f16", seed=7)
                path = write_synthetic_gguf(tmp_path_factory.mktemp("gguf") / f"{name}.gguf",
                                            spec, threads=2)
            cache[name] = load(path)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def engines(models):
    from sparsify.engine_cuda import CUDAEngine

    cache: dict = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            cache[name, fmt] = CUDAEngine(models(name), fmt=fmt, max_len=96, device=DEVICE)
        return cache[name, fmt]

    return get


def _quantile_thresholds(model, ids: list[int], level: float, weight_aware: bool):
    """Per-tensor score quantiles over one forward of ``ids`` (a stand-in for a profiled table)."""
    seen: dict[str, list[torch.Tensor]] = {}
    scorer = MaskingProjector({}, weight_aware=weight_aware)

    def record(name, x, w):
        seen.setdefault(name, []).append(scorer.score(name, x, w).reshape(-1))
        return x @ w.T

    old = model.projector
    model.projector = record
    try:
        with torch.inference_mode():
            model.forward(torch.tensor([ids]))
    finally:
        model.projector = old
    return {k: float(torch.quantile(torch.cat(v), level)) for k, v in seen.items()}


def _stepwise_greedy(model, ids: list[int], n: int, cache_dtype: torch.dtype = torch.float32
                     ) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and logits of the torch model fed one token at a time (as the engine is),
    over a KV cache of ``cache_dtype``."""
    cache = KVCache.empty(model.cfg, len(ids) + n, dtype=cache_dtype)
    seq, out, logits = list(ids), [], []
    with torch.inference_mode():
        for pos in range(len(ids) + n - 1):
            lg = model.forward(torch.tensor([[seq[pos]]]), pos, cache)[0, -1]
            if pos >= len(ids) - 1:
                logits.append(lg.numpy())
                out.append(int(lg.argmax()))
                seq.append(out[-1])
    return out, np.stack(logits)


def _prompt(loaded) -> list[int]:
    return loaded.tokenizer.encode(PROMPT)


@pytest.mark.parametrize("name,fmt", [("smollm2-135m", "fp16"), ("gemma3-270m", "bf16"),
                                      ("synthetic-tiny", "fp16"), ("synthetic-small", "int8")])
def test_dense_logits_close_to_float32_model(name, fmt, models, engines):
    """Dense engine logits against the float32 torch model.

    Bound (flash-attention's rule): the engine's error may be at most twice the error of the
    naive computation in the same precision, i.e. the float32 torch model run over the
    format-rounded weights, plus 1e-4 of the logit scale for float32 summation order.
    """
    loaded = models(name)
    ids = _prompt(loaded)
    eng = engines(name, fmt)
    # On CUDA these models run the fused step (decode kernels), so it is what is held here.
    assert eng.fused == (DEVICE == "cuda")
    eng.set_thresholds(None)
    with torch.inference_mode():
        ref = loaded.model().forward(torch.tensor([ids]))[0].numpy()
        naive = rounded_model(eng, loaded).forward(torch.tensor([ids]))[0].numpy()
        eng.reset()
        got = np.stack([eng.step(t).cpu().numpy().copy() for t in ids])
    scale = np.abs(ref).max()
    naive_err = np.abs(naive - ref).max()
    err = np.abs(got - ref).max()
    assert naive_err > 0  # the rounding is real, so the bound below is not vacuous
    assert err <= 2 * naive_err + 1e-4 * scale, (err, naive_err, scale)
    if fmt == "fp16":
        # Also against the format's unit roundoff: a few u16 of the logit scale per layer.
        assert err <= 4 * U16 * scale * loaded.cfg.n_layer, (err, scale)


@pytest.mark.parametrize("name,fmt,criterion", [
    ("smollm2-135m", "fp16", "magnitude"), ("gemma3-270m", "fp16", "magnitude"),
    ("synthetic-small", "fp16", "weight-aware"), ("synthetic-tiny", "int8", "magnitude")])
def test_sparse_greedy_follows_masked_torch(name, fmt, criterion, models, engines):
    """Sparse decode at level 0.5 against the masked torch model over N_TOKENS greedy tokens.

    The torch model runs over the engine's rounded weights (see engine_cuda.rounded_model) and
    a KV cache of the engine's type (float16 under SPARSIFY_CUDA_KV_CACHE=f16), so what is left
    is float32 summation order and entries within rounding of a threshold, which
    one side keeps and the other drops; such a flip then propagates through the KV cache. So the
    engine is fed torch's greedy sequence (teacher forcing) and must pick torch's token at every
    step except at most a fifth of them, each where torch's own top-2 logits are within 1.0 (the
    CPU engine's measured tolerance for the same effect). Free-running greedy may leave torch's
    sequence only at such a near-tie (a tied head stays float32 in the model, so its logits also
    differ by fp16 rounding).
    """
    loaded = models(name)
    ids = _prompt(loaded)
    eng = engines(name, fmt)
    model = rounded_model(eng, loaded)
    wa = criterion == "weight-aware"
    thresholds = _quantile_thresholds(model, ids, 0.5, wa)
    model.projector = MaskingProjector(thresholds, weight_aware=wa)
    want, ref = _stepwise_greedy(model, ids, N_TOKENS, eng.cache_dtype)
    eng.set_thresholds(thresholds, weight_aware=wa)
    with torch.inference_mode():
        free = eng.generate(ids, N_TOKENS)
        eng.reset()
        picks = [int(eng.step(t).argmax()) for t in ids + want[:-1]][len(ids) - 1:]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]
    first = next((i for i, (a, b) in enumerate(zip(free, want, strict=True)) if a != b), None)
    assert first is None or gaps[first] < 1.0, (first, gaps[first])
    differ = [i for i, (a, b) in enumerate(zip(picks, want, strict=True)) if a != b]
    # A fifth of the steps: gemma3-270m at 0.5 sits within 0.6 of a tie on 6 of 40 steps here.
    assert len(differ) <= N_TOKENS // 5 and all(gaps[i] < 1.0 for i in differ), (
        differ, gaps[differ])
    bpt, realized = eng.count_bytes(ids, 8)
    assert bpt < 0.8 * eng.block_bytes + eng.head.nbytes  # about half the rows skipped
    assert 0.3 < float(np.mean(list(realized.values()))) < 0.7
    eng.set_thresholds(None)


@pytest.mark.skipif(DEVICE != "cuda", reason="the graph exists on CUDA only")
def test_graph_follows_threshold_writes_without_recapture(models, engines):
    """Replays of one captured graph equal eager steps, dense and after a threshold write."""
    loaded = models("synthetic-small")
    ids = _prompt(loaded)
    eng = engines("synthetic-small", "fp16")
    eng.set_thresholds(None)
    results = {}
    model = rounded_model(eng, loaded)
    thresholds = _quantile_thresholds(model, ids, 0.5, False)
    for mode in ("graph", "eager"):
        eng.use_graph = mode == "graph"
        out = []
        for th in (None, thresholds):
            eng.set_thresholds(th)
            eng.prefill(ids)
            eng.decode_greedy(12)
            out.append((eng.logits.cpu().clone(), eng.generated(len(ids) - 1, 13)))
        results[mode] = out
        if mode == "graph":
            graph = eng._graphs[0]
    eng.use_graph = True
    assert eng._graphs[0] is graph  # the threshold write did not force a new capture
    for (lg, toks), (le, tokse) in zip(results["graph"], results["eager"], strict=True):
        assert toks == tokse
        # The same kernels in the same order: replays are bit-identical to eager steps.
        assert torch.equal(lg, le)
    assert results["graph"][0][1] != results["graph"][1][1] or not torch.equal(
        results["graph"][0][0], results["graph"][1][0])


def test_dense_bytes_and_bad_input(models, engines):
    from sparsify.engine_cuda import CUDAEngine

    loaded = models("synthetic-tiny")
    eng = engines("synthetic-tiny", "fp16")
    eng.set_thresholds(None)
    bpt, realized = eng.count_bytes(_prompt(loaded), 4)
    assert bpt == eng.weight_bytes
    assert max(realized.values()) == 0.0
    with pytest.raises(ValueError, match="weight format"):
        CUDAEngine(loaded, fmt="fp8", device=DEVICE)
    with pytest.raises(ValueError, match="lacks"):
        eng.set_thresholds({"blk.99.attn_q": 0.1})
    eng.reset()
    with pytest.raises(ValueError, match="positions"):
        for t in range(eng.max_len + 1):
            eng.step(t % 300)
    eng.reset()


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused step exists on CUDA only")
def test_fused_step_follows_torch_glue(models):
    """The fused step (norms folded or not, split-K reductions deferred or not) and the torch
    glue (the same GEMV kernel for every projection) agree densely: same greedy tokens, logits
    within float32 summation-order noise. (Sparse levels are held to the masked torch model
    above; here a channel within rounding of its threshold could legitimately flip between the
    two glues.)"""
    from sparsify.engine_cuda import CUDAEngine

    loaded = models("synthetic-small")
    ids = _prompt(loaded)
    # Folded: the norms inside the GEMVs (llama blocks); unfolded: the norm kernels between them.
    folded = CUDAEngine(loaded, fmt="fp16", max_len=96, device=DEVICE, fused=True)
    unfolded = CUDAEngine(loaded, fmt="fp16", max_len=96, device=DEVICE, fused=True,
                          fold_norms=False)
    # Reduced: the split-K sums of q/k/v and gate/up added inside their GEMVs, not by the
    # attention kernel and ffn_down.
    reduced = CUDAEngine(loaded, fmt="fp16", max_len=96, device=DEVICE, fused=True, defer=False)
    glue = CUDAEngine(loaded, fmt="fp16", max_len=96, device=DEVICE, fused=False)
    assert folded.fused and folded.fold_norms
    assert folded.defer_qkv and folded.defer_ffn and unfolded.defer_qkv and unfolded.defer_ffn
    assert folded.qkv_parts.shape[0] > 1 and folded.gu_parts.shape[0] > 1
    assert unfolded.fused and not unfolded.fold_norms
    assert reduced.fused and reduced.fold_norms and not (reduced.defer_qkv or reduced.defer_ffn)
    assert not glue.fused and not glue.fold_norms and not (glue.defer_qkv or glue.defer_ffn)
    runs = []
    for eng in (folded, unfolded, reduced, glue):
        eng.set_thresholds(None)
        toks = eng.generate(ids, 24)
        runs.append((toks, eng.logits.cpu().clone()))
    (tg, lg) = runs[-1]
    for tf, lf in runs[:-1]:
        assert tf == tg
        # float32 glue in another order: ~1e-6 of the logit scale; a wrong kernel is >= 1e-2.
        assert float((lf - lg).abs().max()) <= 1e-4 * float(lg.abs().max())


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused step exists on CUDA only")
@pytest.mark.parametrize("fmt", ["fp16", "int8"])
@pytest.mark.parametrize("weight_aware", [False, True], ids=["magnitude", "weight-aware"])
def test_attention_prefetches_change_nothing(models, fmt, weight_aware):
    """The attention kernel's L2 prefetches (attn_output's kept rows, the cache rows it reads)
    are hints: with and without them the step gives the same tokens and bit-identical logits,
    dense and sparse."""
    from sparsify.engine_cuda import CUDAEngine

    loaded = models("synthetic-small")
    ids = _prompt(loaded)
    on = CUDAEngine(loaded, fmt=fmt, max_len=96, device=DEVICE, prefetch=True,
                    prefetch_cache=True)
    off = CUDAEngine(loaded, fmt=fmt, max_len=96, device=DEVICE, prefetch=False,
                     prefetch_cache=False)
    assert on.prefetch and on.prefetch_cache and not (off.prefetch or off.prefetch_cache)
    names = loaded.cfg.projection_names
    scale = 0.5 if weight_aware else 0.02
    levels = [None, {n: scale * (1 + j % 3) for j, n in enumerate(names)}]
    for thr in levels:
        runs = []
        for eng in (on, off):
            eng.set_thresholds(thr, weight_aware and thr is not None)
            toks = eng.generate(ids, 16)
            runs.append((toks, eng.logits.cpu().clone()))
        assert runs[0][0] == runs[1][0]
        assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused step exists on CUDA only")
@pytest.mark.parametrize("group", [False, True], ids=["per-head", "grouped"])
def test_split_attention_follows_unsplit_at_long_context(models, group):
    """From 512 cached keys on the attention kernel spreads each head's keys over several
    blocks (split-KV, its own graph from that position on), and with ``attn_group`` from
    ``attn_group_from`` keys on one block per key/value head serves the group's query heads (a
    third graph); after a 700-token prompt it gives the same greedy tokens as one block per head
    and logits within float32 rounding of the combine, dense and sparse."""
    from sparsify_kernels import cuda as kc

    from sparsify.engine_cuda import ATTN_GROUP_KEYS, ATTN_GROUP_KEYS_F16, CUDAEngine

    loaded = models("synthetic-small")
    cfg = loaded.cfg
    rep = cfg.n_head // cfg.n_head_kv
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (700,), generator=g).tolist()
    # grouped: positions 512..599 split per query head, 600 on per key/value head
    split = CUDAEngine(loaded, fmt="fp16", max_len=740, device=DEVICE, attn_splits=4,
                       attn_group=group, attn_group_from=600)
    one = CUDAEngine(loaded, fmt="fp16", max_len=740, device=DEVICE, attn_splits=1)
    assert split.attn_splits == 4 and one.attn_splits == 1 and one.attn_ws is None
    assert split.attn_group == group and not one.attn_group
    assert split.attn_switch == 512 == 2 * kc.attention_split_keys(4)
    # grouped ranges: 256 query-key pairs a block
    assert kc.attention_split_keys(4, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv,
                                   group_heads=True) == -(-256 // rep)
    default = CUDAEngine(loaded, fmt="fp16", max_len=16, device=DEVICE)
    assert default.attn_splits == kc.attention_splits(cfg.n_head, default.device)
    assert default.attn_group and default.attn_group_from == (
        ATTN_GROUP_KEYS_F16 if default.kv_cache == "f16" else ATTN_GROUP_KEYS)
    assert default.attn_group_splits == kc.attention_splits(cfg.n_head_kv, default.device)
    names = loaded.cfg.projection_names
    for thr in (None, {n: 0.02 * (1 + j % 3) for j, n in enumerate(names)}):
        runs = []
        for eng in (split, one):
            eng.set_thresholds(thr)
            toks = eng.generate(ids, 16)
            runs.append((toks, eng.logits.cpu().clone()))
        (ts, ls), (to, lo) = runs
        assert split._graphs[1] is not None and one._graphs[1] is None
        assert (split._graphs[2] is not None) == group and one._graphs[2] is None
        assert ts == to
        assert float((ls - lo).abs().max()) <= 1e-4 * float(lo.abs().max())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "glue"])
def test_f16_kv_cache_follows_f32(models, fused):
    """``kv_cache="f16"`` stores keys and values in float16: teacher-forced over a 700-token
    prompt (every attention mode on CUDA: one block per head, split per query head from 512
    keys, grouped from 600), its logits stay within 0.2% of the logit scale of the float32
    cache's at every position looked at (2e-4 measured on the CPU glue), and differ from them
    (the cache is float16 indeed). The fused kernel and the torch glue read the same float16
    rows: they agree within float32 rounding, up to keys that the two round to either side of a
    float16 tie (1e-3)."""
    from sparsify.engine_cuda import CUDAEngine

    if fused and DEVICE != "cuda":
        pytest.skip("the fused step exists on CUDA only")
    loaded = models("synthetic-small")
    cfg = loaded.cfg
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (700,), generator=g).tolist()
    look = set(range(0, 700, 37)) | set(range(690, 700))
    kw = {"fmt": "fp16", "max_len": 720, "device": DEVICE, "fused": fused}
    if fused:
        kw.update(attn_splits=4, attn_group_from=600)
    half = CUDAEngine(loaded, kv_cache="f16", **kw)
    full = CUDAEngine(loaded, kv_cache="f32", **kw)
    assert half.kv_cache == "f16" and half.kc[0].dtype == torch.float16
    assert full.kv_cache == "f32" and full.kc[0].dtype == torch.float32
    assert half.fused == fused
    engines = [half, full]
    if fused:
        glue = CUDAEngine(loaded, kv_cache="f16", fmt="fp16", max_len=720, device=DEVICE,
                          fused=False)
        engines.append(glue)
    logits = [[] for _ in engines]
    for eng in engines:
        eng.set_thresholds(None)
        eng.reset()
    for pos, t in enumerate(ids):
        for eng, out in zip(engines, logits):
            lg = eng.step(t)
            if pos in look:
                out.append(lg.cpu().clone())
    if fused:
        assert half._graphs[1] is not None and half._graphs[2] is not None
    h, f = torch.stack(logits[0]), torch.stack(logits[1])
    scale = float(f.abs().max())
    diff = float((h - f).abs().max())
    assert 0 < diff <= 2e-3 * scale, (diff, scale)
    if fused:
        gl = torch.stack(logits[2])
        assert float((h - gl).abs().max()) <= 1e-3 * scale
    with pytest.raises(ValueError, match="KV cache type"):
        CUDAEngine(loaded, kv_cache="bf16", fmt="fp16", max_len=16, device=DEVICE)
    if fused:  # over float16 the split per query head keeps up longer (kernels/cuda/NOTES.md)
        from sparsify.engine_cuda import ATTN_GROUP_KEYS, ATTN_GROUP_KEYS_F16

        for kv, keys in (("f16", ATTN_GROUP_KEYS_F16), ("f32", ATTN_GROUP_KEYS)):
            eng = CUDAEngine(loaded, kv_cache=kv, fmt="fp16", max_len=16, device=DEVICE)
            assert eng.attn_group_from == keys
