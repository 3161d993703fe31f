"""Sparse forward in torch: mask each projection's input by its threshold (DESIGN.md semantics).

    y = W · (x ⊙ [score(x) > t]),   score = |x|  or  |x| · ‖W[:, i]‖ (weight-aware)

Masking is mathematically the same as skipping the weight rows of zeroed inputs, which is what
the kernels do; prefill, perplexity and profiling use this form.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .model import Model, dense_projector


def column_norms(w: torch.Tensor) -> torch.Tensor:
    """‖W[:, i]‖ for an output-major weight (N, K): one norm per input channel, (K,)."""
    return torch.linalg.vector_norm(w, dim=0)


class MaskingProjector:
    """A projector that zeroes inputs whose score is at or below the tensor's threshold.

    ``thresholds`` maps projection names (``blk.3.ffn_down``) to a threshold; names not in it
    stay dense. With ``weight_aware`` the score is |x| times the weight's column norm. With
    ``count=True`` the projector tallies, per name, how many input entries it zeroed, so
    :meth:`realized` gives the realized sparsity per tensor.
    """

    def __init__(self, thresholds: dict[str, float], weight_aware: bool = False,
                 count: bool = False) -> None:
        self.thresholds = dict(thresholds)
        self.weight_aware = weight_aware
        self.count = count
        self._norms: dict[str, torch.Tensor] = {}
        self.zeroed: dict[str, int] = defaultdict(int)
        self.seen: dict[str, int] = defaultdict(int)

    def score(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = x.abs()
        if self.weight_aware:
            n = self._norms.get(name)
            if n is None:
                n = self._norms[name] = column_norms(w)
            s = s * n
        return s

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.thresholds.get(name)
        if t is None:
            return dense_projector(name, x, w)
        # NOT(score <= t) rather than score > t: a NaN input is kept, so it propagates as it
        # would in a dense product instead of vanishing (the kernels share this policy).
        keep = ~(self.score(name, x, w) <= t)
        if self.count:
            self.zeroed[name] += int(keep.numel() - keep.sum())
            self.seen[name] += keep.numel()
        return dense_projector(name, x * keep, w)

    def realized(self) -> dict[str, float]:
        """Fraction of input entries zeroed so far, per tensor."""
        return {k: self.zeroed[k] / self.seen[k] for k in self.seen if self.seen[k]}

    def reset_counts(self) -> None:
        self.zeroed.clear()
        self.seen.clear()


def apply_table(model: Model, loaded, table_path: str, sparsity: float,
                method: str = "uniform") -> MaskingProjector:
    """Load a table, check it fits the model, and install its thresholds at ``sparsity``."""
    from .table import ThresholdTable

    table = ThresholdTable.load(table_path)
    table.check(loaded)
    proj = MaskingProjector(table.thresholds_at(sparsity, method),
                            weight_aware=table.criterion == "weight-aware")
    model.projector = proj
    return proj
