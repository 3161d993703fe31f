"""``sparsify profile``: score distributions of every projection input -> a threshold table.

The calibration sequences go through the model block by block: all hidden states (n_seq, T,
d_model) stay in memory, one block's weights are loaded, every sequence passes through that
block in batches, the block's histograms become thresholds, and the block's weights are dropped
before the next. Memory is one block's weights plus the hidden states plus a few histograms,
whatever the depth, so models larger than RAM can be profiled. The output head is never run.

Scores are recorded in fixed histograms over the float32 bit pattern (:data:`SHIFT`): a positive
float's bits grow with its value, so ``bits >> SHIFT`` is a log-spaced bin index covering every
float32 value, zero and subnormals to inf and NaN, with 2**(23 - SHIFT) bins per octave. The
memory per histogram is fixed (512 KiB) and independent of the token count.

Thresholds are score quantiles (DESIGN.md): level s zeroes a fraction s of the entries on the
calibration text, where ``score <= threshold`` is zeroed. Within a bin the quantile is linear
interpolation, so its error is a fraction of one bin's mass (each bin is 0.27% wide in value).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import mmap
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numba
import numpy as np
import torch

from . import __version__, interrupt
from .config import PROJECTION_INPUT, PROJECTIONS
from .errors import SparsifyError
from .model import Model, dense_projector
from .sparse import MaskingProjector, column_norms

# 256 bins per octave: bin width 0.27% of the value.
SHIFT = 15
NBINS = 1 << (31 - SHIFT)  # sign bit is always 0 for scores
# The projection whose call records each distinct input (the first to read it, by block order).
RECORDED_BY = {inp: next(p for p in PROJECTIONS if PROJECTION_INPUT[p] == inp)
               for inp in dict.fromkeys(PROJECTION_INPUT.values())}
# Tokens per forward call into a block: enough rows for torch's matmuls to use every core.
BATCH_TOKENS = 4096
# ... and few enough sequences that the (batch, heads, T, T) attention scores stay under 24 MiB:
# glibc serves blocks over 32 MiB with a fresh mmap each time, and the page faults of touching
# it again for every batch cost more system time than the larger matmuls save.
ATTN_BYTES = 24 << 20


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper float64 value of each histogram bin, (NBINS,) each."""
    k = np.arange(NBINS + 1, dtype=np.uint64) << SHIFT
    with np.errstate(invalid="ignore"):  # the top bins' patterns are (signaling) NaNs
        edges = k.astype(np.uint32).view(np.float32).astype(np.float64)
    edges[-1] = np.inf  # 2**31 wraps to -0.0; the last bin (NaNs) has no finite top
    return edges[:-1], edges[1:]


