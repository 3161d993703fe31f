"""Quality of a sparse model against its dense self: perplexity, KL to dense, top-1 agreement.

The sparse forward is the dense forward with a :class:`~sparsify.sparse.MaskingProjector`
installed (DESIGN.md: masking is the same as skipping). For every held-out sequence the dense
forward runs once; its log-probabilities are kept only for that sequence while each sparsity
level runs over it, so memory stays at a few (T, vocab) arrays whatever the text length (the
vocabulary is 262k for Gemma 3) and the dense pass is never repeated.

Scored positions: in a sequence of T tokens the logits at positions 0..T-2 predict tokens
1..T-1; perplexity, KL and top-1 agreement are all taken over those T-1 predictions.

Realized sparsity counts, per tensor, the fraction of input entries the mask zeroed over every
position the model saw. Model-wide it is parameter-weighted: the fraction of the block
projections' weights a sparse kernel would skip (the kernels' input-major formats store every
weight at the same width, so this is also the fraction of their weight bytes). The fraction of
the GGUF file's own bytes (whose quantization types differ between tensors) is reported beside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import interrupt
from .config import ModelConfig
from .errors import SparsifyError
from .model import Model, dense_projector
from .sparse import MaskingProjector

# Rows of (T, vocab) logits reduced at once: bounds the float temporaries to a few hundred MB
# for a 262k vocabulary.
_ROW_CHUNK = 64


def projection_params(cfg: ModelConfig) -> dict[str, int]:
    """Weight count of every sparsifiable projection, by GGUF name (``blk.3.ffn_down``)."""
    hd, hv = cfg.head_dim, cfg.head_dim_v
    d, f = cfg.d_model, cfg.d_ff
    per = {
        "attn_q": cfg.n_head * hd * d,
        "attn_k": cfg.n_head_kv * hd * d,
        "attn_v": cfg.n_head_kv * hv * d,
        "attn_output": d * cfg.n_head * hv,
        "ffn_gate": f * d,
        "ffn_up": f * d,
        "ffn_down": d * f,
    }
    return {name: per[name.split(".", 2)[2]] for name in cfg.projection_names}


def weighted_sparsity(per_tensor: dict[str, float], weights: dict[str, int | float]) -> float:
    """Σ s_l·w_l / Σ w_l over the tensors of ``weights``; tensors missing from ``per_tensor``
    count as dense (0)."""
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("weighted_sparsity needs positive weights")
    return sum(per_tensor.get(k, 0.0) * w for k, w in weights.items()) / total


@dataclass
class _Tally:
    """Running sums over scored positions for one pass (dense or one sparsity level)."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0

    def add(self, nll: float, kl: float, agree: int, n: int) -> None:
        self.nll += nll
        self.kl += kl
        self.agree += agree
        self.n += n


@dataclass
class LevelResult:
    """One sparsity level on the evaluation text.

    ``target`` is the requested model-wide level; ``realized_model`` what the masks did
    (parameter-weighted), ``realized_model_gguf_bytes`` the same weighted by the GGUF file's
    bytes, ``realized`` the zeroed fraction per tensor. ``mean_kl`` is KL(dense ‖ sparse) in
    nats per scored position; ``top1_agreement`` the fraction of positions whose argmax equals
    dense's.
    """

    target: float
    perplexity: float
    nll: float
    ppl_rise: float
    ppl_rise_rel: float
    mean_kl: float
    top1_agreement: float
    realized_model: float
    realized_model_gguf_bytes: float
    realized: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Dense reference and every level, over ``sequences`` × ``seq_len`` tokens."""

    dense_perplexity: float
    dense_nll: float
    sequences: int
    seq_len: int
    scored_positions: int
    levels: list[LevelResult]
    seconds: float


@dataclass
class DenseRows:
    """What scoring a sparse pass needs of the dense pass over the same rows (positions).

    ``probs`` (R, V) float32 dense probabilities; ``neg_entropy`` (R,) float64 Σ_v p·log p;
    ``argmax`` (R,) int64 dense top-1 tokens.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    argmax: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> DenseRows:
        """From dense logits (R, V); reduced ``_ROW_CHUNK`` rows at a time."""
        probs = torch.empty(logits.shape, dtype=torch.float32)
        neg = torch.empty(logits.shape[0], dtype=torch.float64)
        for a in range(0, logits.shape[0], _ROW_CHUNK):
            lp = torch.log_softmax(logits[a:a + _ROW_CHUNK].float(), -1)
            p = probs[a:a + _ROW_CHUNK]
            torch.exp(lp, out=p)
            neg[a:a + _ROW_CHUNK] = (p * lp).sum(-1, dtype=torch.float64)
        return cls(probs, neg, logits.argmax(-1))


