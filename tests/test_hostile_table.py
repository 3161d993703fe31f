"""The hostile table corpus (``tests/hostile.py``): every broken table is refused by
``ThresholdTable.load`` or by ``check`` against the model, in one printable line naming the
file; huge files are refused by size, never parsed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hostile import TABLE_CAP_PROBE, make_table_bases, observe_table, summary, table_cases

from sparsify import table as table_mod
from sparsify.errors import SparsifyError
from sparsify.table import MAX_TABLE_BYTES, ThresholdTable

CASES = table_cases()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-table")
    tb, loaded = make_table_bases(root, np.random.default_rng(3))
    return tb, loaded


def test_corpus_covers_the_issue():
    groups = summary(CASES)
    assert len(CASES) >= 40
    for g in ("truncation", "not JSON", "wrong type", "schema", "fingerprint", "tensors",
              "thresholds", "levels", "allocations", "JSON", "size"):
        assert groups.get(g, 0) >= 1, g
    assert {c.stage for c in CASES} == {"load", "check", "ok"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_table_case(case, bases, tmp_path):
    tb, loaded = bases
    path = tmp_path / "t.json"
    path.write_bytes(case.make(tb.text, tb.parsed, tb.others))
    stage, msg = observe_table(path, loaded)
    assert stage == case.stage, msg
    if stage != "ok":
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        # Names from the file are escaped: no terminal control reaches the message.
        assert msg.isprintable(), msg
        assert re.search(case.match, msg), msg


def test_oversize_table_is_refused_unparsed(bases, tmp_path, monkeypatch):
    """The 50 MB table is refused by its size: the JSON parser never sees it."""
    assert TABLE_CAP_PROBE > MAX_TABLE_BYTES
    tb, _ = bases
    big = next(c for c in CASES if c.id == "huge-50MB")
    path = tmp_path / "big.json"
    path.write_bytes(big.make(tb.text, tb.parsed, tb.others))

    def no_parse(*a, **k):
        raise AssertionError("an oversize table reached the JSON parser")

    monkeypatch.setattr(table_mod.json, "loads", no_parse)
    with pytest.raises(SparsifyError, match=rf"larger than {MAX_TABLE_BYTES >> 20} MiB"):
        ThresholdTable.load(path)
    # A device that never ends is read only up to the cap.
    with pytest.raises(SparsifyError, match="larger than"):
        ThresholdTable.load("/dev/zero")


def test_valid_controls_round_trip(bases, tmp_path):
    """The controls are real tables: what loads also saves to the same bytes."""
    tb, loaded = bases
    path = tmp_path / "t.json"
    path.write_text(tb.text)
    t = ThresholdTable.load(path)
    t.check(loaded)
    assert t.to_json() == tb.text
