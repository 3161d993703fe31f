"""Profiling: histograms, quantile thresholds, realized sparsity, determinism, bounded memory,
and the ``profile`` command. Most tests use a tiny synthetic GGUF and a few hundred tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify import cli, corpus
from sparsify import profile as prof
from sparsify.errors import SparsifyError
from sparsify.loader import load
from sparsify.synthetic import preset, write_synthetic_gguf
from sparsify.table import ThresholdTable

# Realized sparsity must match the requested level within half a point (the bound).
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", preset("tiny"))


@pytest.fixture(scope="module")
def tables(tiny):
    """Tables of the tiny model for both criteria, 512 calibration tokens."""
    return {c: prof.make_table(str(tiny), tokens=512, seq_len=64, criterion=c, progress=False)
            for c in ("magnitude", "weight-aware")}


def test_histogram_counts_magnitude_bins_like_numpy(rng):
    scale = 10.0 ** rng.integers(-30, 30, size=(37, 59))
    x = (rng.standard_normal((37, 59)) * scale).astype(np.float32)
    x[0, :5] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    x[1, :2] = [1e-42, -1e-45]  # subnormals
    got = prof.histogram(torch.from_numpy(x)).numpy()
    want = np.bincount(((x.view(np.uint32) & 0x7FFFFFFF) >> prof.SHIFT).ravel(),
                       minlength=prof.NBINS)
    assert np.array_equal(got, want)
    with pytest.raises(TypeError):
        prof.histogram(torch.zeros(3, dtype=torch.float64))


def test_bin_edges_bracket_their_values(rng):
    lo, hi = prof.bin_edges()
    v = np.abs(rng.standard_normal(1000).astype(np.float32)) * np.float32(1e3)
    b = (v.view(np.uint32) >> prof.SHIFT).astype(np.int64)
    assert (lo[b] <= v).all() and (v < hi[b]).all()
    # 2**(23 - SHIFT) bins per octave: each bin is 0.27% wide.
    assert hi[b].max() / lo[b].max() - 1 < 2.0 ** (prof.SHIFT - 23) * 1.0001


@pytest.mark.parametrize("dist", ["lognormal", "halfnormal_with_zeros"])
def test_quantile_thresholds_zero_the_requested_fraction(dist, rng):
    n = 200_000
    if dist == "lognormal":
        s = rng.lognormal(-2.0, 1.5, n).astype(np.float32)
    else:
        s = np.abs(rng.standard_normal(n)).astype(np.float32)
        s[: n // 50] = 0.0  # 2% exact zeros: level 0 already zeroes them
    levels = [round(0.01 * i, 2) for i in range(100)]
    ts = prof.quantile_thresholds(prof.histogram(torch.from_numpy(s)).numpy(), levels)
    assert ts[0] == 0.0 and ts == sorted(ts)
    assert all(np.float32(t) == t for t in ts)  # exactly representable as float32
    realized = np.array([(s <= np.float32(t)).mean() for t in ts])
    floor = 0.02 if dist != "lognormal" else 0.0
    want = np.maximum(np.array(levels), floor)
    # Interpolating inside one 0.27%-wide bin misplaces at most part of that bin's mass;
    # a point is already generous, the issue asks for half of one.
    assert np.abs(realized - want)[1:].max() < 0.001


def test_quantile_thresholds_edge_cases():
    counts = np.zeros(prof.NBINS, dtype=np.int64)
    with pytest.raises(ValueError, match="empty"):
        prof.quantile_thresholds(counts, [0.0, 0.5])
    counts[0] = 10  # only zeros
    assert prof.quantile_thresholds(counts, [0.0, 0.5, 0.9]) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="ascending"):
        prof.quantile_thresholds(counts, [0.5, 0.2])


@pytest.mark.parametrize("criterion", ["magnitude", "weight-aware"])
def test_realized_sparsity_matches_levels(criterion, tables, tiny):
    """On the calibration text, each tensor's mask zeroes the requested fraction of inputs."""
    t = tables[criterion]
    loaded = load(tiny)
    seqs = corpus.sequences(loaded.tokenizer, corpus.calibration_text(), 64, 8, seed=0)
    model = loaded.model()
    for level in (0.05, 0.5, 0.95):
        got = prof.realized_sparsity(model, seqs, t.thresholds_at(level),
                                     criterion == "weight-aware", masked=False)
        assert set(got) == set(t.thresholds)
        worst = max(got, key=lambda n: abs(got[n] - level))
        assert abs(got[worst] - level) <= TOLERANCE, (worst, got[worst], level)
        # Under full masking, the first block's attention input is still unmasked upstream.
        masked = prof.realized_sparsity(model, seqs, t.thresholds_at(level),
                                         criterion == "weight-aware", masked=True)
        assert abs(masked["blk.0.attn_q"] - level) <= TOLERANCE


def test_criteria_differ_where_they_should(tables):
    mag, wa = tables["magnitude"].thresholds, tables["weight-aware"].thresholds
    # One distribution per input for magnitude: q, k and v share thresholds ...
    assert mag["blk.1.attn_q"] == mag["blk.1.attn_k"] == mag["blk.1.attn_v"]
    assert mag["blk.1.ffn_gate"] == mag["blk.1.ffn_up"]
    # ... the weight-aware score folds in each tensor's own column norms.
    assert wa["blk.1.attn_q"] != wa["blk.1.attn_k"]