def score_rows(dense: DenseRows, logits: torch.Tensor,
               targets: torch.Tensor) -> tuple[float, float, int]:
    """NLL sum, KL(dense ‖ sparse) sum and argmax agreements over rows.

    ``logits`` (R, V) the sparse model's logits, ``targets`` (R,) int64 the next tokens. With
    log q = z − logsumexp(z) and Σ p = 1, KL = Σ p·log p − Σ p·z + logsumexp(z): two passes
    over the sparse logits (log-sum-exp, and the dot product with p) instead of a full
    log-softmax, which matters at a 262k vocabulary. Products in float32, sums in float64; the
    cancellation between terms of size |z| (≈ 10–30) leaves ~1e-5 nats per row, far below the
    KL values reported.
    """
    nll = kl = 0.0
    agree = 0
    for a in range(0, logits.shape[0], _ROW_CHUNK):
        z = logits[a:a + _ROW_CHUNK].float()
        lse = torch.logsumexp(z, -1).double()
        pz = (dense.probs[a:a + _ROW_CHUNK] * z).sum(-1, dtype=torch.float64)
        kl += float((dense.neg_entropy[a:a + _ROW_CHUNK] - pz + lse).sum())
        t = targets[a:a + _ROW_CHUNK]
        nll += float((lse - z.gather(1, t[:, None])[:, 0].double()).sum())
        agree += int((z.argmax(-1) == dense.argmax[a:a + _ROW_CHUNK]).sum())
    return nll, kl, agree


def _dense_equivalent(th: dict[str, float]) -> bool:
    # score = |x| (or |x|·‖W[:, i]‖) is never negative: with every threshold ≤ 0 the mask zeroes
    # only entries that are already 0, so the output is the dense output bit for bit.
    return all(t <= 0 for t in th.values())


def evaluate_levels(model: Model, sequences: torch.Tensor, level_thresholds: Sequence[dict],
                    targets: Sequence[float], weight_aware: bool | Sequence[bool],
                    gguf_bytes: dict[str, int] | None = None,
                    progress: Callable[[int], None] | None = None) -> EvalResult:
    """Evaluate ``model`` at each level on ``sequences`` against its dense self.

    sequences (S, T) int64 token ids, each row evaluated from position 0; level_thresholds[j]
    maps projection names to thresholds for level ``targets[j]``; ``weight_aware`` selects the
    score, for all levels or per level. ``gguf_bytes`` (name → stored bytes) weights the second
    model-wide figure; ``progress(n)`` is told of every finished pass. Restores
    ``model.projector`` on return.
    """
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (S, T) with T >= 2, got {tuple(sequences.shape)}")
    if len(level_thresholds) != len(targets):
        raise ValueError("one threshold dict per target level")
    if isinstance(weight_aware, bool):
        weight_aware = [weight_aware] * len(targets)
    if len(weight_aware) != len(targets):
        raise ValueError("one weight_aware flag per target level")
    params = projection_params(model.cfg)
    sizes = gguf_bytes or params
    t0 = time.perf_counter()
    saved = model.projector
    equiv = [j for j, th in enumerate(level_thresholds) if _dense_equivalent(th)]
    projectors = [MaskingProjector(th, weight_aware=wa, count=True)
                  for th, wa in zip(level_thresholds, weight_aware)]
    # The dense pass doubles as the first dense-equivalent level's pass (same output), which
    # then only needs its mask counts.
    dense_proj = projectors[equiv[0]] if equiv else dense_projector
    dense = _Tally()
    tallies = [_Tally() for _ in level_thresholds]
    try:
        with torch.inference_mode():
            for seq in sequences:
                ids = seq[None]
                tgt = seq[1:]
                model.projector = dense_proj
                logits = model.forward(ids)[0, :-1]
                rows = DenseRows.from_logits(logits)
                nll = float((torch.logsumexp(logits.float(), -1).double()
                             - logits.gather(1, tgt[:, None])[:, 0].double()).sum())
                del logits
                dense.add(nll, 0.0, len(tgt), len(tgt))
                if progress:
                    progress(1)
                for j, proj in enumerate(projectors):
                    if equiv and j == equiv[0]:
                        tallies[j].add(nll, 0.0, len(tgt), len(tgt))
                        continue
                    model.projector = proj
                    logits = model.forward(ids)[0, :-1]
                    tallies[j].add(*score_rows(rows, logits, tgt), len(tgt))
                    del logits
                    if progress:
                        progress(1)
                del rows
    finally:
        model.projector = saved
    dense_nll = dense.nll / dense.n
    dense_ppl = math.exp(dense_nll)
    results = []
    for target, proj, tally in zip(targets, projectors, tallies):
        realized = proj.realized()
        nll = tally.nll / tally.n
        ppl = math.exp(nll)
        results.append(LevelResult(
            target=float(target), perplexity=ppl, nll=nll, ppl_rise=ppl - dense_ppl,
            ppl_rise_rel=ppl / dense_ppl - 1.0, mean_kl=tally.kl / tally.n,
            top1_agreement=tally.agree / tally.n,
            realized_model=weighted_sparsity(realized, params),
            realized_model_gguf_bytes=weighted_sparsity(realized, sizes),
            realized={k: realized.get(k, 0.0) for k in params},
        ))
    return EvalResult(dense_perplexity=dense_ppl, dense_nll=dense_nll,
                      sequences=int(sequences.shape[0]), seq_len=int(sequences.shape[1]),
                      scored_positions=dense.n, levels=results,
                      seconds=time.perf_counter() - t0)


