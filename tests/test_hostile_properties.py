"""Property tests over the two parsers of user files: random mutations of a valid GGUF file and
of a valid threshold table give either a clean result or a one-line SparsifyError, never any
other exception.

The GGUF mutations aim at the header: overwriting its numeric fields (counts, lengths, type
ids, dims, offsets; known from the writer) with boundary values, flipping, inserting and
deleting bytes, truncating. A file that still opens is loaded, tokenized and dequantized. The
table mutations edit its text or replace one node of its JSON tree with an arbitrary JSON
value; a table that still loads is checked against its model and looked up.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hostile import make_bases, make_table_bases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.gguf_file import GGUFFile
from sparsify.loader import load
from sparsify.table import REQUIRED_LEVELS, ThresholdTable, describe

EXAMPLES = 2000
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop-gguf")
    g = make_bases(root, real=None).mini
    data, fields = g.encode()
    header_end = len(data) - len(g.data)
    by_kind: dict[str, list] = {}
    for f in fields:
        if f[2] != "padding":
            by_kind.setdefault(f[2], []).append(f)
    # Fields grouped by what they hold (string lengths, dims, type ids, scalar values, ...),
    # so the 300 string lengths of the vocabulary do not drown the 12 tensor type ids.
    return {"data": data, "fields": [f for fs in by_kind.values() for f in fs],
            "by_kind": [by_kind[k] for k in sorted(by_kind)], "header_end": header_end,
            "path": root / "mutant.gguf"}


def _boundaries(size: int) -> st.SearchStrategy[int]:
    """Values that break size arithmetic, for a field of ``size`` bytes."""
    top = (1 << (8 * size)) - 1
    picks = [0, 1, 2, 3, 4, 7, 8, 9, 31, 32, 33, 255, 256, 1 << 15, 1 << 16, 1 << 31,
             (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, 1 << 63, (1 << 63) - 1, top]
    return st.one_of(st.sampled_from([v & top for v in picks]), st.integers(0, top),
                     st.integers(0, 64))


@st.composite
def gguf_mutations(draw, base) -> bytes:
    data = bytearray(base["data"])
    end = base["header_end"]
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        # Field edits first among equals: they keep the layout, so mutants get past the
        # header parser into the loader, tokenizer and dequantizer.
        kind = draw(st.sampled_from(["field"] * 4 + ["byte", "insert", "delete", "cut"]))
        if kind == "field":
            off, size, _ = draw(st.sampled_from(draw(st.sampled_from(base["by_kind"]))))
            if off + size <= len(data):
                data[off:off + size] = draw(_boundaries(size)).to_bytes(size, "little")
        elif kind == "byte" and data:
            i = draw(st.integers(0, min(end, len(data)) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            i = draw(st.integers(0, min(end, len(data))))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            i = draw(st.integers(0, min(end, len(data))))
            del data[i:i + draw(st.integers(1, 64))]
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def _one_line(e: SparsifyError, path) -> None:
    msg = str(e)
    assert "\n" not in msg and msg.startswith(str(path)), msg


def test_gguf_reader_never_crashes(gguf_base):
    path = gguf_base["path"]
    calls = []

    @SETTINGS
    @given(gguf_mutations(gguf_base))
    def check(data: bytes) -> None:
        calls.append("open")
        path.write_bytes(data)
        try:
            g = GGUFFile.open(path)
        except SparsifyError as e:
            _one_line(e, path)
            return
        g.close()
        calls[-1] = "load"
        try:
            loaded = load(path)
        except SparsifyError as e:
            _one_line(e, path)
            return
        calls[-1] = "tokenizer or weights"
        try:
            loaded.tokenizer.encode("hello world")
            for name in loaded.gguf.tensors:
                loaded.gguf.dequantize(name)
            calls[-1] = "clean"
        except SparsifyError as e:
            _one_line(e, path)
        finally:
            loaded.gguf.close()

    check()
    # Where the mutants stopped: every stage must be reached, or the strategy is too blunt.
    stops = {k: calls.count(k) for k in ("open", "load", "tokenizer or weights", "clean")}
    print(f"hypothesis stops: {json.dumps(stops)}")
    assert all(stops.values()), stops
    _report(calls)


def _report(calls: list) -> None:
    print(f"hypothesis examples: {len(calls)}")  # read by scripts/hostile_report.py
    assert len(calls) >= EXAMPLES


# ---- tables -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop-table")
    # The coarsest grid a table may have (20 levels): mutations then hit structure as often
    # as numbers, and each example validates 140 thresholds instead of 700.
    tb, loaded = make_table_bases(root, np.random.default_rng(4), REQUIRED_LEVELS)
    paths = list(_paths(tb.parsed))
    return {"text": tb.text, "parsed": tb.parsed, "paths": paths, "loaded": loaded,
            "path": root / "mutant.json"}


def _paths(node, prefix=()):
    """Every path (tuple of keys and indices) to a node of a JSON tree, the root included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for k, v in items:
        yield from _paths(v, (*prefix, k))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10 ** 400), 10 ** 400),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
              st.sampled_from(["blk.0.attn_q", "magnitude", "0.50", "F32", "\ud800", "\x1b["])),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)


