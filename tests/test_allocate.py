"""Sparsity allocation: TEAL's block-wise greedy, the cross-layer allocation, their pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.allocate import (
    Path,
    Saliency,
    allocate,
    cross_layer_allocation,
    dense_block_states,
    greedy_path,
    level_grid,
    saliency,
)
from sparsify.config import PROJECTIONS
from sparsify.evaluate import projection_params, weighted_sparsity
from sparsify.model import dense_projector
from sparsify.sparse import MaskingProjector

GRID = np.round(np.arange(20) * 0.05, 2)  # table levels 0.00 … 0.95

# The tiny synthetic model runs on one torch thread (conftest.one_thread_for_tiny).
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic llama model (3 blocks, odd sizes) with float32 weights."""
    from sparsify.loader import load
    from sparsify.synthetic import preset, write_synthetic_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_synthetic_gguf(path, preset("tiny", n_layer=3, seed=5))
    return load(path)


def quantile_table(model, ids: torch.Tensor):
    """Thresholds per tensor at every GRID level: quantiles of |x| recorded on ``ids``; returns
    ``threshold(name, level)`` interpolating linearly between grid levels, as tables do."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, x, w):
        seen.setdefault(name, []).append(x.abs().reshape(-1))
        return dense_projector(name, x, w)

    model.projector = record
    try:
        with torch.inference_mode():
            model.forward(ids)
    finally:
        model.projector = dense_projector
    grid = {k: torch.quantile(torch.cat(v), torch.tensor(GRID, dtype=torch.float32)).numpy()
            for k, v in seen.items()}
    for g in grid.values():
        g[0] = 0.0

    def threshold(name: str, level: float) -> float:
        return float(np.interp(level, GRID, grid[name]))

    return threshold


def _path(block: int, points: list[tuple[float, dict[str, float]]]) -> Path:
    p = Path(block)
    for s, lv in points:
        p.sparsity.append(s)
        p.levels.append(lv)
        p.mse.append(0.0)
    return p


def test_path_interpolates_to_exact_sparsity():
    zero = dict.fromkeys(PROJECTIONS, 0.0)
    a = {**zero, "ffn_up": 0.4}
    b = {**a, "attn_q": 0.8}
    p = _path(0, [(0.0, zero), (0.1, a), (0.3, b)])
    assert p.at(0.2) == pytest.approx({**a, "attn_q": 0.4})
    assert p.at(0.3) == b
    with pytest.raises(ValueError, match="reaches"):
        p.at(0.31)


def test_greedy_path_takes_the_least_error_step(tiny, rng):
    model = tiny.model()
    ids = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (2, 19)))
    threshold = quantile_table(model, ids)
    pos = torch.arange(ids.shape[1])
    _, h_in, h_out = next(s for s in dense_block_states(model, ids) if s[0] == 1)
    exact = greedy_path(model, 1, h_in, h_out, pos, threshold, False, 0.95, alpha=0.1,
                        lazy=False)
    assert model.projector is dense_projector
    assert exact.mse[0] == 0.0 and exact.sparsity[0] == 0.0
    assert np.all(np.diff(exact.sparsity) > 0)
    assert exact.sparsity[-1] == pytest.approx(0.95)
    assert all(v <= 0.95 + 1e-12 for lv in exact.levels for v in lv.values())

    # The first step, recomputed by hand with the plain masking projector: each tensor alone at
    # the level a 10 % block step gives it; the step taken has the least error per weight.
    params = {k.split(".", 2)[2]: v for k, v in projection_params(tiny.cfg).items()
              if k.startswith("blk.1.")}
    n_block = sum(params.values())
    costs = {}
    for p in PROJECTIONS:
        new = min(0.95, 0.1 * n_block / params[p])
        model.projector = MaskingProjector({f"blk.1.{p}": threshold(f"blk.1.{p}", new)})
        with torch.inference_mode():
            err = float((model.block(1, h_in, pos) - h_out).double().pow(2).mean())
        costs[p] = err / (new * params[p])
    model.projector = dense_projector
    first = min(costs, key=costs.get)
    moved = [p for p in PROJECTIONS if exact.levels[1][p] > 0]
    assert moved == [first]
    # The lazy search takes the same first step (all candidates are fresh at step one).
    lazy = greedy_path(model, 1, h_in, h_out, pos, threshold, False, 0.95, alpha=0.1)
    assert lazy.levels[1] == exact.levels[1]


def test_level_grid():
    assert level_grid(0.99) == [*(round(0.025 * k, 6) for k in range(40)), 0.99]
    assert level_grid(0.95, 0.05)[-2:] == [0.9, 0.95]


def test_allocations_hit_their_targets(tiny, rng):
    model = tiny.model()
    ids = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (3, 17)))
    threshold = quantile_table(model, ids)
    params = projection_params(tiny.cfg)
    targets = (0.1, 0.45, 0.9)
    allocs = allocate(model, ids, threshold, False, 0.95, ["greedy", "cross-layer"], targets,
                      greedy_tokens=34)
    assert list(allocs) == ["greedy", "cross-layer"]
    greedy, cross = allocs["greedy"], allocs["cross-layer"]
    for t in targets:
        key = f"{t:.2f}"
        for alloc in (greedy.levels[key], cross.levels[key]):
            assert set(alloc) == set(params)
            assert all(0.0 <= v <= 0.95 for v in alloc.values())
            assert weighted_sparsity(alloc, params) == pytest.approx(t, abs=1e-6)
        for i in range(tiny.cfg.n_layer):  # greedy: every block at the target
            blk = {k: v for k, v in params.items() if k.startswith(f"blk.{i}.")}
            assert weighted_sparsity(greedy.levels[key], blk) == pytest.approx(t, abs=1e-6)
        # Both are scored by the same estimate; the cross-layer greedy minimises it.
        assert cross.kl_estimate[key] < greedy.kl_estimate[key]
    # Deterministic: the same inputs give the same allocations.
    again = allocate(model, ids, threshold, False, 0.95, ["cross-layer", "greedy"], targets,
                     greedy_tokens=34)
    assert again["cross-layer"].levels == cross.levels
    assert again["greedy"].levels == greedy.levels
    with pytest.raises(ValueError, match="unknown allocation method"):
        allocate(model, ids, threshold, False, 0.95, ["random"], targets)


def test_cross_layer_spares_the_sensitive_tensor():
    """Two tensors of equal size whose masks add independent errors, one three times as
    large per level: the greedy on ½·mean(s²) gives the sensitive one less sparsity."""
    grid = [0.0, 0.25, 0.5, 0.75]
    rows = 4000
    signs = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)  # a and b uncorrelated over rows
    other = np.where(np.arange(rows) % 4 < 2, 1.0, -1.0)
    a = np.array([3 * lv * signs for lv in grid])  # (L, R): cumulative effect of tensor a
    b = np.array([lv * other for lv in grid])
    sal = Saliency(["blk.0.a", "blk.0.b"], grid, torch.tensor(np.stack([a, b]),
                                                           dtype=torch.float32))
    alloc = cross_layer_allocation(sal, {"blk.0.a": 10, "blk.0.b": 10}, targets=(0.25, 0.5))
    assert alloc.levels["0.25"] == {"blk.0.a": 0.0, "blk.0.b": 0.5}
    lv = alloc.levels["0.50"]
    assert lv["blk.0.a"] < lv["blk.0.b"]
    assert lv["blk.0.a"] + lv["blk.0.b"] == pytest.approx(1.0)
    # KL estimate: ½·mean((3·la·sign + lb·other)²) = ½·(9·la² + lb²) for uncorrelated signs.
    assert alloc.kl_estimate["0.50"] == pytest.approx(
        0.5 * (9 * lv["blk.0.a"] ** 2 + lv["blk.0.b"] ** 2), rel=1e-6)
    assert sal.estimate(lv) == pytest.approx(alloc.kl_estimate["0.50"], rel=1e-6)
    with pytest.raises(ValueError, match="beyond"):
        cross_layer_allocation(sal, {"blk.0.a": 10, "blk.0.b": 10}, targets=(0.8,))


def test_saliency_estimate_matches_kl(tiny, rng):
    """½·E[(Σ_t s_t)²] over sampled labels is the second-order KL (summed over positions) of
    masking one tensor's smallest inputs: a check of the gradients, the level buckets and the
    sign of a = x·∂L/∂x."""
    model = tiny.model()
    ids = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (1, 9)))
    name = "blk.1.ffn_down"
    threshold = quantile_table(model, ids)
    grid = [0.0, 0.1]

    def only(n: str, level: float) -> float:  # every other tensor dense at every level
        return threshold(n, level) if n == name else -1.0

    with torch.inference_mode():
        dense = model.forward(ids)[0].double()
        model.projector = MaskingProjector({name: threshold(name, 0.1)})
        sparse = model.forward(ids)[0].double()
        model.projector = dense_projector
    lp, lq = torch.log_softmax(dense, -1), torch.log_softmax(sparse, -1)
    kl = float((lp.exp() * (lp - lq)).sum())

    n = 400
    sal = saliency(model, ids, only, False, grid, samples=n, seed=1)
    p = sal.names.index(name)
    per_sample = -sal.sums[p, 1].double().reshape(n, -1).sum(1)  # Σ_t s_t per label sample
    est = 0.5 * float(per_sample.pow(2).mean())
    # Mean of n χ²-like samples: relative standard error about sqrt(2/n) = 7 %; allow four of
    # those plus the higher-order remainder of the expansion.
    assert est == pytest.approx(kl, rel=0.35)
    assert float(sal.sums[p, 0].abs().max()) == 0.0  # level 0 (threshold 0) masks nothing here