@numba.njit(parallel=True, cache=True)
def _bit_histogram(bits: np.ndarray, n_parts: int) -> np.ndarray:
    """Counts of ``(bits & 0x7FFFFFFF) >> SHIFT`` over a flat uint32 array -> int64 (NBINS,).

    Masking the sign bit makes this the histogram of |x| for float32 bit patterns, so
    magnitude scores need no separate abs pass. Each part counts into its own row, then the
    rows are summed: no shared counters between threads.
    """
    n = bits.shape[0]
    parts = np.zeros((n_parts, NBINS), dtype=np.int64)
    for p in numba.prange(n_parts):
        row = parts[p]
        for j in range(p * n // n_parts, (p + 1) * n // n_parts):
            row[(bits[j] & 0x7FFFFFFF) >> SHIFT] += 1
    return parts.sum(axis=0)


def histogram(scores: torch.Tensor) -> torch.Tensor:
    """Counts per bin of |scores| (float32 CPU tensor, any shape) -> int64 (NBINS,).

    The sign is ignored, so raw activations give the histogram of their magnitudes.
    """
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    if scores.device.type != "cpu":
        raise ValueError(f"scores must be on the CPU, got {scores.device}")
    bits = scores.contiguous().reshape(-1).numpy().view(np.uint32)
    return torch.from_numpy(_bit_histogram(bits, numba.get_num_threads()))


@numba.njit(parallel=True, cache=True)
def _count_le(x: np.ndarray, t: np.ndarray, first: np.ndarray, last: np.ndarray,
              n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| and, per threshold j, how many |x| in t[j]'s own bin are <= t[j].

    x float32 (n,); t float32 (L,) ascending; levels first[b]..last[b]-1 have their threshold
    in bin b. Counting the lower bins from the histogram and comparing exactly only inside a
    threshold's own bin gives exact counts at the cost of one histogram.
    """
    n = x.shape[0]
    bits = x.view(np.uint32)
    hist = np.zeros((n_parts, NBINS), dtype=np.int64)
    exact = np.zeros((n_parts, t.shape[0]), dtype=np.int64)
    for p in numba.prange(n_parts):
        for i in range(p * n // n_parts, (p + 1) * n // n_parts):
            b = (bits[i] & 0x7FFFFFFF) >> SHIFT
            hist[p, b] += 1
            for j in range(first[b], last[b]):
                if abs(x[i]) <= t[j]:
                    exact[p, j] += 1
    return hist.sum(axis=0), exact.sum(axis=0)


def count_at_or_below(scores: torch.Tensor, thresholds: np.ndarray) -> np.ndarray:
    """Exact count of entries with ``|score| <= t`` for each threshold: int64 (L,).

    ``scores`` float32 CPU tensor (any shape); ``thresholds`` ascending, rounded to float32
    (the precision masks compare in). NaN scores are never counted, as masks keep them.
    """
    t = np.ascontiguousarray(thresholds, dtype=np.float32)
    if t.ndim != 1 or (np.diff(t) < 0).any() or np.isnan(t).any():
        raise ValueError("thresholds must be a 1-D ascending array without NaN")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    tb = (np.abs(t).view(np.uint32) >> SHIFT).astype(np.int64)
    first = np.searchsorted(tb, np.arange(NBINS), side="left")
    last = np.searchsorted(tb, np.arange(NBINS), side="right")
    x = scores.contiguous().reshape(-1).numpy()
    hist, exact = _count_le(x, t, first, last, numba.get_num_threads())
    below = np.concatenate([[0], np.cumsum(hist)])[tb]  # entries in bins under t's bin
    return below + exact


def quantile_thresholds(counts: np.ndarray, levels: Sequence[float]) -> list[float]:
    """Thresholds zeroing a fraction ``level`` of the histogrammed scores, one per level.

    ``counts``: int64 (NBINS,) from :func:`histogram`. Each threshold is rounded to float32
    (the precision scores are compared in) and returned as the shortest float that reads back
    as that float32, so table files are short and exact. Level 0 gives 0.0.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if any(b < a for a, b in itertools.pairwise(levels)) or any(not 0 <= s < 1 for s in levels):
        raise ValueError("levels must be ascending and lie in [0, 1)")
    if counts.shape != (NBINS,):
        raise ValueError(f"counts must have shape ({NBINS},), got {counts.shape}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("empty histogram: no scores were recorded")
    lo, hi = bin_edges()
    cum = np.cumsum(counts)
    out = []
    for s in levels:
        want = float(s) * total
        b = min(int(np.searchsorted(cum, want, side="left")), NBINS - 1)
        below = int(cum[b - 1]) if b else 0
        frac = (want - below) / counts[b] if counts[b] else 0.0
        if b == 0 or not np.isfinite(hi[b]):
            # Bin 0 holds exact zeros and subnormals below 5e-41: threshold 0 zeroes the
            # zeros and says so, instead of a meaningless subnormal cut.
            t = lo[b]
        else:
            t = lo[b] + min(max(frac, 0.0), 1.0) * (hi[b] - lo[b])
        t32 = np.float32(min(t, float(np.finfo(np.float32).max)))
        out.append(float(str(t32)))  # rounding to float32 keeps the order of thresholds
    return out


class HistogramProjector:
    """A projector that records score histograms of its inputs and computes the dense product.

    ``magnitude``: one histogram of |x| per distinct input, keyed ``blk.3.ffn_in``.
    ``weight-aware``: one histogram of |x|·‖W[:, i]‖ per tensor, keyed ``blk.3.ffn_down``,
    computed exactly as :class:`sparsify.sparse.MaskingProjector` scores.
    """

    def __init__(self, criterion: str) -> None:
        if criterion not in ("magnitude", "weight-aware"):
            raise ValueError(f"unknown criterion {criterion!r}")
        self.criterion = criterion
        self.hists: dict[str, torch.Tensor] = {}
        self._norms: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        block, proj = name.rsplit(".", 1)
        if self.criterion == "magnitude":
            inp = PROJECTION_INPUT[proj]
            if RECORDED_BY[inp] == proj:
                self._add(f"{block}.{inp}", x)  # the histogram ignores the sign: |x|
        else:
            n = self._norms.get(name)
            if n is None:
                n = self._norms[name] = column_norms(w)
            self._add(name, x.abs() * n)
        return dense_projector(name, x, w)

    def _add(self, key: str, scores: torch.Tensor) -> None:
        h = histogram(scores)
        if key in self.hists:
            self.hists[key] += h
        else:
            self.hists[key] = h

    def thresholds(self, levels: Sequence[float]) -> dict[str, list[float]]:
        """Per tensor name (``blk.3.attn_q``), thresholds at ``levels`` from what was seen."""
        out = {}
        for key, h in self.hists.items():
            ts = quantile_thresholds(h.numpy(), levels)
            if self.criterion == "weight-aware":
                out[key] = ts
            else:
                block, inp = key.rsplit(".", 1)
                for p in PROJECTIONS:
                    if PROJECTION_INPUT[p] == inp:
                        out[f"{block}.{p}"] = ts
        return out


def _drop_pages(gguf, prefix: str) -> None:
    """Hand the memory-mapped pages of tensors named ``prefix…`` back to the OS (Linux).

    They are clean file pages the kernel could reclaim anyway, but until then they count in
    the process's resident size; dropping them after each block keeps the resident size at
    one block's worth (the file stays in the page cache). MADV_DONTNEED on a read-only shared
    file mapping discards nothing: a later read faults the pages back in from the file.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    for name, info in gguf.tensors.items():
        if name.startswith(prefix):
            addr = gguf.raw(name).ctypes.data
            start = addr - addr % page
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + info.nbytes - start),
                         4)  # MADV_DONTNEED (asm-generic/mman-common.h)


def _batch_seqs(model: Model, T: int, batch_tokens: int) -> int:
    """Sequences of length T per forward call (see BATCH_TOKENS and ATTN_BYTES)."""
    return max(1, min(batch_tokens // T, ATTN_BYTES // (model.cfg.n_head * T * T * 4)))


def profile_thresholds(model: Model, seqs: np.ndarray, criterion: str,
                       levels: Sequence[float], progress: bool = True,
                       batch_tokens: int = BATCH_TOKENS) -> dict[str, list[float]]:
    """Thresholds per tensor (``blk.3.attn_q`` -> one per level) from calibration sequences.

    ``seqs``: int64 (n_seq, T) token ids, each row starting at position 0. ``model`` should
    stream its weights (``Weights(streaming=True)``); each block's weights are released after
    use. The model's projector is restored on return. A tqdm bar on stderr shows tokens/s
    (whole-model tokens: every block counts 1 / n_layer of a token).
    """
    from tqdm import tqdm

    seqs = np.ascontiguousarray(seqs, dtype=np.int64)
    if seqs.ndim != 2 or seqs.size == 0:
        raise ValueError(f"seqs must be a non-empty (n_seq, T) array, got shape {seqs.shape}")
    n_seq, T = seqs.shape
    n_layer = model.cfg.n_layer
    per_batch = _batch_seqs(model, T, batch_tokens)
    gguf = getattr(model.w, "gguf", None)
    saved = model.projector
    out: dict[str, list[float]] = {}
    bar = tqdm(total=n_seq * T, unit="tok", unit_scale=True, file=sys.stderr,
               disable=not progress, desc="profile", dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} "
                          "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    try:
        with torch.inference_mode():
            h = model.embed(torch.from_numpy(seqs))  # (n_seq, T, d_model)
            if gguf is not None:
                _drop_pages(gguf, "token_embd.")
            pos = torch.arange(T, device=model.device)
            for i in range(n_layer):
                bar.set_postfix_str(f"blk {i + 1}/{n_layer}", refresh=False)
                rec = HistogramProjector(criterion)
                model.projector = rec
                for s in range(0, n_seq, per_batch):
                    e = min(s + per_batch, n_seq)
                    h[s:e] = model.block(i, h[s:e], pos)
                    interrupt.check()
                    # From the exact running count: summing float fractions overshot the
                    # total by rounding (tqdm warned and clamped).
                    bar.update((i * n_seq + e) * T / n_layer - bar.n)
                out.update(rec.thresholds(levels))
                model.w.release_block(i)
                if gguf is not None:
                    _drop_pages(gguf, f"blk.{i}.")
    finally:
        model.projector = saved
        bar.close()
    if not torch.isfinite(h).all():
        raise SparsifyError("the model produced non-finite activations on the calibration "
                            "text; its thresholds would be meaningless")
    return out


def _forward_all(model: Model, seqs: np.ndarray, projector, batch_tokens: int) -> None:
    """Every sequence of ``seqs`` (int64 (n_seq, T)) through the model under ``projector``, in
    batches of about ``batch_tokens`` tokens; the model's projector is restored on return."""
    saved = model.projector
    model.projector = projector
    per_batch = _batch_seqs(model, seqs.shape[1], batch_tokens)
    try:
        with torch.inference_mode():
            for s in range(0, len(seqs), per_batch):
                model.forward(torch.from_numpy(seqs[s:s + per_batch]), last_only=True)
    finally:
        model.projector = saved


class _CountOnly(MaskingProjector):
    """Counts what :class:`MaskingProjector` would zero (its score, its ``NOT(score <= t)``
    rule) but returns the dense product, so each tensor sees the input it saw while
    profiling, and no second, masked product is computed."""

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.thresholds.get(name)
        if t is not None:
            keep = ~(self.score(name, x, w) <= t)
            self.zeroed[name] += int(keep.numel() - keep.sum())
            self.seen[name] += keep.numel()
        return dense_projector(name, x, w)


def realized_sparsity(model: Model, seqs: np.ndarray, thresholds: dict[str, float],
                      weight_aware: bool, masked: bool = True,
                      batch_tokens: int = BATCH_TOKENS) -> dict[str, float]:
    """Fraction of each tensor's input entries zeroed by ``thresholds`` over ``seqs``.

    ``seqs`` int64 (n_seq, T). ``masked=True`` runs the sparse model (every projection masked,
    so later inputs shift with earlier masking); ``masked=False`` counts the same masks on the
    dense model's inputs, which is what the thresholds were fitted to. The model's projector
    is restored on return.
    """
    cls = MaskingProjector if masked else _CountOnly
    proj = cls(thresholds, weight_aware=weight_aware, count=True)
    _forward_all(model, seqs, proj, batch_tokens)
    return proj.realized()


class _LevelCounter(MaskingProjector):
    """Counts, for every level of a table at once, the input entries each tensor's threshold
    zeroes (MaskingProjector's score, ``score <= t``), and returns the dense product."""

    def __init__(self, table) -> None:
        super().__init__({}, weight_aware=table.criterion == "weight-aware")
        self.grid = {n: np.float32(ts) for n, ts in table.thresholds.items()}
        self.counts: dict[str, np.ndarray] = {}

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.grid.get(name)
        if t is not None:
            c = count_at_or_below(self.score(name, x, w), t)
            self.counts[name] = self.counts.get(name, 0) + c
            self.seen[name] += x.numel()
        return dense_projector(name, x, w)


def realized_by_level(model: Model, seqs: np.ndarray, table,
                      batch_tokens: int = BATCH_TOKENS) -> dict[str, np.ndarray]:
    """Realized sparsity of every tensor at every level of ``table`` on the dense model.

    ``seqs`` int64 (n_seq, T). Returns name -> float64 (len(table.levels),): the fraction of
    the tensor's input entries that its threshold at each level zeroes, counted exactly. One
    forward pass for all levels; the model's projector is restored on return.
    """
    counter = _LevelCounter(table)
    _forward_all(model, seqs, counter, batch_tokens)
    return {n: c / counter.seen[n] for n, c in counter.counts.items()}


def default_output(model_path: str | Path, criterion: str) -> Path:
    """``<model file stem>.<criterion>.thresholds.json`` in the current directory."""
    return Path(f"{Path(model_path).stem}.{criterion}.thresholds.json")


def make_table(spec: str, corpus_path: str | None = None, tokens: int = 32768,
               seq_len: int = 512, criterion: str = "magnitude", seed: int = 0,
               progress: bool = True, loaded=None):
    """Profile model ``spec`` and return its :class:`sparsify.table.ThresholdTable`.

    ``corpus_path`` None uses the built-in corpus's calibration part. ``tokens`` is rounded
    up to whole sequences of ``seq_len``; ``seed`` draws which sequences of the text are used.
    """
    from . import corpus as corpus_mod
    from .loader import load
    from .table import DEFAULT_LEVELS, SCHEMA_VERSION, ThresholdTable, fingerprint

    if criterion not in ("magnitude", "weight-aware"):
        raise SparsifyError(f"unknown criterion {criterion!r} (magnitude, weight-aware)")
    if tokens < 1 or seq_len < 2:
        raise SparsifyError(f"need tokens >= 1 and seq_len >= 2, got {tokens} and {seq_len}")
    loaded = loaded if loaded is not None else load(spec)
    if seq_len > loaded.cfg.context_length:
        raise SparsifyError(f"--seq-len {seq_len} exceeds the model's context length "
                            f"{loaded.cfg.context_length}", loaded.path)
    text = (corpus_mod.calibration() if corpus_path is None
            else corpus_mod.from_file(corpus_path))
    n_seq = math.ceil(tokens / seq_len)
    try:
        seqs = corpus_mod.sequences(loaded.tokenizer, text.text, seq_len, n_seq, seed=seed)
    except SparsifyError as e:
        raise SparsifyError(f"corpus {text.identity} is too short for --tokens {tokens}: "
                            f"{e.reason}") from None
    fp = fingerprint(loaded)
    model = loaded.model(streaming=True)
    thresholds = profile_thresholds(model, seqs, criterion, DEFAULT_LEVELS, progress=progress)
    provenance = {"corpus": text.identity, "corpus_sha256": text.sha256,
                  "tokens": int(seqs.size), "seq_len": seq_len, "seed": seed,
                  "sparsify_version": __version__}
    return ThresholdTable(schema_version=SCHEMA_VERSION, fingerprint=fp, provenance=provenance,
                          criterion=criterion, levels=list(DEFAULT_LEVELS),
                          thresholds={n: thresholds[n] for n in sorted(thresholds)},
                          allocations={})


def run_profile(model: str, output: str | None, corpus: str | None, tokens: int, seq_len: int,
                criterion: str, seed: int, force: bool) -> None:
    """``sparsify profile``: write the table; progress and a summary on stderr."""
    import click

    from .loader import load

    t0 = time.perf_counter()
    loaded = load(model)
    out = Path(output) if output is not None else default_output(loaded.path, criterion)
    # Refuse before the long pass, not after it.
    if out.is_dir():
        raise SparsifyError("is a directory", out)
    if out.exists() and not force:
        raise SparsifyError("exists; pass --force to overwrite it", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SparsifyError(f"directory {parent} does not exist", out)
    table = make_table(model, corpus, tokens, seq_len, criterion, seed, loaded=loaded)
    table.save(out, force=force)
    dt = time.perf_counter() - t0
    click.echo(f"wrote {out}: {len(table.thresholds)} tensors x {len(table.levels)} levels, "
               f"{table.provenance['tokens']} tokens, {dt:.1f} s", err=True)
