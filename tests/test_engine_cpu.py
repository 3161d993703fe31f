"""The CPU decode engine against the torch model definition, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.engine_cpu import CPUEngine
from sparsify.generate import generate
from sparsify.sparse import MaskingProjector

MODELS = ("smollm2-135m", "gemma3-270m")
PROMPT = "The history of the bicycle"


def _quantile_thresholds(model, ids: list[int], level: float) -> dict[str, float]:
    """Per-tensor |x| quantiles over one forward of ``ids`` (a stand-in for a profiled table)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, x, w):
        seen.setdefault(name, []).append(x.detach().abs().reshape(-1))
        return x @ w.T

    old = model.projector
    model.projector = record
    try:
        with torch.inference_mode():
            model.forward(torch.tensor([ids]))
    finally:
        model.projector = old
    return {k: float(torch.quantile(torch.cat(v), level)) for k, v in seen.items()}


@pytest.fixture(scope="module")
def engines(loaded):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = CPUEngine(loaded(name).model(), fmt="fp32", max_len=128)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_dense_logits_match_torch(name, loaded, torch_model, engines):
    ids = loaded(name).tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref = torch_model(name).forward(torch.tensor([ids]))[0].numpy()
    eng = engines(name)
    eng.set_thresholds(None)
    eng.reset()
    got = np.stack([eng.step(t).copy() for t in ids])
    # Float32 in both, different summation orders over K <= 2048 terms per output.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max() * 10)


@pytest.mark.parametrize("name", MODELS)
def test_sparse_greedy_tokens_match_masked_torch(name, loaded, torch_model, engines):
    model = torch_model(name)
    ids = loaded(name).tokenizer.encode(PROMPT)
    thresholds = _quantile_thresholds(model, ids, 0.5)
    old = model.projector
    model.projector = MaskingProjector(thresholds)
    try:
        want = list(generate(model, ids, 64))
    finally:
        model.projector = old
    eng = engines(name)
    eng.set_thresholds(thresholds)
    got = eng.generate(ids, 64)
    assert got == want
    # About half the block weight bytes were skipped at level 0.5.
    assert eng.rows_read < 0.8 * sum(p.k for p in eng.projs.values()) * eng.pos
