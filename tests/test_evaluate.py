"""Sparse evaluation: perplexity, KL to dense, top-1 agreement and realized sparsity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsify.evaluate import (
    DenseRows,
    evaluate_levels,
    llama_perplexity_windows,
    projection_params,
    score_rows,
    second_half_nll,
    weighted_sparsity,
    write_json,
)
from sparsify.model import dense_projector, kl_div
from sparsify.oracle import llamacpp_available
from sparsify.sparse import MaskingProjector

# The tiny synthetic model runs on one torch thread (conftest.one_thread_for_tiny).
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic llama model (2 blocks, odd sizes) with float32 weights."""
    from sparsify.loader import load
    from sparsify.synthetic import preset, write_synthetic_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_synthetic_gguf(path, preset("tiny", seed=3))
    return load(path)


def _quantile_thresholds(model, ids: torch.Tensor, level: float) -> dict[str, float]:
    """Per tensor, the ``level`` quantile of |x| over the inputs ``ids`` produce."""
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
    return {k: float(torch.quantile(torch.cat(v), level)) for k, v in seen.items()}


def test_projection_params_match_the_file(tiny):
    params = projection_params(tiny.cfg)
    assert list(params) == tiny.cfg.projection_names
    for name, n in params.items():
        assert n == math.prod(tiny.gguf.tensors[name + ".weight"].shape)


def test_weighted_sparsity():
    w = {"a": 1, "b": 3}
    assert weighted_sparsity({"a": 1.0, "b": 0.0}, w) == pytest.approx(0.25)
    assert weighted_sparsity({"b": 0.5}, w) == pytest.approx(0.375)  # a missing: dense
    with pytest.raises(ValueError, match="positive"):
        weighted_sparsity({}, {"a": 0})


def test_score_rows_matches_float64(rng):
    rows, vocab = 70, 1031  # more rows than one reduction chunk, odd vocabulary
    p = torch.from_numpy(rng.normal(0, 3, (rows, vocab))).float()
    q = p + torch.from_numpy(rng.normal(0, 0.5, (rows, vocab))).float()
    tgt = torch.from_numpy(rng.integers(0, vocab, rows))
    nll, kl, agree = score_rows(DenseRows.from_logits(p), q, tgt)
    ref_kl = float(kl_div(p.double(), q.double()).sum())
    ref_nll = float(-torch.log_softmax(q.double(), -1)[torch.arange(rows), tgt].sum())
    # float32 products of logits of size ~10 with float64 sums: ~1e-5 nats per row at most.
    assert kl == pytest.approx(ref_kl, rel=1e-4, abs=rows * 1e-5)
    assert nll == pytest.approx(ref_nll, rel=1e-6)
    assert agree == int((p.argmax(-1) == q.argmax(-1)).sum())


def test_levels_against_direct_forward(tiny, rng):
    model = tiny.model()
    vocab = tiny.cfg.vocab_size
    seqs = torch.from_numpy(rng.integers(0, vocab, (3, 37)))
    th = _quantile_thresholds(model, seqs, 0.5)
    zero = dict.fromkeys(th, 0.0)
    everything = dict.fromkeys(th, float("inf"))
    res = evaluate_levels(model, seqs, [zero, th, everything], [0.0, 0.5, 1.0],
                          weight_aware=False)
    assert model.projector is dense_projector

    # Dense reference and the 0.5 level, computed directly from full forwards.
    with torch.inference_mode():
        dense = model.forward(seqs)[:, :-1].double()
        model.projector = MaskingProjector(th)
        sparse = model.forward(seqs)[:, :-1].double()
        model.projector = dense_projector
    tgt = seqs[:, 1:]

    def nll(logits):
        return float(-torch.log_softmax(logits, -1).gather(2, tgt[..., None]).mean())

    # Float32 forward, float64 reduction on both sides: agreement to float32 rounding.
    assert res.dense_nll == pytest.approx(nll(dense), rel=1e-5)
    zero_r, half, full = res.levels
    assert zero_r.perplexity == res.dense_perplexity
    assert zero_r.mean_kl == 0.0 and zero_r.top1_agreement == 1.0
    assert half.nll == pytest.approx(nll(sparse), rel=1e-5)
    assert half.mean_kl == pytest.approx(float(kl_div(dense, sparse).mean()), rel=1e-3, abs=1e-6)
    agree = float((dense.argmax(-1) == sparse.argmax(-1)).double().mean())
    assert half.top1_agreement == pytest.approx(agree)
    assert half.ppl_rise == pytest.approx(half.perplexity - res.dense_perplexity)
    # Quantile thresholds on this very text zero about half of every input (ties aside).
    assert all(0.4 < s < 0.6 for s in half.realized.values()), half.realized
    assert half.realized_model == pytest.approx(
        weighted_sparsity(half.realized, projection_params(tiny.cfg)))
    assert full.realized_model == 1.0
    assert all(s == 1.0 for s in full.realized.values())
    assert full.mean_kl > half.mean_kl > 0


def test_levels_reject_bad_input(tiny):
    model = tiny.model()
    with pytest.raises(ValueError, match="T >= 2"):
        evaluate_levels(model, torch.zeros((2, 1), dtype=torch.int64), [{}], [0.0], False)
    with pytest.raises(ValueError, match="one threshold dict"):
        evaluate_levels(model, torch.zeros((1, 4), dtype=torch.int64), [{}], [0.0, 0.1], False)