# --- llama-perplexity's scoring ---------------------------------------------------------------

def llama_perplexity_windows(ids: Sequence[int], n_ctx: int, bos: int | None,
                             chunks: int | None = None) -> list[list[int]]:
    """The windows llama.cpp's ``llama-perplexity`` evaluates (``tools/perplexity``,
    ``perplexity()``): consecutive ``n_ctx`` slices of the tokenized text (a trailing partial
    one dropped, at most ``chunks``), each with its first token replaced by BOS when the model
    adds BOS."""
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4, got {n_ctx}")
    n = len(ids) // n_ctx
    if chunks is not None:
        n = min(n, chunks)
    out = []
    for i in range(n):
        w = list(ids[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def second_half_nll(logits: np.ndarray, window: Sequence[int]) -> tuple[float, int]:
    """llama-perplexity's score of one window: the summed NLL of tokens n_ctx/2+1 … n_ctx-1
    given the logits (n_ctx, V) at positions n_ctx/2 … n_ctx-2 (float64), and their count.
    The first half of the window is context only."""
    n_ctx = len(window)
    if logits.shape[0] != n_ctx:
        raise ValueError(f"logits have {logits.shape[0]} rows for a window of {n_ctx}")
    first = n_ctx // 2
    lg = np.asarray(logits[first:n_ctx - 1], dtype=np.float64)
    lse = np.logaddexp.reduce(lg, axis=-1)
    tgt = np.asarray(window[first + 1:n_ctx])
    return float((lse - lg[np.arange(len(tgt)), tgt]).sum()), len(tgt)


# --- text -------------------------------------------------------------------------------------

def text_sequences(loaded, text_path: str | None, tokens: int, seq_len: int,
                   part: str = "heldout") -> tuple[torch.Tensor, dict]:
    """Token sequences (S, seq_len) int64 from a UTF-8 text file, or from the built-in corpus's
    ``part`` ("heldout" or "calibration"), with a description of the text for records.

    S = tokens // seq_len (at least 1) consecutive windows from the start of the text; a text
    too short for that gives every window it holds (SparsifyError when it holds none).
    """
    from . import corpus

    if part not in ("heldout", "calibration"):
        raise ValueError(f"part must be heldout or calibration, got {part!r}")
    if text_path is not None:
        src = corpus.from_file(text_path)
    else:
        src = corpus.heldout() if part == "heldout" else corpus.calibration()
    want = max(1, tokens // seq_len)
    tok = loaded.tokenizer
    try:
        arr = corpus.sequences(tok, src.text, seq_len, want)
    except SparsifyError:
        arr = corpus.sequences(tok, src.text, seq_len)  # every window there is, or the error
        print(f"note: {src.identity} holds only {arr.shape[0]} sequences of {seq_len} tokens; "
              f"using them all", file=sys.stderr)
    source = {"identity": src.identity, "sha256": src.sha256, "tokens": int(arr.size),
              "sequences": int(arr.shape[0]), "seq_len": int(arr.shape[1])}
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)), source


# --- records ----------------------------------------------------------------------------------

def machine_record() -> dict:
    """Where a result was measured, as the machine reports it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import __version__

    return {
        "device": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "sparsify": __version__, "platform": platform.platform(),
    }


def write_json(path: str | Path, data: dict, force: bool) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`sparsify.table.write_atomic`: a
    temp file in the same directory, then a rename); an existing file needs ``force``."""
    from .table import write_atomic

    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    write_atomic(path, text.encode("utf-8"), force=force)


def format_table(result: EvalResult, method: str) -> str:
    """The levels as a fixed-width text table (one row per level, dense first)."""
    lines = [(f"{'method':<12} {'target':>6} {'realized':>8} {'ppl':>9} {'Δppl':>8} "
             f"{'Δppl %':>7} {'KL':>8} {'top-1':>6}"),
             (f"{'dense':<12} {'':>6} {0.0:>8.3f} {result.dense_perplexity:>9.3f} {0.0:>8.3f} "
             f"{0.0:>7.2f} {0.0:>8.4f} {1.0:>6.3f}")]
    for r in result.levels:
        lines.append(f"{method:<12} {r.target:>6.2f} {r.realized_model:>8.3f} "
                     f"{r.perplexity:>9.3f} {r.ppl_rise:>8.3f} {100 * r.ppl_rise_rel:>7.2f} "
                     f"{r.mean_kl:>8.4f} {r.top1_agreement:>6.3f}")
    return "\n".join(lines)


def run_eval(spec: str, table_path: str, levels: list[float], method: str, text: str | None,
             tokens: int, seq_len: int, json_out: str | None, force: bool) -> dict:
    """``sparsify eval``: the table at each level on held-out text; table to stdout.

    Returns the record that ``--json`` writes.
    """
    from tqdm import tqdm

    from .bundled import sha256_file
    from .loader import load
    from .table import ThresholdTable

    if json_out is not None and Path(json_out).exists() and not force:
        raise SparsifyError("exists; pass --force to overwrite it", json_out)
    loaded = load(spec)
    table = ThresholdTable.load(table_path)
    table.check(loaded)
    # Level 0 is the same point (every tensor at level 0) whatever the method; allocations are
    # stored only for positive targets.
    thresholds = [table.thresholds_at(s, method if s > 0 else "uniform") for s in levels]
    seqs, source = text_sequences(loaded, text, tokens, seq_len)
    model = loaded.model()
    gguf_bytes = {n: loaded.gguf.tensors[n + ".weight"].nbytes for n in loaded.cfg.projection_names}
    n_pass = seqs.shape[0] * (1 + sum(not _dense_equivalent(t) for t in thresholds))
    with tqdm(total=n_pass, desc=f"eval {method}", unit="pass", file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        res = evaluate_levels(model, seqs, thresholds, levels,
                              weight_aware=table.criterion == "weight-aware",
                              gguf_bytes=gguf_bytes,
                              progress=interrupt.checked(bar.update))
    print(format_table(res, method))
    print(f"[{res.sequences} × {res.seq_len} tokens, {res.seconds:.1f} s]", file=sys.stderr)
    record = {
        "kind": "sparsify.eval",
        "schema_version": 1,
        "model": {"name": loaded.path.name, "arch": loaded.cfg.arch,
                  "sha256": sha256_file(loaded.path), "synthetic_weights": False},
        "table": {"path": str(table_path), "criterion": table.criterion,
                  "provenance": table.provenance},
        "method": method,
        "text": source,
        "dtype": "float32",
        "machine": machine_record(),
        **{k: v for k, v in asdict(res).items() if k != "levels"},
        "levels": [asdict(r) for r in res.levels],
    }
    if json_out is not None:
        write_json(json_out, record, force)
    return record
