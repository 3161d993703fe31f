"""Per-tensor sparsity allocation for model-wide targets, stored in the threshold table.

Two methods, both for either criterion (the table's thresholds carry the criterion; the masks
here use the same score):

**greedy** — TEAL's block-wise greedy (Liu et al., arXiv 2408.14690, Sec. 4.2 and Algorithm 1
there). Each block starts dense and takes steps that each skip ``alpha`` × (the block's
projection weights) more weights: every step tries, for each of the seven projections, raising
its level by ``alpha·N_block / N_tensor`` and keeps the one whose block output moves least from
the dense block output (squared error over the calibration tokens, the block fed its dense
input). The path of configurations is recorded; the allocation for target T puts every block
at parameter-weighted sparsity T on its path. A step that would take a tensor past the table's
top level is cut short there; candidates are compared by error added per weight skipped, which
for equal steps is TEAL's least-error rule and does not favour a shortened step merely for
skipping less.

**cross-layer** — one greedy over every tensor of every block against an estimate of the KL
divergence the masks add to the model's output, so that layers whose errors matter downstream
keep more of their inputs. For a sampled label y_t ~ p_dense(· | x_<t) at every position, the
gradient of L = Σ_t log p(y_t) with respect to a projection's input x gives each input entry's
first-order effect on L when zeroed, a = x·∂L/∂x. With M the entries a configuration masks,

    s_t = − Σ_{(p, i) ∈ M at position t} a_{p,t,i},      KL ≈ ½ · mean over t and samples of s_t²

Because E_y[∇L ∇Lᵀ] is the Fisher information of the output distribution, ½·E[(Σ_t s_t)²] is
the second-order expansion of the KL summed over the sequence; keeping each position's own term
(the mean of s_t²) drops only the products of different positions' perturbations. Masks of all
tensors interact through the shared s_t, so the estimate is not a sum of per-tensor costs. The
per-position sums of ``a`` are computed once per tensor for every level of a grid (one forward
and ``samples`` backward passes of the dense model per window), after which the greedy —
repeatedly raise, by one grid step, the tensor whose step adds the least estimated KL per
weight skipped — is arithmetic on those sums.

Both methods see only calibration text (the corpus's calibration part, or a file) and are
deterministic on a given machine: fixed token windows, fixed sampling seed, ties broken by the
fixed tensor order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import interrupt
from .config import PROJECTIONS
from .errors import SparsifyError
from .evaluate import projection_params
from .model import Model, dense_projector
from .sparse import column_norms

METHODS = ("greedy", "cross-layer")
# Model-wide targets stored in the table: every 0.05 from 0.05 to 0.90 (so 0.10, 0.20 … 0.90
# and the 0.25 the reports use are all exact entries).
TARGETS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 19))
# TEAL greedy step, as a fraction of the block's weights.
ALPHA = 0.025
# Level grid of the cross-layer greedy.
LEVEL_STEP = 0.025
# Tokens per calibration window.
SEQ_LEN = 256
# Calibration tokens the TEAL greedy measures block errors on (windows spread over the text):
# each step runs the block about twice, so its time grows with this; the cross-layer estimate
# uses all the calibration tokens.
GREEDY_TOKENS = 1024
# Labels sampled per position for the cross-layer estimate, and their seed.
SAMPLES = 2
SEED = 0

ThresholdFn = Callable[[str, float], float]


# ---- TEAL's block-wise greedy --------------------------------------------------------------

@dataclass
class Path:
    """One block's greedy path: configuration and error after each step.

    ``sparsity[k]`` is the block's parameter-weighted sparsity after step k (step 0 is the
    dense block), ``levels[k]`` the level of each projection (short names, ``ffn_up``),
    ``mse[k]`` the mean squared error of the block output against dense.
    """

    block: int
    sparsity: list[float] = field(default_factory=list)
    levels: list[dict[str, float]] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)

    def at(self, s: float) -> dict[str, float]:
        """Levels at block sparsity ``s``, between the recorded steps.

        Consecutive steps differ in one tensor, so moving that tensor's level linearly gives
        exactly parameter-weighted sparsity ``s``.
        """
        sp = self.sparsity
        if not sp[0] - 1e-9 <= s <= sp[-1] + 1e-9:
            raise ValueError(f"block {self.block} path reaches {sp[-1]:.3f}, asked for {s:.3f}")
        k = min(max(int(np.searchsorted(sp, s, side="right")) - 1, 0), len(sp) - 1)
        if k == len(sp) - 1 or abs(sp[k] - s) < 1e-12:
            return dict(self.levels[k])
        f = (s - sp[k]) / (sp[k + 1] - sp[k])
        a, b = self.levels[k], self.levels[k + 1]
        return {p: a[p] + f * (b[p] - a[p]) for p in a}


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
                alpha: float = ALPHA, lazy: bool = True, stop: float = 1.0) -> Path:
    """TEAL's block-wise greedy path for block ``block`` (see the module docstring).

    h_in (S, T, D) float32: the block's dense input on the calibration windows; h_ref (S, T, D)
    its dense output; pos (T,) positions; ``threshold(name, level)`` a tensor's threshold at a
    level; ``cap`` the highest level (the table's top); the path ends once the block's
    sparsity reaches ``stop`` (or every tensor is at ``cap``). Restores the model's projector.

    With ``lazy`` (the default) a step re-evaluates candidates in order of their last known
    cost and takes the first whose fresh cost is still the lowest: the standard lazy greedy,
    which picks what the full search picks when a candidate's cost does not fall as the block
    grows sparser (each tensor's own cost rises with its level, as its threshold moves into
    larger activations; the other tensors' costs move little). It runs the block about twice a
    step instead of seven times. ``lazy=False`` evaluates all seven every step.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    prefix = f"blk.{block}."
    n = {k.removeprefix(prefix): v for k, v in projection_params(model.cfg).items()
         if k.startswith(prefix)}
    n_block = float(sum(n.values()))
    step = alpha * n_block
    names = {p: prefix + p for p in PROJECTIONS}
    proj = _IncrementalProjector(weight_aware)

    def run(levels: dict[str, float]) -> tuple[torch.Tensor, float]:
        proj.thresholds = {names[p]: threshold(names[p], lv) for p, lv in levels.items()}
        proj.scratch = {}
        out = model.block(block, h_in, pos)
        return out, float((out - h_ref).pow(2).sum(dtype=torch.float64)) / out.numel()

    path = Path(block)
    levels = dict.fromkeys(PROJECTIONS, 0.0)
    # cost[p]: error added per weight skipped by p's next step; fresh[p]: measured at the
    # current configuration.
    cost: dict[str, float] = {}
    fresh: dict[str, bool] = {}
    last: tuple | None = None  # (p, level, err) of the latest candidate run

    def evaluate(p: str, err: float) -> None:
        nonlocal last
        new = min(cap, levels[p] + step / n[p])
        _, e = run({**levels, p: new})
        cost[p] = (e - err) / ((new - levels[p]) * n[p])
        fresh[p] = True
        last = (p, new, e)

    saved = model.projector
    model.projector = proj
    try:
        with torch.inference_mode():
            _, err = run(levels)
            proj.base = dict(proj.scratch)
            path.sparsity.append(0.0)
            path.levels.append(dict(levels))
            path.mse.append(err)
            while path.sparsity[-1] < stop - 1e-12:
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
                    levels[p], err = last[1], last[2]
                else:
                    levels[p] = min(cap, levels[p] + step / n[p])
                    _, err = run(levels)
                proj.base.update(proj.scratch)
                last = None
                fresh = dict.fromkeys(fresh, False)
                path.sparsity.append(sum(levels[q] * n[q] for q in PROJECTIONS) / n_block)
                path.levels.append(dict(levels))
                path.mse.append(err)
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


def greedy_paths(model: Model, seqs: torch.Tensor, threshold: ThresholdFn, weight_aware: bool,
                 cap: float, alpha: float = ALPHA, stop: float = 1.0,
                 progress: Callable[[int], None] | None = None) -> list[Path]:
    """Every block's greedy path on calibration windows seqs (S, T) int64, each up to block
    sparsity ``stop``."""
    pos = torch.arange(seqs.shape[1])
    paths = []
    for i, h_in, h_out in dense_block_states(model, seqs):
        paths.append(greedy_path(model, i, h_in, h_out, pos, threshold, weight_aware, cap,
                                 alpha, stop=stop))
        if progress:
            progress(1)
    return paths


@dataclass
class Allocation:
    """Per target ("0.50"): tensor name -> level; and the estimated KL added, when known."""

    levels: dict[str, dict[str, float]]
    kl_estimate: dict[str, float] = field(default_factory=dict)


def greedy_allocation(paths: Sequence[Path], targets: Sequence[float] = TARGETS) -> Allocation:
    """TEAL's allocation: every block at sparsity T on its own path."""
    levels: dict[str, dict[str, float]] = {}
    for t in targets:
        alloc: dict[str, float] = {}
        for path in paths:
            alloc.update({f"blk.{path.block}.{p}": _clean(v) for p, v in path.at(t).items()})
        levels[f"{t:.2f}"] = alloc
    return Allocation(levels)


# ---- cross-layer: a global greedy on the Fisher estimate of the KL -------------------------

def level_grid(cap: float, step: float = LEVEL_STEP) -> list[float]:
    """0, step, 2·step … up to ``cap``, with ``cap`` itself last when it is off the grid."""
    n = math.floor(cap / step + 1e-9)
    grid = [round(k * step, 6) for k in range(n + 1)]
    if cap - grid[-1] > 1e-9:
        grid.append(float(cap))
    return grid


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


@dataclass
class Saliency:
    """Cumulative first-order effects of masking, for every tensor at every grid level.

    ``sums[p, j, r]`` (float32, (P, L, R)) is Σ a over the entries of tensor ``names[p]`` that
    level ``grid[j]`` masks, at row r = (sample, window, position) flattened; a = x·∂L/∂x with
    L the log-likelihood of labels sampled from the dense model (see the module docstring).
    """

    names: list[str]
    grid: list[float]
    sums: torch.Tensor

    def estimate(self, levels: dict[str, float]) -> float:
        """Estimated KL (nats per position) of a configuration (tensor name -> level); levels
        between grid points interpolate the sums linearly; tensors not named are at level 0."""
        s = torch.zeros(self.sums.shape[2], dtype=torch.float64)
        g = np.asarray(self.grid)
        for p, name in enumerate(self.names):
            lv = levels.get(name, 0.0)
            j = int(np.clip(np.searchsorted(g, lv, side="right") - 1, 0, len(g) - 1))
            row = self.sums[p, j].double()
            if j + 1 < len(g) and lv > g[j]:
                f = (lv - g[j]) / (g[j + 1] - g[j])
                row = row + f * (self.sums[p, j + 1].double() - row)
            s -= row
        return 0.5 * float(s.pow(2).mean())


def saliency(model: Model, seqs: torch.Tensor, threshold: ThresholdFn, weight_aware: bool,
             grid: Sequence[float], samples: int = SAMPLES, seed: int = SEED,
             progress: Callable[[int], None] | None = None) -> Saliency:
    """Per tensor and grid level, the per-position sums of a = x·∂L/∂x over the masked entries.

    seqs (S, T) int64 calibration windows, one forward and ``samples`` backward passes each;
    labels drawn by a generator seeded with ``seed``. Entry i of a tensor's input is masked at
    level j when its score (|x|, or |x|·‖W[:, i]‖) is at most ``threshold(name, grid[j])``, as
    in :class:`~sparsify.sparse.MaskingProjector`; a NaN score is never masked.
    """
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    names = model.cfg.projection_names
    n_lev = len(grid)
    thr = {n: torch.tensor([threshold(n, lv) for lv in grid], dtype=torch.float32)
           for n in names}
    for n, t in thr.items():
        if not bool((t[1:] >= t[:-1]).all()):
            raise ValueError(f"thresholds of {n} do not grow with the level")
    gen = torch.Generator().manual_seed(seed)
    dense = Model(model.cfg, _AutogradWeights(model.w), dense_projector)
    pos = torch.arange(seqs.shape[1])
    norms: dict[str, torch.Tensor] = {}
    n_seq, T = seqs.shape
    sums = torch.zeros(len(names), n_lev, samples, n_seq, T, dtype=torch.float32)
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xv = x.view_as(x)  # its own autograd node: the gradient of this projection alone
        inputs[name] = (xv, w)
        return xv @ w.T

    dense.projector = record
    for r, row in enumerate(seqs):
        inputs.clear()
        with torch.no_grad():
            h = dense.embed(row[None])
        with torch.enable_grad():
            h.requires_grad_(True)
            for i in range(dense.cfg.n_layer):
                h = dense.block(i, h, pos)
            lp = torch.log_softmax(dense.head(h)[0], -1)  # (T, V)
            probs = lp.detach().exp()
            for k in range(samples):
                y = torch.multinomial(probs, 1, generator=gen)  # (T, 1)
                grads = torch.autograd.grad(lp.gather(1, y).sum(),
                                            [inputs[n][0] for n in names],
                                            retain_graph=k + 1 < samples)
                for p, (name, g) in enumerate(zip(names, grads)):
                    xv, w = inputs[name]
                    x = xv.detach()[0]  # (T, K)
                    score = x.abs()
                    if weight_aware:
                        if name not in norms:
                            norms[name] = column_norms(w.detach())
                        score = score * norms[name]
                    # First level whose threshold reaches the score: masked from there on.
                    first = torch.searchsorted(thr[name], score.contiguous())  # (T, K)
                    acc = torch.zeros(T, n_lev + 1)
                    acc.scatter_add_(1, first, x * g[0])
                    sums[p, :, k, r] = acc[:, :n_lev].cumsum(1).T
        del lp, probs, h
        inputs.clear()
        if progress:
            progress(1)
    return Saliency(list(names), list(grid), sums.reshape(len(names), n_lev, -1))


def cross_layer_allocation(sal: Saliency, params: dict[str, int],
                           targets: Sequence[float] = TARGETS) -> Allocation:
    """The global greedy on ``sal``: from dense, repeatedly raise one tensor by one grid step,
    the one whose step adds the least estimated KL per weight skipped, recording the
    configuration as the model-wide parameter-weighted sparsity passes each target (the last
    step interpolated so the target is met exactly)."""
    names, grid = sal.names, np.asarray(sal.grid, dtype=np.float64)
    n_p, n_lev, n_rows = sal.sums.shape
    n = torch.tensor([params[x] for x in names], dtype=torch.float64)
    total = float(n.sum())
    todo = sorted(targets)
    if todo and todo[-1] > grid[-1] + 1e-9:
        raise ValueError(f"target {todo[-1]} lies beyond the grid's top level {grid[-1]}")
    j = np.zeros(n_p, dtype=np.int64)
    s = -sal.sums[:, 0].double().sum(0)  # (R,): level 0 masks only exact zeros, if any

    def delta(p: int) -> torch.Tensor:
        if j[p] + 1 >= n_lev:
            return torch.zeros(n_rows, dtype=torch.float64)
        return -(sal.sums[p, j[p] + 1].double() - sal.sums[p, j[p]].double())

    d = torch.stack([delta(p) for p in range(n_p)])  # (P, R): each tensor's next step
    dot = d @ s  # (P,) Σ_r s·d_p
    sq = (d * d).sum(1)  # (P,) Σ_r d_p²
    out: dict[str, dict[str, float]] = {}
    est: dict[str, float] = {}
    sparsity = 0.0
    cur = {x: 0.0 for x in names}
    while todo:
        open_ = torch.from_numpy(j + 1 < n_lev)
        if not bool(open_.any()):
            break
        step = torch.from_numpy(grid[np.minimum(j + 1, n_lev - 1)] - grid[j])
        # KL(s + d_p) − KL(s) = (s·d_p + ½ d_p·d_p) / R, per weight the step skips.
        cost = (dot + 0.5 * sq) / (step * n).clamp_min(1e-300)
        cost[~open_] = math.inf
        q = int(torch.argmin(cost))  # first minimum: ties go to the earlier tensor
        new_sparsity = sparsity + float(step[q]) * float(n[q]) / total
        while todo and todo[0] <= new_sparsity + 1e-12:
            t = todo.pop(0)
            f = (t - sparsity) / (new_sparsity - sparsity)
            lv = dict(cur)
            lv[names[q]] = float(grid[j[q]] + f * (grid[j[q] + 1] - grid[j[q]]))
            key = f"{t:.2f}"
            out[key] = {x: _clean(v) for x, v in lv.items()}
            part = s + f * d[q]
            est[key] = 0.5 * float(part @ part) / n_rows
        dq = d[q].clone()
        s += dq
        dot += d @ dq
        j[q] += 1
        cur[names[q]] = float(grid[j[q]])
        sparsity = new_sparsity
        d[q] = delta(q)
        dot[q] = float(d[q] @ s)
        sq[q] = float(d[q] @ d[q])
    if todo:
        raise ValueError(f"targets {todo} are beyond what the grid reaches")
    return Allocation(out, est)


# ---- the command ---------------------------------------------------------------------------

def _spread(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1 (at least one, at most n), evenly spaced, in order."""
    k = max(1, min(n, k))
    return [i * n // k for i in range(k)]


def _clean(v: float) -> float:
    # Levels are written to JSON: round away float noise from the interpolation so that the
    # same computation gives the same bytes.
    return round(float(v), 6)


def allocate(model: Model, seqs: torch.Tensor, threshold: ThresholdFn, weight_aware: bool,
             cap: float, methods: Sequence[str], targets: Sequence[float] = TARGETS,
             greedy_tokens: int = GREEDY_TOKENS, samples: int = SAMPLES,
             progress: Callable[[int], None] | None = None) -> dict[str, Allocation]:
    """Allocations by each of ``methods`` for ``targets`` on calibration windows seqs (S, T).

    The greedy uses ``greedy_tokens // T`` windows (at least one) spread evenly over ``seqs``;
    the cross-layer estimate uses them all. With the cross-layer estimate computed, every method's
    allocations carry its KL estimate.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown allocation method {bad[0]!r} (known: {', '.join(METHODS)})")
    params = projection_params(model.cfg)
    out: dict[str, Allocation] = {}
    sal = None
    if "cross-layer" in methods:
        sal = saliency(model, seqs, threshold, weight_aware, level_grid(cap), samples,
                       progress=progress)
        out["cross-layer"] = cross_layer_allocation(sal, params, targets)
    if "greedy" in methods:
        paths = greedy_paths(model, seqs[_spread(len(seqs), greedy_tokens // seqs.shape[1])],
                             threshold, weight_aware, cap, stop=max(targets),
                             progress=progress)
        g = greedy_allocation(paths, targets)
        if sal is not None:
            g.kl_estimate = {key: sal.estimate(lv) for key, lv in g.levels.items()}
        out["greedy"] = g
    return {m: out[m] for m in methods}


def run_allocate(spec: str, table_path: str, output: str | None, methods: list[str],
                 corpus_path: str | None, tokens: int, force: bool) -> None:
    """``sparsify allocate``: allocations for model-wide targets written into the table."""
    from pathlib import Path as FsPath

    from tqdm import tqdm

    from .evaluate import text_sequences
    from .loader import load
    from .table import ThresholdTable

    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SparsifyError(f"unknown allocation method {bad[0] if bad else '(none)'!r} "
                            f"(known: {', '.join(METHODS)})")
    dest = table_path if output is None else output
    if FsPath(dest).exists() and not force:
        raise SparsifyError("exists; pass --force to replace it" if output else
                            "allocate rewrites the table in place; pass --force (or -o FILE)",
                            dest)
    t0 = time.perf_counter()
    loaded = load(spec)
    table = ThresholdTable.load(table_path)
    table.check(loaded)
    cap = float(table.levels[-1])
    if cap < max(TARGETS):
        raise SparsifyError(f"table levels stop at {cap:g}; allocation needs {max(TARGETS):g}",
                            table_path)
    seq_len = min(SEQ_LEN, tokens)
    seqs, source = text_sequences(loaded, corpus_path, tokens, seq_len, part="calibration")
    model = loaded.model()
    n_greedy = len(_spread(len(seqs), GREEDY_TOKENS // seq_len))
    total = (len(seqs) if "cross-layer" in methods else 0) + \
        (loaded.cfg.n_layer if "greedy" in methods else 0)
    with tqdm(total=total, desc="allocate", file=sys.stderr, leave=False,
              dynamic_ncols=True) as bar:
        allocs = allocate(model, seqs, table.threshold, table.criterion == "weight-aware",
                          cap, methods, progress=interrupt.checked(bar.update))
    for m, a in allocs.items():
        table = table.with_allocations(m, a.levels)
    table.save(dest, force=True)
    print(summary(allocs))
    print(f"[{source['tokens']} calibration tokens ({source['identity']}; greedy on "
          f"{n_greedy * seq_len} of them), {time.perf_counter() - t0:.0f} s; wrote {dest}]",
          file=sys.stderr)


def summary(allocs: dict[str, Allocation]) -> str:
    """Per target, each method's estimated KL added (nats per token), where known."""
    methods = list(allocs)
    rows = ["estimated KL added (nats/token; Fisher estimate on the calibration text)",
            f"{'target':>6}  " + "  ".join(f"{m:>12}" for m in methods)]
    for key in next(iter(allocs.values())).levels:
        cells = [f"{allocs[m].kl_estimate[key]:>12.4f}" if key in allocs[m].kl_estimate
                 else f"{'-':>12}" for m in methods]
        rows.append(f"{key:>6}  " + "  ".join(cells))
    return "\n".join(rows)
