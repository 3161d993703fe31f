"""The hostile GGUF corpus (``tests/hostile.py``): every broken file is refused at the stage
where its problem shows, with one line that names the file and the problem; the controls load;
and no file makes the reader allocate more than its own size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hostile import (
    gguf_cases,
    make_bases,
    observe,
    peak_memory_of_info,
    summary,
    write_amplifier,
)

CASES = gguf_cases()
STAGES = ("open", "load", "tokenizer", "weights", "ok")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, model_path):
    """(directory, bases): case files are written there on first use."""
    root = tmp_path_factory.mktemp("hostile-gguf")
    return root, make_bases(root / "bases", model_path("smollm2-135m"))


def case_file(corpus, case) -> Path:
    root, bases = corpus
    if case.base == "real" and bases.real is None:
        pytest.skip("the bundled SmolLM2-135M is not available")
    path = root / f"{case.id}.gguf"
    if not path.exists():
        case.write(bases, path)
    return path


def test_corpus_covers_the_issue():
    groups = summary(CASES)
    assert len(CASES) >= 60
    for g in ("truncation", "magic/version", "counts", "duplicates", "offsets", "types", "keys",
              "tensors", "non-finite", "real model"):
        assert groups.get(g, 0) >= 2, g
    assert {c.stage for c in CASES} == set(STAGES)
    assert sum(c.bomb for c in CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gguf_case(case, corpus):
    path = case_file(corpus, case)
    # The real model's controls are zeros at full size: loading proves the header; a forward
    # pass over 135M zero weights would prove nothing more.
    stage, msg = observe(path, forward=case.base != "real")
    assert stage == case.stage, msg
    if stage != "ok":
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        assert re.search(case.match, msg), msg


def test_bombs_allocate_nothing(corpus, tmp_path):
    """Under a 1.5 GiB address-space limit, ``info`` refuses every bomb (a small file claiming
    2**62 entries, a 2**63-byte string, ...) without its peak memory growing."""
    root, bases = corpus
    bombs = [case_file(corpus, c) for c in CASES if c.bomb]
    amp = write_amplifier(bases, tmp_path / "strings.gguf", 1_000_000)
    res = peak_memory_of_info(root / "bases" / "base-mini.gguf", [*bombs, amp])
    assert res["warm"] == 0
    *bomb_runs, amp_run = res["runs"]
    assert [code for _, code, _ in bomb_runs] == [1] * len(bombs)
    # Peak RSS is a high-water mark: the last bomb's reading covers them all. 16 MiB is room
    # for the interpreter's own noise; a bomb that allocated would show gigabytes (or die).
    grown = bomb_runs[-1][2] - res["base"]
    assert grown < 16 << 20, f"bombs grew the peak by {grown >> 20} MiB"
    # A valid 10 MB header of a million short strings costs what it holds: a str object and a
    # list slot per 10-byte entry plus the mapped file pages, measured 7.3x its size; 10x
    # leaves room for allocator noise, and anything count-driven would be far beyond it.
    size = amp.stat().st_size
    assert amp_run[1] == 0
    assert amp_run[2] - res["base"] < 10 * size, (amp_run[2] - res["base"]) / size