def test_same_inputs_give_byte_identical_tables(tables, tiny):
    again = prof.make_table(str(tiny), tokens=512, seq_len=64, progress=False)
    assert again.to_json() == tables["magnitude"].to_json()
    other_seed = prof.make_table(str(tiny), tokens=512, seq_len=64, seed=1, progress=False)
    assert other_seed.thresholds != tables["magnitude"].thresholds
    assert tables["magnitude"].provenance["tokens"] == 512


def test_profile_holds_one_block_of_weights_at_a_time(tiny, monkeypatch):
    loaded = load(tiny)
    model = loaded.model(streaming=True)
    seen = []
    block = model.block

    def spy(i, h, pos, cache=None):
        seen.append({k.split(".")[1] for k in model.w._cache if k.startswith("blk.")})
        return block(i, h, pos, cache)

    monkeypatch.setattr(model, "block", spy)
    seqs = corpus.sequences(loaded.tokenizer, corpus.calibration_text(), 32, 4)
    prof.profile_thresholds(model, seqs, "magnitude", [0.0, 0.5], progress=False)
    assert seen and all(len(s) <= 1 for s in seen)
    assert not any(k.startswith("blk.") for k in model.w._cache)
    assert model.projector is not None and not isinstance(model.projector,
                                                          prof.HistogramProjector)


def test_profile_command_writes_once_and_ctrl_c_leaves_nothing(tiny, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["profile", str(tiny), "--tokens", "256", "--seq-len", "64"]
    cli.main(argv)
    out = tmp_path / "tiny.magnitude.thresholds.json"
    table = ThresholdTable.load(out)
    table.check(load(tiny))
    assert "wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prof, "profile_thresholds", interrupted)
    with pytest.raises(SystemExit):
        cli.main([*argv, "-o", "other.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert "interrupted" in capsys.readouterr().err


def test_too_little_text_is_one_line_error(tiny, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words\n")
    with pytest.raises(SparsifyError, match="too short for --tokens 512"):
        prof.make_table(str(tiny), corpus_path=str(small), tokens=512, seq_len=64,
                        progress=False)


def test_smollm2_small_profile_realizes_its_levels(loaded, torch_model):
    """A real model, 512 tokens: thresholds fit the model and zero the requested fraction."""
    m = loaded("smollm2-135m")
    t = prof.make_table("smollm2-135m", tokens=512, seq_len=256, progress=False, loaded=m)
    t.check(m)
    seqs = corpus.sequences(m.tokenizer, corpus.calibration_text(), 256, 2, seed=0)
    model = torch_model("smollm2-135m")
    for level in (0.7,):
        got = prof.realized_sparsity(model, seqs, t.thresholds_at(level), False, masked=False)
        worst = max(got, key=lambda n: abs(got[n] - level))
        assert abs(got[worst] - level) <= TOLERANCE, (worst, got[worst], level)


def test_count_at_or_below_is_exact(rng):
    x = rng.standard_normal(5000).astype(np.float32)
    t = np.sort(np.abs(rng.standard_normal(7)).astype(np.float32))
    x[:7] = t  # entries exactly at a threshold count as zeroed
    x[7:9] = [np.nan, -np.inf]
    x[9:20] = 0.0
    t = np.concatenate([[0.0], t, t[-1:]]).astype(np.float32)  # level 0 and a repeated value
    got = prof.count_at_or_below(torch.from_numpy(x), t)
    want = np.array([(np.abs(x) <= v).sum() for v in t])
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="ascending"):
        prof.count_at_or_below(torch.from_numpy(x), t[::-1].copy())


def test_realized_by_level_agrees_with_masking_projector(tables, tiny):
    t = tables["weight-aware"]
    loaded = load(tiny)
    seqs = corpus.sequences(loaded.tokenizer, corpus.calibration_text(), 64, 4, seed=3)
    model = loaded.model()
    every = prof.realized_by_level(model, seqs, t)
    j = t.levels.index(0.3)
    one = prof.realized_sparsity(model, seqs, t.thresholds_at(0.3), True, masked=False)
    assert {n: v[j] for n, v in every.items()} == one


def test_synthetic_files_do_not_depend_on_thread_count(tmp_path, monkeypatch):
    import sparsify.synthetic as syn

    monkeypatch.setattr(syn, "CHUNK", 1000)  # several chunks per tensor, generated in parallel
    spec = preset("tiny", dtype="f16")
    a = write_synthetic_gguf(tmp_path / "a.gguf", spec, threads=1)
    b = write_synthetic_gguf(tmp_path / "b.gguf", spec, threads=3)
    assert a.read_bytes() == b.read_bytes()
    c = write_synthetic_gguf(tmp_path / "c.gguf", preset("tiny", dtype="f16", seed=7))
    assert c.read_bytes() != a.read_bytes()


def test_synthetic_values_and_metadata(tiny):
    g = load(tiny).gguf
    assert g.metadata["general.name"].startswith("synthetic")
    w = g.dequantize("blk.1.ffn_down.weight")  # (48, 200): fan-in 200
    bound = np.sqrt(3.0 / 200)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert abs(float(w.std()) - bound / np.sqrt(3.0)) < 0.1 * bound  # uniform: std = a / sqrt 3
    assert (g.dequantize("blk.0.attn_norm.weight") == 1.0).all()
    assert load(tiny).tokenizer.decode(load(tiny).tokenizer.encode("héllo\n")) == "héllo\n"


def test_llama3_8b_preset_has_the_real_parameter_count():
    spec = preset("llama3-8b")
    assert spec.n_params() == 8_030_261_248  # Meta-Llama-3-8B
    assert spec.dtype == "f16" and spec.head_dim == 128
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        preset("llama3-8b", n_head_kv=5)
