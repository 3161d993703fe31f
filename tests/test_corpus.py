"""The built-in corpus (deterministic, split without overlap) and text -> token sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparsify import corpus
from sparsify.errors import SparsifyError


class ByteTokenizer:
    """One token per UTF-8 byte, ids offset by 2; id 0 is BOS. Enough to test windowing."""

    def __init__(self, add_bos: bool) -> None:
        self.add_bos = add_bos
        self.bos_id = 0

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None):
        bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] * bos + [b + 2 for b in text.encode()]


def test_parts_never_overlap_and_cover_every_document():
    docs = corpus.documents()
    assert len(docs) == len(set(docs)) > 1000
    held = [d for d in docs if corpus.is_heldout(d)]
    cal = [d for d in docs if not corpus.is_heldout(d)]
    assert set(held).isdisjoint(cal)
    assert len(held) + len(cal) == len(docs)
    # The hash split sends about one document in HELDOUT_MODULUS to the held-out part.
    assert 0.12 < len(held) / len(docs) < 0.28
    assert corpus.calibration_text() == corpus.SEPARATOR.join(cal)
    assert corpus.heldout_text() == corpus.SEPARATOR.join(held)


def test_corpus_is_the_same_in_a_fresh_process_with_another_hash_seed():
    """Hash randomization (set and dict order) does not change the text."""
    code = ("from sparsify import corpus; import json; "
            "print(json.dumps([corpus.calibration().sha256, "
            "corpus.heldout().sha256, corpus.calibration().identity]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd="/")
    assert json.loads(out.stdout) == [corpus.calibration().sha256, corpus.heldout().sha256,
                                      corpus.calibration().identity]


def test_identity_names_part_and_python_version():
    import platform

    assert corpus.calibration().identity.endswith(":calibration")
    assert corpus.heldout().identity.endswith(":heldout")
    assert platform.python_version() in corpus.calibration().identity


@pytest.mark.parametrize("add_bos", [False, True])
def test_sequences_are_consecutive_windows_of_the_stream(add_bos, rng):
    text = "".join(rng.choice(list("abc de\n"), size=997))
    tok = ByteTokenizer(add_bos)
    seq_len = 37
    seqs = corpus.sequences(tok, text, seq_len)
    width = seq_len - add_bos
    assert seqs.dtype == np.int64 and seqs.flags.c_contiguous
    assert seqs.shape == (len(text) // width, seq_len)
    if add_bos:
        assert (seqs[:, 0] == tok.bos_id).all()
    body = seqs[:, int(add_bos):].reshape(-1)
    assert body.tolist() == tok.encode(text, add_bos=False)[: body.size]


def test_seed_draws_distinct_windows_in_text_order(rng):
    text = "".join(rng.choice(list("xyz \n"), size=3000))
    tok = ByteTokenizer(False)
    every = corpus.sequences(tok, text, 50)
    a = corpus.sequences(tok, text, 50, n_seq=10, seed=1)
    b = corpus.sequences(tok, text, 50, n_seq=10, seed=1)
    c = corpus.sequences(tok, text, 50, n_seq=10, seed=2)
    assert (a == b).all() and not (a == c).all()
    rows = [next(i for i in range(len(every)) if (every[i] == r).all()) for r in a]
    assert rows == sorted(set(rows))
    assert (corpus.sequences(tok, text, 50, n_seq=10) == every[:10]).all()


def test_too_short_text_is_refused():
    with pytest.raises(SparsifyError, match="3 sequences of 10, 4 wanted"):
        corpus.sequences(ByteTokenizer(False), "x" * 35, 10, n_seq=4)
    with pytest.raises(SparsifyError):
        corpus.sequences(ByteTokenizer(True), "abc", 10)


def test_corpus_file_must_be_utf8_and_not_empty(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo wörld\n")
    c = corpus.from_file(good)
    assert c.identity == "file:good.txt" and c.text == "héllo wörld\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    with pytest.raises(SparsifyError, match="not UTF-8"):
        corpus.from_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(SparsifyError, match="empty"):
        corpus.from_file(empty)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_heldout_part_is_large_enough_for_evaluation(name, loaded):
    tok = loaded(name).tokenizer
    n = len(tok.encode(corpus.heldout_text(), add_bos=False))
    assert n >= 16384, f"held-out part has only {n} tokens for {name}"
    seqs = corpus.sequences(tok, corpus.heldout_text(), 512, n_seq=32)
    assert seqs.shape == (32, 512)
    assert (seqs[:, 0] == tok.bos_id).all() == corpus.adds_bos(tok)
