"""Sparsity allocation: TEAL's block-wise greedy, the cross-layer allocation, their pieces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sparsify.allocate import (
    Path,
    _min_sum_allocation,
    cross_layer_allocation,
    dense_block_states,
    fisher_gradients,
    greedy_allocation,
    greedy_path,
    greedy_paths,
)
from sparsify.config import PROJECTIONS
from sparsify.evaluate import projection_params, weighted_sparsity
from sparsify.model import dense_projector
from sparsify.sparse import MaskingProjector

GRID = np.round(np.arange(20) * 0.05, 2)  # table levels 0.00 … 0.95


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's products are too small to share among threads: with several, the
    thread pool's synchronisation costs more than the work (10x on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _path(block: int, points: list[tuple[float, dict[str, float], float]]) -> Path:
    p = Path(block)
    for s, lv, kl in points:
        p.sparsity.append(s)
        p.levels.append(lv)
        p.mse.append(kl)
        p.kl.append(kl)
    return p


def test_min_sum_allocation_is_exact(rng):
    cost = rng.random((4, 5))
    for total in (0, 3, 7, 16):
        got = _min_sum_allocation(cost, total)
        assert sum(got) == total
        best = min(sum(cost[b, k] for b, k in enumerate(ks))
                   for ks in itertools.product(range(5), repeat=4) if sum(ks) == total)
        assert sum(cost[b, k] for b, k in enumerate(got)) == pytest.approx(best)
    with pytest.raises(ValueError, match="no allocation"):
        _min_sum_allocation(cost, 17)


def test_path_interpolates_to_exact_sparsity():
    zero = dict.fromkeys(PROJECTIONS, 0.0)
    a = {**zero, "ffn_up": 0.4}
    b = {**a, "attn_q": 0.8}
    p = _path(0, [(0.0, zero, 0.0), (0.1, a, 1.0), (0.3, b, 3.0)])
    lv, kl = p.at(0.2)
    assert lv == pytest.approx({**a, "attn_q": 0.4}) and kl == pytest.approx(2.0)
    assert p.at(0.3) == (b, 3.0)
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


def test_allocations_hit_their_targets(tiny, rng):
    model = tiny.model()
    ids = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (2, 17)))
    threshold = quantile_table(model, ids)
    paths = greedy_paths(model, ids, threshold, False, 0.95, alpha=0.05)
    params = projection_params(tiny.cfg)
    block_params = [sum(v for k, v in params.items() if k.startswith(f"blk.{i}."))
                    for i in range(tiny.cfg.n_layer)]
    targets = (0.1, 0.45, 0.9)
    greedy = greedy_allocation(paths, targets)
    cross = cross_layer_allocation(paths, block_params, targets, alpha=0.05)
    for t in targets:
        key = f"{t:.2f}"
        for alloc in (greedy.levels[key], cross.levels[key]):
            assert set(alloc) == set(params)
            assert weighted_sparsity(alloc, params) == pytest.approx(t, abs=1e-6)
        for i in range(tiny.cfg.n_layer):  # greedy: every block at the target
            blk = {k: v for k, v in params.items() if k.startswith(f"blk.{i}.")}
            assert weighted_sparsity(greedy.levels[key], blk) == pytest.approx(t, abs=1e-6)
        # The DP minimises the summed estimate; the uniform-per-block split is one candidate.
        assert cross.kl_estimate[key] <= greedy.kl_estimate[key] + 1e-12
    # Deterministic: the same inputs give the same paths.
    again = greedy_paths(model, ids, threshold, False, 0.95, alpha=0.05)
    assert [p.levels for p in again] == [p.levels for p in paths]
    assert [p.kl for p in again] == [p.kl for p in paths]


def test_cross_layer_spares_the_sensitive_block():
    zero = dict.fromkeys(PROJECTIONS, 0.0)

    def path(block: int, scale: float) -> Path:
        pts = []
        for k in range(11):  # block sparsity k/10 with every tensor at k/10; KL = scale·s²
            s = k / 10
            pts.append((s, dict.fromkeys(PROJECTIONS, s) if k else zero, scale * s * s))
        return _path(block, pts)

    paths = [path(0, 9.0), path(1, 1.0)]
    alloc = cross_layer_allocation(paths, [10, 10], targets=(0.5,), alpha=0.1)
    lv = alloc.levels["0.50"]
    # Minimising 9·a² + b² with a + b = 1 on the 0.1 grid: a = 0.1, b = 0.9.
    assert lv["blk.0.ffn_up"] == pytest.approx(0.1) and lv["blk.1.ffn_up"] == pytest.approx(0.9)
    assert alloc.kl_estimate["0.50"] == pytest.approx(9 * 0.01 + 0.81)
    with pytest.raises(ValueError, match="equal"):
        cross_layer_allocation(paths, [10, 11], targets=(0.5,), alpha=0.1)


def test_fisher_estimate_matches_kl(tiny, rng):
    """½·E[(g·δ)²] over sampled labels is the second-order KL of a small perturbation δ of one
    block's output (here at one position, where the per-position form is exact)."""
    model = tiny.model()
    ids = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (1, 9)))
    block, t0 = 1, 4
    delta = torch.zeros(1, 9, tiny.cfg.d_model)
    delta[0, t0] = torch.from_numpy(rng.normal(0, 1, tiny.cfg.d_model)).float()
    delta *= 0.05 / delta.norm()  # small: the quadratic term dominates the KL

    pos = torch.arange(9)
    with torch.inference_mode():
        h = model.embed(ids)
        for i in range(tiny.cfg.n_layer):
            h = model.block(i, h, pos)
            if i == block:
                hp = h + delta
                for j in range(i + 1, tiny.cfg.n_layer):
                    h = model.block(j, h, pos)
                    hp = model.block(j, hp, pos)
                break
        lp = torch.log_softmax(model.head(h).double(), -1)
        lq = torch.log_softmax(model.head(hp).double(), -1)
        kl = float((lp.exp() * (lp - lq)).sum())

    n = 300
    est = np.mean([0.5 * float((fisher_gradients(model, ids, seed=s)[block] * delta).sum()) ** 2
                   for s in range(n)])
    # Mean of n scaled χ²-like samples: relative standard error about sqrt(2/n) = 8 %; allow
    # four of those, plus the cubic remainder of the expansion.
    assert est == pytest.approx(kl, rel=0.35)