def test_write_json_is_atomic_and_refuses_overwrite(tmp_path):
    from sparsify.errors import SparsifyError

    out = tmp_path / "r.json"
    write_json(out, {"a": 1}, force=False)
    with pytest.raises(SparsifyError, match="--force"):
        write_json(out, {"a": 2}, force=False)
    write_json(out, {"a": 2}, force=True)
    assert out.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    with pytest.raises(SparsifyError, match="does not exist"):
        write_json(tmp_path / "missing" / "r.json", {}, force=False)


def test_weight_aware_levels_use_column_norms(tiny, rng):
    model = tiny.model()
    seqs = torch.from_numpy(rng.integers(0, tiny.cfg.vocab_size, (1, 23)))
    th = _quantile_thresholds(model, seqs, 0.3)
    res = evaluate_levels(model, seqs, [th, th], [0.3, 0.3], weight_aware=True)
    mag = evaluate_levels(model, seqs, [th], [0.3], weight_aware=False)
    # Same thresholds on |x|·‖W[:, i]‖ instead of |x|: a different mask, hence different counts.
    assert res.levels[0].realized != mag.levels[0].realized
    assert res.levels[0].realized == res.levels[1].realized
    assert np.isfinite(res.levels[0].perplexity)


def test_llama_perplexity_windows():
    ids = list(range(10, 31))  # 21 tokens
    assert llama_perplexity_windows(ids, 8, bos=1) == [[1, *range(11, 18)], [1, *range(19, 26)]]
    assert llama_perplexity_windows(ids, 8, bos=None, chunks=1) == [list(range(10, 18))]
    logits = np.zeros((8, 5))
    logits[4:7, 2] = math.log(3.0)  # p(token 2) = 3/7 at the scored positions
    nll, n = second_half_nll(logits, [0, 0, 0, 0, 0, 2, 2, 2])
    assert n == 3 and nll == pytest.approx(-3 * math.log(3 / 7))


@pytest.mark.oracle
@pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed")
def test_dense_perplexity_matches_llamacpp(loaded, torch_model):
    """Our dense perplexity on llama-perplexity's windows equals llama.cpp's within 2 %."""
    from pydoc_data.topics import topics

    from sparsify.oracle import _quiet_stderr, llamacpp_logits, open_llama

    m = loaded("smollm2-135m")
    model = torch_model("smollm2-135m")
    text = topics["for"] + "\n\n" + topics["while"] + "\n\n" + topics["with"]
    n_ctx = 128
    llm = open_llama(str(m.path), n_ctx=n_ctx)
    try:
        with _quiet_stderr():
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        wins = llama_perplexity_windows(ids, n_ctx, None, chunks=3)
        assert len(wins) == 3
        ours = theirs = 0.0
        for w in wins:
            with torch.inference_mode():
                ours += second_half_nll(model.forward(torch.tensor([w]))[0].numpy(), w)[0]
            theirs += second_half_nll(llamacpp_logits(llm, w), w)[0]
    finally:
        with _quiet_stderr():
            llm.close()
    count = 3 * (n_ctx - 1 - n_ctx // 2)
    # The project's bound for dense perplexity against llama.cpp (which quantizes activations
    # inside its products, so it is not bit-equal to a float32 forward).
    assert math.exp(ours / count) == pytest.approx(math.exp(theirs / count), rel=0.02)


def test_profile_allocate_eval_commands(tiny, tmp_path, capsys):
    """The three commands end to end on the tiny model: a table, its allocations, a record."""
    import json

    from sparsify import cli
    from sparsify.table import ThresholdTable

    model, table, rec = str(tiny.path), tmp_path / "t.json", tmp_path / "e.json"
    cli.main(["profile", model, "-o", str(table), "--tokens", "512", "--seq-len", "64"])
    cli.main(["allocate", model, str(table), "--force", "--tokens", "128"])
    t = ThresholdTable.load(table)
    assert sorted(t.allocations) == ["cross-layer", "greedy"]
    assert "0.50" in t.allocations["greedy"] and "0.25" in t.allocations["cross-layer"]
    capsys.readouterr()
    argv = ["eval", model, "--table", str(table), "--sparsity", "0,0.5", "--method",
            "cross-layer", "--tokens", "256", "--seq-len", "64", "--json", str(rec)]
    cli.main(argv)
    out = capsys.readouterr().out
    assert "cross-layer" in out and "dense" in out
    r = json.loads(rec.read_text())
    assert r["method"] == "cross-layer" and r["text"]["identity"].endswith(":heldout")
    assert [lv["target"] for lv in r["levels"]] == [0.0, 0.5]
    assert r["levels"][0]["mean_kl"] == 0.0
    # The allocation was made on calibration text; on held-out text it lands near its target.
    assert abs(r["levels"][1]["realized_model"] - 0.5) < 0.1
    assert r["sequences"] == 4 and r["machine"]["torch_threads"] >= 1
    with pytest.raises(SystemExit) as e:  # the record exists: refused without --force
        cli.main(argv)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err
    cli.main([*argv, "--force"])
    assert json.loads(rec.read_text())["levels"] == r["levels"]  # deterministic
