"""Per-tensor sparsity allocation for model-wide targets, stored in the threshold table.

Two methods, both for either criterion (the table's thresholds already carry it):

**greedy** — TEAL's block-wise greedy (Liu et al., arXiv 2408.14690, Sec. 4.2 and its
Algorithm 1). Each block starts dense and takes steps of ``alpha`` × (the block's projection
weights) sparsified weights at a time: every step tries, for each of the seven projections,
raising its level by ``alpha·N_block / N_tensor`` (so each step adds the same number of skipped
weights whatever the tensor's size) and keeps the one whose block output moves least from the
dense block output (squared error over the calibration tokens, the block fed its dense input).
The path of configurations is recorded; the allocation for target T puts every block at
parameter-weighted sparsity T on its path.

A step that would take a tensor past the table's top level is cut short there; candidates are
then compared by error added per weight skipped, which for equal steps is TEAL's rule (least
error) and for a shortened step does not favour it merely for skipping less.

**cross-layer** — the same per-block paths, but blocks no longer all sit at T: each block b at
sparsity S costs an estimate of the KL divergence its error adds to the model's output, and the
block sparsities minimise the summed cost subject to the model-wide (parameter-weighted) mean
being T, solved exactly by dynamic programming over the path grid. The cost is the Fisher
quadratic form of the block-output error δ at every position t:

    KL_b(S) ≈ ½ · mean_t (g_t · δ_t)²,   g_t = ∂/∂h_b,t Σ_t' log p(y_t' | ·),  y ~ p_dense

The sampled-label gradient g has E[g gᵀ] equal to the Fisher information of the output
distribution pulled back to the block output (the cross-position terms vanish in expectation),
so this is the second-order KL of the perturbation, keeping only each position's own term. One
forward and one backward pass of the dense model give g for every block. Blocks whose error the
rest of the network damps (or amplifies) are thereby given more (or less) sparsity: sensitive
layers keep more of their inputs.

Both methods see only calibration text (the corpus's calibration part, or a file) and are
deterministic for a given machine: fixed token windows, fixed sampling seed, ties broken by the
fixed projection order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import PROJECTIONS
from .errors import SparsifyError
from .evaluate import projection_params
from .model import Model, dense_projector
from .sparse import column_norms

METHODS = ("greedy", "cross-layer")
# Model-wide targets stored in the table: every 0.05 from 0.05 to 0.90 (so 0.10, 0.20 … 0.90
# and the 0.25 the reports use are all exact entries).
TARGETS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 19))
# Greedy step, as a fraction of the block's weights: 40 steps to a fully sparse block. Finer
# steps cost time linearly (every step evaluates seven candidates) and changed allocations by
# less than the noise of the calibration text in trials on the bundled models.
ALPHA = 0.025
# Tokens per calibration window for allocation.
SEQ_LEN = 256
# Seed of the labels sampled from the dense model for the Fisher estimate.
FISHER_SEED = 0

ThresholdFn = Callable[[str, float], float]


@dataclass
class Path:
    """One block's greedy path: configuration and errors after each step.

    ``sparsity[k]`` is the block's parameter-weighted sparsity after step k (step 0 is the
    dense block), ``levels[k]`` the level of each projection (short names, ``ffn_up``),
    ``mse[k]`` the mean squared error of the block output against dense, ``kl[k]`` the Fisher
    estimate of the KL it adds to the output (nats per position; 0 when not computed).
    """

    block: int
    sparsity: list[float] = field(default_factory=list)
    levels: list[dict[str, float]] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def at(self, s: float) -> tuple[dict[str, float], float]:
        """Levels and KL estimate at block sparsity ``s``, between the recorded steps.

        Consecutive steps differ in one tensor, so moving that tensor's level linearly gives
        exactly parameter-weighted sparsity ``s``; the KL estimate is interpolated linearly.
        """
        sp = self.sparsity
        if not sp[0] - 1e-9 <= s <= sp[-1] + 1e-9:
            raise ValueError(f"block {self.block} path reaches {sp[-1]:.3f}, asked for {s:.3f}")
        k = int(np.searchsorted(sp, s, side="right")) - 1
        k = min(max(k, 0), len(sp) - 1)
        if k == len(sp) - 1 or abs(sp[k] - s) < 1e-12:
            return dict(self.levels[k]), self.kl[k]
        f = (s - sp[k]) / (sp[k + 1] - sp[k])
        a, b = self.levels[k], self.levels[k + 1]
        lv = {p: a[p] + f * (b[p] - a[p]) for p in a}
        return lv, self.kl[k] + f * (self.kl[k + 1] - self.kl[k])


class _IncrementalProjector:
    """Masked products for one block that reuse the committed configuration's results.

    A candidate changes one projection's threshold; every projection upstream of it sees the
    same input and threshold as in the committed configuration, so its product is taken from
    the record (``base``) instead of recomputed. Inputs are compared by value (the block
    recomputes them), a pass over the input, far cheaper than the product. Products computed
    by a run go to ``scratch``, which becomes part of ``base`` when that run is committed.

    The mask is :class:`~sparsify.sparse.MaskingProjector`'s, NOT(score <= t), written as one
    ``masked_fill`` (a NaN score compares false and is kept, as there).
    """

    def __init__(self, weight_aware: bool) -> None:
        self.weight_aware = weight_aware
        self.thresholds: dict[str, float] = {}
        self.base: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
        self.scratch: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
        self._norms: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.thresholds[name]
        b = self.base.get(name)
        if b is not None and b[0] == t and (b[1] is x or torch.equal(b[1], x)):
            return b[2]
        score = x.abs()
        if self.weight_aware:
            norm = self._norms.get(name)
            if norm is None:
                norm = self._norms[name] = column_norms(w)
            score = score * norm
        y = x.masked_fill(score <= t, 0.0) @ w.T
        self.scratch[name] = (t, x, y)
        return y


def greedy_path(model: Model, block: int, h_in: torch.Tensor, h_ref: torch.Tensor,
                pos: torch.Tensor, threshold: ThresholdFn, weight_aware: bool, cap: float,
                alpha: float = ALPHA, grad: torch.Tensor | None = None,
                lazy: bool = True) -> Path:
    """TEAL's block-wise greedy path for block ``block`` (see the module docstring).

    h_in (S, T, D) float32: the block's dense input on the calibration windows; h_ref (S, T, D)
    its dense output; pos (T,) positions; ``threshold(name, level)`` a tensor's threshold at a
    level; ``cap`` the highest level (the table's top). ``grad`` (S, T, D), when given, is the
    sampled-label gradient at the block output for the KL estimate. Restores the projector.

    With ``lazy`` (the default) a step re-evaluates candidates in order of their last known
    cost and takes the first whose fresh cost is still the lowest: the standard lazy greedy,
    which picks what the full search picks when a candidate's cost does not fall as the block
    grows sparser (each tensor's own cost rises with its level, as its threshold moves into
    larger activations; the other tensors' costs move little). It evaluates about two
    candidates a step instead of seven. ``lazy=False`` evaluates all seven every step.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    cfg = model.cfg
    prefix = f"blk.{block}."
    n = {k.removeprefix(prefix): v for k, v in projection_params(cfg).items()
         if k.startswith(prefix)}
    n_block = float(sum(n.values()))
    step = alpha * n_block
    names = {p: prefix + p for p in PROJECTIONS}
    proj = _IncrementalProjector(weight_aware)
    positions = h_in.shape[0] * h_in.shape[1]

    def run(levels: dict[str, float]) -> tuple[torch.Tensor, float]:
        proj.thresholds = {names[p]: threshold(names[p], lv) for p, lv in levels.items()}
        proj.scratch = {}
        out = model.block(block, h_in, pos)
        return out, float((out - h_ref).pow(2).sum(dtype=torch.float64)) / out.numel()

    def kl(out: torch.Tensor) -> float:
        if grad is None:
            return 0.0
        dots = ((out - h_ref) * grad).sum(-1, dtype=torch.float64)  # (S, T)
        return 0.5 * float(dots.pow(2).sum()) / positions

    path = Path(block)
    levels = {p: 0.0 for p in PROJECTIONS}
    # cost[p]: error added per weight skipped by p's next step; fresh[p]: measured at the
    # current configuration.
    cost: dict[str, float] = {}
    fresh: dict[str, bool] = {}
    last: tuple | None = None  # (p, level, out, err) of the latest candidate run

    def evaluate(p: str, err: float) -> None:
        nonlocal last
        new = min(cap, levels[p] + step / n[p])
        out, e = run({**levels, p: new})
        cost[p] = (e - err) / ((new - levels[p]) * n[p])
        fresh[p] = True
        last = (p, new, out, e)

    saved = model.projector
    model.projector = proj
    try:
        with torch.inference_mode():
            out, err = run(levels)
            proj.base = dict(proj.scratch)
            path.sparsity.append(0.0)
            path.levels.append(dict(levels))
            path.mse.append(err)
            path.kl.append(kl(out))
            while True:
                open_ = [p for p in PROJECTIONS if levels[p] < cap - 1e-9]
                if not open_:
                    break
                for p in open_:
                    if not lazy or p not in cost:
                        evaluate(p, err)
                while True:
                    p = min(open_, key=lambda q: (cost[q], PROJECTIONS.index(q)))
                    if fresh[p]:
                        break
                    evaluate(p, err)
                if last is not None and last[0] == p:
                    levels[p] = last[1]
                    out, err = last[2], last[3]
                else:
                    levels[p] = min(cap, levels[p] + step / n[p])
                    out, err = run(levels)
                proj.base.update(proj.scratch)
                last = None
                fresh = dict.fromkeys(fresh, False)
                path.sparsity.append(sum(levels[q] * n[q] for q in PROJECTIONS) / n_block)
                path.levels.append(dict(levels))
                path.mse.append(err)
                path.kl.append(kl(out))
    finally:
        model.projector = saved
    return path


def dense_block_states(model: Model, seqs: torch.Tensor):
    """Yield (i, h_in, h_out) for every block of the dense model on seqs (S, T) int64."""
    pos = torch.arange(seqs.shape[1])
    saved = model.projector
    model.projector = dense_projector
    try:
        with torch.inference_mode():
            h = model.embed(seqs)
            for i in range(model.cfg.n_layer):
                out = model.block(i, h, pos)
                yield i, h, out
                h = out
    finally:
        model.projector = saved


class _AutogradWeights:
    """The model's weights as autograd accepts them: tensors made under inference mode (the
    weight cache fills on first use, often inside ``torch.inference_mode``) cannot be saved
    for backward, so those are copied on each use."""

    def __init__(self, weights) -> None:
        self._w = weights
        self.device = weights.device

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._w[name]
        return t.clone() if t.is_inference() else t

    def rows(self, name: str, ids: np.ndarray) -> torch.Tensor:
        t = self._w.rows(name, ids)
        return t.clone() if t.is_inference() else t


def fisher_gradients(model: Model, seqs: torch.Tensor,
                     seed: int = FISHER_SEED) -> list[torch.Tensor]:
    """Per block, the gradient of Σ_t log p(y_t) at the block output, y sampled from the dense
    model: a list of n_layer float32 tensors (S, T, D). Deterministic for a given ``seed``.

    One window at a time, so the autograd graph holds one window's activations.
    """
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seqs.shape[1])
    grads: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    dense = Model(model.cfg, _AutogradWeights(model.w), dense_projector)
    for row in seqs:
        with torch.no_grad():
            h = dense.embed(row[None])
        with torch.enable_grad():
            h.requires_grad_(True)
            outs = []
            for i in range(dense.cfg.n_layer):
                h = dense.block(i, h, pos)
                outs.append(h)
            lp = torch.log_softmax(dense.head(h)[0], -1)  # (T, V)
            y = torch.multinomial(lp.detach().exp(), 1, generator=gen)  # (T, 1)
            gs = torch.autograd.grad(lp.gather(1, y).sum(), outs)
        for i, g in enumerate(gs):
            grads[i].append(g)
        del lp, gs, outs, h
    return [torch.cat(g, 0) for g in grads]


def greedy_paths(model: Model, seqs: torch.Tensor, threshold: ThresholdFn, weight_aware: bool,
                 cap: float, alpha: float = ALPHA, with_kl: bool = True,
                 progress: Callable[[int], None] | None = None) -> list[Path]:
    """Every block's greedy path on calibration windows seqs (S, T) int64 (KL estimates when
    ``with_kl``)."""
    grads = fisher_gradients(model, seqs) if with_kl else None
    if progress:
        progress(1)
    pos = torch.arange(seqs.shape[1])
    paths = []
    for i, h_in, h_out in dense_block_states(model, seqs):
        g = grads[i] if grads is not None else None
        paths.append(greedy_path(model, i, h_in, h_out, pos, threshold, weight_aware, cap,
                                 alpha, g))
        if grads is not None:
            grads[i] = None  # type: ignore[call-overload]  # free as we go
        if progress:
            progress(1)
    return paths


@dataclass
class Allocation:
    """Per target ("0.50"): tensor name -> level, and the summed KL estimate of the blocks."""

    levels: dict[str, dict[str, float]]
    kl_estimate: dict[str, float]


def greedy_allocation(paths: Sequence[Path], targets: Sequence[float] = TARGETS) -> Allocation:
    """TEAL's allocation: every block at sparsity T on its own path."""
    return _allocation(paths, {t: [t] * len(paths) for t in targets})


def cross_layer_allocation(paths: Sequence[Path], block_params: Sequence[float],
                           targets: Sequence[float] = TARGETS, alpha: float = ALPHA
                           ) -> Allocation:
    """Block sparsities minimising Σ_b KL_b(S_b) with Σ_b S_b·N_b / Σ N_b = T, per target.

    Each block's path is sampled every ``alpha``; the blocks' sparsities are multiples of
    ``alpha`` chosen by exact dynamic programming (blocks must have equal weight counts, as in
    every supported architecture, so the constraint is on the sum of grid indices).
    """
    if len(block_params) != len(paths) or len(set(block_params)) != 1:
        raise ValueError("cross-layer allocation needs one size per block, all equal")
    nb = len(paths)
    top = min(math.floor(p.sparsity[-1] / alpha + 1e-9) for p in paths)
    # cost[b, k]: KL estimate of block b at sparsity k·alpha.
    cost = np.array([[p.at(k * alpha)[1] for k in range(top + 1)] for p in paths])
    chosen: dict[float, list[float]] = {}
    for t in targets:
        units = t * nb / alpha
        u = round(units)
        if abs(units - u) > 1e-6:
            raise ValueError(f"target {t} times {nb} blocks is not a multiple of alpha {alpha}")
        if u > nb * top:
            raise ValueError(f"target {t} is beyond the reach of the blocks' paths")
        chosen[t] = [k * alpha for k in _min_sum_allocation(cost, u)]
    return _allocation(paths, chosen)


def _allocation(paths: Sequence[Path], block_sparsity: dict[float, list[float]]) -> Allocation:
    levels: dict[str, dict[str, float]] = {}
    est: dict[str, float] = {}
    for t, ss in block_sparsity.items():
        key = f"{t:.2f}"
        alloc: dict[str, float] = {}
        total = 0.0
        for path, s in zip(paths, ss):
            lv, kl = path.at(s)
            total += kl
            alloc.update({f"blk.{path.block}.{p}": _clean(v) for p, v in lv.items()})
        levels[key] = alloc
        est[key] = total
    return Allocation(levels, est)


def _min_sum_allocation(cost: np.ndarray, total: int) -> list[int]:
    """Indices k_b (0 <= k_b < K) with Σ k_b = total minimising Σ cost[b, k_b]; exact DP.

    cost (B, K) float. Ties go to the smaller index for the earlier block (np.argmin's first
    minimum), so the answer is deterministic.
    """
    nb, kk = cost.shape
    inf = np.inf
    best = np.full(total + 1, inf)
    best[: min(kk, total + 1)] = cost[0, : min(kk, total + 1)]
    choice = np.zeros((nb, total + 1), dtype=np.int64)
    choice[0, : min(kk, total + 1)] = np.arange(min(kk, total + 1))
    for b in range(1, nb):
        # cand[k, j] = best[j - k] + cost[b, k]
        cand = np.full((kk, total + 1), inf)
        for k in range(min(kk, total + 1)):
            cand[k, k:] = best[: total + 1 - k] + cost[b, k]
        choice[b] = np.argmin(cand, axis=0)
        best = cand[choice[b], np.arange(total + 1)]
    if not np.isfinite(best[total]):
        raise ValueError("no allocation reaches the target")
    ks = [0] * nb
    j = total
    for b in range(nb - 1, -1, -1):
        ks[b] = int(choice[b, j])
        j -= ks[b]
    return ks


def _clean(v: float) -> float:
    # Levels are written to JSON: round away float noise from the interpolation so that the
    # same computation gives the same bytes.
    return round(float(v), 6)


def run_allocate(spec: str, table_path: str, output: str | None, methods: list[str],
                 corpus_path: str | None, tokens: int, force: bool) -> None:
    """``sparsify allocate``: greedy and/or cross-layer allocations written into the table."""
    from pathlib import Path as FsPath

    from tqdm import tqdm

    from .evaluate import text_sequences
    from .loader import load
    from .table import ThresholdTable

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SparsifyError(f"unknown allocation method {bad[0] if bad else '(none)'!r} "
                            f"(known: {', '.join(METHODS)})")
    dest = table_path if output is None else output
    if FsPath(dest).exists() and not force:
        raise SparsifyError("exists; pass --force to replace it" if output else
                            "allocate replaces the input table; pass --force (or -o FILE)", dest)
    t0 = time.perf_counter()
    loaded = load(spec)
    table = ThresholdTable.load(table_path)
    table.check(loaded)
    cap = float(table.levels[-1])
    if cap < max(TARGETS):
        raise SparsifyError(f"table levels stop at {cap}; allocation needs {max(TARGETS)}",
                            table_path)
    seq_len = min(SEQ_LEN, tokens)
    seqs, source = text_sequences(loaded, corpus_path, tokens, seq_len, part="calibration")
    model = loaded.model()
    cfg = loaded.cfg
    with tqdm(total=cfg.n_layer + 1, desc="allocate", unit="block", file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        paths = greedy_paths(model, seqs, table.threshold, table.criterion == "weight-aware",
                             cap, with_kl="cross-layer" in methods, progress=bar.update)
    params = projection_params(cfg)
    block_params = [sum(v for k, v in params.items() if k.startswith(f"blk.{i}."))
                    for i in range(cfg.n_layer)]
    allocs = {m: (greedy_allocation(paths) if m == "greedy"
                  else cross_layer_allocation(paths, block_params)) for m in methods}
    for m, a in allocs.items():
        table = table.with_allocations(m, a.levels)
    table.save(dest, force=True)
    print(summary(allocs))
    print(f"[{len(paths)} blocks on {source['tokens']} calibration tokens "
          f"({source['identity']}), {time.perf_counter() - t0:.0f} s; wrote {dest}]",
          file=sys.stderr)


def summary(allocs: dict[str, Allocation]) -> str:
    """Per target, each method's summed KL estimate (nats per position; 0 when not computed)."""
    methods = list(allocs)
    rows = ["estimated KL added (nats/token): Σ over blocks of the Fisher estimate",
            f"{'target':>6}  " + "  ".join(f"{m:>12}" for m in methods)]
    for key in next(iter(allocs.values())).levels:
        rows.append(f"{key:>6}  " + "  ".join(f"{allocs[m].kl_estimate[key]:>12.4f}"
                                              for m in methods))
    return "\n".join(rows)
