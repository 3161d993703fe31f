"""Threshold tables: round trip, deterministic bytes, atomic writes, refusal of bad files and of
tables made for other models, lookups, allocations, and the ``table`` commands."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from sparsify import cli
from sparsify.errors import SparsifyError
from sparsify.loader import load
from sparsify.synthetic import preset, write_synthetic_gguf
from sparsify.table import (
    DEFAULT_LEVELS,
    SCHEMA_VERSION,
    ThresholdTable,
    fingerprint,
    target_key,
    write_atomic,
)

SCHEMA = Path(__file__).resolve().parents[1] / "sparsify" / "schema" / \
    "threshold-table.schema.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", preset("tiny"))


def random_table(loaded, rng: np.random.Generator, criterion: str = "magnitude"
                 ) -> ThresholdTable:
    """A valid table for ``loaded`` with random non-decreasing float32 thresholds."""
    names = loaded.cfg.projection_names
    th = {}
    for n in names:
        steps = rng.exponential(0.05, size=len(DEFAULT_LEVELS)).astype(np.float32)
        steps[0] = 0.0
        th[n] = [float(str(v)) for v in np.cumsum(steps, dtype=np.float32)]
    prov = {"corpus": "file:test.txt", "corpus_sha256": "0" * 64, "tokens": 512,
            "seq_len": 64, "seed": 0, "sparsify_version": "0.1.0"}
    return ThresholdTable(SCHEMA_VERSION, fingerprint(loaded), prov, criterion,
                          list(DEFAULT_LEVELS), th, {})


def test_save_load_round_trip_is_byte_identical(tiny, rng, tmp_path):
    t = random_table(load(tiny), rng)
    p = tmp_path / "t.json"
    t.save(p)
    back = ThresholdTable.load(p)
    assert back == t
    assert back.source == str(p)
    assert back.to_json().encode() == p.read_bytes()
    # Every threshold reads back as the float32 it was written from.
    for name, ts in back.thresholds.items():
        assert np.array_equal(np.float32(ts), np.float32(t.thresholds[name]))
    assert back.names == load(tiny).cfg.projection_names


def test_save_refuses_to_overwrite_without_force(tiny, rng, tmp_path):
    t = random_table(load(tiny), rng)
    p = tmp_path / "t.json"
    p.write_text("keep me")
    with pytest.raises(SparsifyError, match="--force"):
        t.save(p)
    assert p.read_text() == "keep me"
    t.save(p, force=True)
    assert ThresholdTable.load(p) == t


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(SparsifyError, match="does not exist"):
        write_atomic(tmp_path / "nope" / "t.json", b"{}")


def _mutations():
    """(id, edit of the parsed JSON, expected message fragment)."""
    def drop_tensor(d):
        d["thresholds"].pop("blk.1.ffn_up")

    def nan(d):
        d["thresholds"]["blk.0.attn_q"][5] = float("nan")

    def negative(d):
        d["thresholds"]["blk.0.attn_k"][0] = -0.5

    def decreasing(d):
        ts = d["thresholds"]["blk.1.attn_v"]
        ts[40], ts[41] = ts[41], ts[40] - 1.0

    def version(d):
        d["schema_version"] = 2

    def levels(d):
        d["levels"][3], d["levels"][4] = d["levels"][4], d["levels"][3]

    def short(d):
        d["thresholds"]["blk.0.ffn_down"] = d["thresholds"]["blk.0.ffn_down"][:-1]

    def unknown_alloc(d):
        d["allocations"] = {"greedy": {"0.50": {"blk.9.attn_q": 0.5}}}

    def missing_key(d):
        d.pop("provenance")

    return [
        ("missing tensor", drop_tensor, "no thresholds for blk.1.ffn_up"),
        ("nan", nan, "not a number"),
        ("negative", negative, "non-negative"),
        ("decreasing", decreasing, "decreases at level 0.41"),
        ("version", version, "unsupported schema_version 2"),
        ("levels", levels, "not ascending"),
        ("short", short, "99 thresholds for 100 levels"),
        ("alloc", unknown_alloc, "unknown tensor blk.9.attn_q"),
        ("missing key", missing_key, "lacks 'provenance'"),
    ]


@pytest.mark.parametrize("edit,fragment", [m[1:] for m in _mutations()],
                         ids=[m[0] for m in _mutations()])
def test_hand_edited_table_is_refused_in_one_line(edit, fragment, tiny, rng, tmp_path):
    d = random_table(load(tiny), rng).to_dict()
    edit(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))  # json writes NaN as the (non-standard) literal NaN
    with pytest.raises(SparsifyError) as e:
        ThresholdTable.load(p)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and msg.startswith(str(p))


def test_truncated_file_is_refused(tiny, rng, tmp_path):
    p = tmp_path / "t.json"
    random_table(load(tiny), rng).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparsifyError, match="invalid JSON .*truncated"):
        ThresholdTable.load(p)


def test_table_for_other_model_is_refused(tiny, rng, tmp_path):
    t = random_table(load(tiny), rng)
    t.check(load(tiny))
    # Same shapes and types, other weights: only the data hash tells them apart.
    other = write_synthetic_gguf(tmp_path / "seed.gguf", preset("tiny", seed=1))
    with pytest.raises(SparsifyError, match="other weights .*sha256"):
        t.check(load(other))
    f16 = write_synthetic_gguf(tmp_path / "f16.gguf", preset("tiny", dtype="f16"))
    with pytest.raises(SparsifyError, match="made for F32, model file f16.gguf is F16"):
        t.check(load(f16))
    wide = write_synthetic_gguf(tmp_path / "wide.gguf", preset("tiny", d_ff=208))
    with pytest.raises(SparsifyError, match="made for d_ff 200, model file wide.gguf has 208"):
        t.check(load(wide))


def test_threshold_interpolates_between_levels(tiny, rng):
    t = random_table(load(tiny), rng)
    name = "blk.1.ffn_gate"
    ts = t.thresholds[name]
    assert t.threshold(name, 0.5) == ts[50]
    assert t.threshold(name, 0.505) == pytest.approx((ts[50] + ts[51]) / 2, rel=1e-12)
    assert t.threshold(name, 1.0) == math.inf
    with pytest.raises(SparsifyError, match="beyond the table's levels"):
        t.threshold(name, 0.995)
    with pytest.raises(SparsifyError, match="no tensor"):
        t.threshold("blk.7.attn_q", 0.5)
    assert t.thresholds_at(0.3) == {n: v[30] for n, v in t.thresholds.items()}


def test_allocations_round_trip_and_lookup(tiny, rng, tmp_path):
    t = random_table(load(tiny), rng)
    names = list(t.thresholds)
    alloc = {0.5: {n: float(lv) for n, lv in zip(names, rng.uniform(0.2, 0.8, len(names)))}}
    t2 = t.with_allocations("greedy", alloc)
    assert t.allocations == {}  # the original is untouched
    got = t2.thresholds_at(0.5, "greedy")
    assert got == {n: t.threshold(n, lv) for n, lv in alloc[0.5].items()}
    p = tmp_path / "a.json"
    t2.save(p)
    assert ThresholdTable.load(p).allocations == {"greedy": {"0.50": alloc[0.5]}}
    with pytest.raises(SparsifyError, match="no 'cross-layer' allocation"):
        t2.thresholds_at(0.5, "cross-layer")
    with pytest.raises(SparsifyError, match="for sparsity 0.4"):
        t2.thresholds_at(0.4, "greedy")
    with pytest.raises(ValueError, match="unknown tensor"):
        t.with_allocations("greedy", {0.5: {"blk.5.attn_q": 0.5}})
    assert target_key(0.5) == "0.50"


def test_schema_file_describes_the_written_keys(tiny, rng):
    schema = json.loads(SCHEMA.read_text())
    d = random_table(load(tiny), rng).to_dict()
    assert set(schema["required"]) == set(d)
    assert set(schema["properties"]["fingerprint"]["required"]) == set(d["fingerprint"])
    assert set(schema["properties"]["provenance"]["required"]) == set(d["provenance"])
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(d, schema)


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_commands(tiny, rng, tmp_path, capsys):
    p = tmp_path / "t.json"
    random_table(load(tiny), rng).save(p)
    code, out, _ = _cli(["table", "show", str(p), "--sparsity", "0.4"], capsys)
    assert code == 0
    assert "thresholds at sparsity 0.40 (14 tensors)" in out and "ffn_down" in out
    png = tmp_path / "t.png"
    code, _, _ = _cli(["table", "show", str(p), "--plot", str(png)], capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _cli(["table", "show", str(p), "--plot", str(png)], capsys)
    assert code == 1 and "--force" in err
    code, out, _ = _cli(["table", "check", str(p), str(tiny)], capsys)
    assert code == 0 and out.startswith("ok:")
    other = write_synthetic_gguf(tmp_path / "other.gguf", preset("tiny", n_layer=3))
    code, out, err = _cli(["table", "check", str(p), str(other)], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "n_layer 2" in err


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_committed_tables_fit_the_bundled_models(name, loaded):
    path = Path(__file__).resolve().parents[1] / "thresholds" / f"{name}.magnitude.json"
    if not path.exists():
        pytest.skip(f"{path} not made yet")
    t = ThresholdTable.load(path)
    t.check(loaded(name))
    assert t.criterion == "magnitude" and len(t.thresholds) == 7 * loaded(name).cfg.n_layer