def _load_and_use(path, loaded) -> None:
    try:
        t = ThresholdTable.load(path)
        t.check(loaded)
        t.thresholds_at(0.5)
        describe(t, 0.5)
    except SparsifyError as e:
        _one_line(e, path)
        assert str(e).isprintable() or "\ud800" not in str(e), str(e)


def test_table_reader_never_crashes_on_edited_text(table_base):
    path, text, loaded = table_base["path"], table_base["text"], table_base["loaded"]
    calls = []

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "cut"]),
                              st.integers(0, len(text)), st.text(max_size=8)),
                    min_size=1, max_size=3))
    def check(edits) -> None:
        calls.append(1)
        s = text
        for kind, i, piece in edits:
            i = min(i, len(s))
            if kind == "set":
                s = s[:i] + piece + s[i + len(piece):]
            elif kind == "insert":
                s = s[:i] + piece + s[i:]
            elif kind == "delete":
                s = s[:i] + s[i + 1 + len(piece):]
            else:
                s = s[:i]
        path.write_bytes(s.encode("utf-8", "surrogatepass"))
        _load_and_use(path, loaded)

    check()
    _report(calls)


def test_table_reader_never_crashes_on_edited_tree(table_base):
    path, parsed, loaded = table_base["path"], table_base["parsed"], table_base["loaded"]
    calls = []

    @SETTINGS
    @given(st.sampled_from(table_base["paths"]), json_values)
    def check(where, value) -> None:
        calls.append(1)
        d = copy.deepcopy(parsed)
        if not where:
            d = value
        else:
            node = d
            for k in where[:-1]:
                node = node[k]
            node[where[-1]] = value
        try:
            text = json.dumps(d)  # NaN and Infinity as the literals Python reads back
        except (ValueError, OverflowError):
            return
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _load_and_use(path, loaded)

    check()
    _report(calls)


def test_mutation_strategies_reach_past_the_header(gguf_base, table_base):
    """The strategies are not all refusals at the first byte: a share of GGUF mutants opens
    and some table mutants load (checked on a fixed sample, so this cannot flake)."""
    rng = np.random.default_rng(5)
    data, fields = gguf_base["data"], gguf_base["fields"]
    opened = 0
    for _ in range(200):
        off, size, _ = fields[rng.integers(len(fields))]
        mutant = bytearray(data)
        mutant[off:off + size] = int(rng.integers(0, 256)).to_bytes(size, "little")
        gguf_base["path"].write_bytes(bytes(mutant))
        try:
            GGUFFile.open(gguf_base["path"]).close()
            opened += 1
        except SparsifyError:
            pass
    assert 10 <= opened <= 190, opened
    loaded = 0
    for path in rng.permutation(len(table_base["paths"]))[:200]:
        where = table_base["paths"][path]
        if not where:
            continue
        d = copy.deepcopy(table_base["parsed"])
        node = d
        for k in where[:-1]:
            node = node[k]
        old = node[where[-1]]
        node[where[-1]] = old * 1.0001 if isinstance(old, float) and math.isfinite(old) else old
        table_base["path"].write_text(json.dumps(d))
        try:
            ThresholdTable.load(table_base["path"])
            loaded += 1
        except SparsifyError:
            pass
    assert loaded >= 50, loaded
