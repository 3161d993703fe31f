"""The GGUF tokenizer: reference ids, llama.cpp as oracle, round trips, streaming decode.

The oracle tests run llama.cpp's own tokenizer (llama-cpp-python, ``vocab_only``) on the bundled
files and on small GGUF files written here (the bundled vocabularies with another pre-tokenizer
or flag, and a made-up SentencePiece vocabulary for the cases the module docstring lists).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify import tokenizer as tk
from sparsify.tokenizer import Tokenizer

MODELS = ("smollm2-135m", "gemma3-270m")

# The prompt of shared/reference/*.json and the ids llama.cpp gave for it (llama-cpp-python
# 0.3.36, add_special=True); copied here so the check runs without the shared folder.
REFERENCE_PROMPT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
                    "and Berlin is the capital of")
REFERENCE_IDS = {
    # tokenizer.ggml.add_bos_token is false for SmolLM2: no BOS even with add_special.
    "smollm2-135m": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 7042, 314, 260,
                     3575, 282, 4649, 28, 284, 11452, 314, 260, 3575, 282],
    "gemma3-270m": [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761, 9079, 563,
                    506, 5279, 529, 7001, 236764, 532, 15687, 563, 506, 5279, 529],
}

TEXTS = [
    "",
    " ",
    "  ",
    "Hello world",
    " Hello world",
    "  leading spaces and trailing   ",
    "The quick brown fox jumps over the lazy dog.",
    "It's a dog's life, isn't it? We'll see; they'd've known. I'M SURE YOU'RE RIGHT'S",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2, 3]}\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "1234567.89",
    "3,141",
    "0 00 000 0000 12345678901234567890",
    "π ≈ 3.14159, e ≈ 2.71828; ½ + ¼ = ¾; x² + y³; ①②③",
    "Café naïve résumé façade über straße ÆØÅ",
    "e\u0301 a\u0300 n\u0303 combining marks: Z\u0351\u0352\u0353",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🧌 𠀋",
    "مرحبا بالعالم — שלום עולם",
    "Ελληνικά και кириллица смешанные",
    "ไทย हिन्दी বাংলা தமிழ்",
    "\n",
    "\n\n",
    "line one\nline two\r\nline three\rline four",
    "\n" * 40 + " end",
    "a" + " " * 40 + "b",
    "tabs\t\t\tand\tspaces \t \t mixed",
    "\t\n \n\t\n  \n",
    "trailing newline\n",
    "<bos>",
    "<bos>Hello<eos>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<s> and </s> and <unk> and <pad>",
    "HTML: <table><tr><td>cell</td></tr></table> <b>bold</b> <h1>T</h1>",
    "<start_of_image> image here <end_of_image>",
    "[multimodal] <mask> <unused0>",
    "Ġ Ċ ▁ ▁▁ already-escaped markers",
    "<0x0A> <0xE2> byte token texts",
    "Mixed 123abc456 def789 v1.2.3-beta+build.5",
    "URL: https://example.com/path?q=1&r=two#frag and email a.b@c.de",
    "$100.00 €50 £20 ¥1000 ₹500",
    "!!! ??? ... --- *** ### @@@ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE ' s",
    "don't DON'T o'clock rock'n'roll",
    "\u00a0nbsp\u00a0and\u2009thin\u2003em\u3000ideographic",
    "zero\u200bwidth\u200cjoiner\u200dtest\ufeffbom",
    "control\x00chars\x01\x07\x1b[0m\x7f",
    "sep\x1cfile\x1dgroup\x1erecord\x1funit\x85nel",
    "\u2028line sep\u2029para sep",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ　１２３",
    "a\u0308\u0301 multiple combining",
    "x" * 300,
    "ab" * 150,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "    indented four\n        indented eight\n",
    'JSON: {"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%smith%';",
    "The year 2024 had 366 days; 1,000,000 people; 3.5% growth.",
    " leading space then\nnewline then  two spaces",
    "ſ 'ſ K Kelvin ﬁ ligature",
    "\ud7ff\ue000\uffff private and edge",
]


def _corpus_slices(n: int, seed: int) -> list[str]:
    """Slices of the pydoc topics (text every Python has): prose, code, tables, long runs."""
    import pydoc_data.topics

    corpus = "\n".join(pydoc_data.topics.topics.values())
    rnd = random.Random(seed)
    starts = [rnd.randrange(len(corpus)) for _ in range(n)]
    return [corpus[s:s + rnd.randrange(1, 400)] for s in starts] + [corpus[:50_000]]


@pytest.fixture(params=MODELS)
def name(request) -> str:
    return request.param


@pytest.fixture
def tok(name, loaded) -> Tokenizer:
    return loaded(name).tokenizer


# ---- always run ------------------------------------------------------------------------------


def test_reference_prompt_ids(name, tok):
    assert tok.encode(REFERENCE_PROMPT) == REFERENCE_IDS[name]
    assert tok.decode(REFERENCE_IDS[name]) == REFERENCE_PROMPT


def test_vocabulary_facts(name, tok):
    if name == "gemma3-270m":
        assert (tok.model, tok.vocab_size, tok.bos_id, tok.eos_id) == ("llama", 262144, 2, 1)
        assert tok.add_bos and not tok.add_space_prefix
        # <end_of_turn>, and </s>, which llama.cpp also treats as end of generation.
        assert tok.eos_ids == {1, 106, 212}
    else:
        assert (tok.model, tok.vocab_size, tok.bos_id, tok.eos_id) == ("gpt2", 49152, 1, 2)
        assert not tok.add_bos
        # <|endoftext|>, <|im_end|>, and <reponame> (llama.cpp's by-name FIM-repo token).
        assert tok.eos_ids == {0, 2, 4}


def test_round_trip(name, tok):
    expect = {}
    if tok.model == "llama":
        # SentencePiece writes spaces as "▁": a literal "▁" in the text comes back as a space.
        expect["\u2581"] = " "
    else:
        # A byte whose stand-in is missing from the vocabulary is dropped, by llama.cpp too.
        # SmolLM2 lacks 21 of the 256; the ones text can hold are ASCII controls such as 0x1D.
        expect.update({chr(b): "" for b, c in enumerate(tk._gpt2_byte_chars())
                       if b < 0x80 and tok.token_id(c) is None})
    for text in TEXTS + _corpus_slices(50, seed=1):
        want = text.translate(str.maketrans(expect))
        assert tok.decode(tok.encode(text)) == want, text
        assert tok.decode(tok.encode(text, add_bos=False)) == want, text


def test_bos_and_eos_flags(tok):
    plain = tok.encode("Hi", add_bos=False, add_eos=False)
    assert tok.encode("Hi", add_bos=True) == [tok.bos_id, *plain]
    assert tok.encode("Hi", add_bos=False, add_eos=True) == [*plain, tok.eos_id]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("", add_bos=True) == [tok.bos_id]


def test_control_tokens_in_text_are_plain_text(tok):
    for text in ["<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>"]:
        ids = tok.encode(text, add_bos=False)
        assert len(ids) > 1, text
        assert tok.decode(ids) == text


def test_gemma_user_defined_tokens_are_cut_out(loaded):
    tok = loaded("gemma3-270m").tokenizer
    nl = {k: 106 + k for k in (1, 2, 9, 31)}  # Gemma 3 stores newline runs at ids 107..137
    for k, i in nl.items():
        assert tok.token_text(i) == "\n" * k and tok.token_type(i) == tk.USER_DEFINED
    assert tok.encode("a\n\nb", add_bos=False)[1] == nl[2]
    # Longest first, as llama.cpp's partition: 40 newlines are a 31-run and a 9-run.
    assert tok.encode("\n" * 40, add_bos=False) == [nl[31], nl[9]]
    assert tok.decode(tok.encode("<b>bold</b>")) == "<b>bold</b>"


def _partition_by_fragments(text: str, tokens: dict[str, int]) -> list[str | int]:
    """llama.cpp's tokenizer_st_partition written out plainly: token lengths longest first; in
    each raw fragment, cut at the leftmost occurrence of any token of that length, repeat.
    (llama.cpp's order among tokens of equal length is unspecified; here: leftmost, lower id.)"""
    frags: list[str | int] = [text]
    for n in sorted({len(t) for t in tokens}, reverse=True):
        group = sorted((i, t) for t, i in tokens.items() if len(t) == n)
        out: list[str | int] = []
        for f in frags:
            while isinstance(f, str):
                hits = [(f.find(t), i) for i, t in group if t in f]
                if not hits:
                    break
                at, i = min(hits)
                out += [f[:at]] if at else []
                out.append(i)
                f = f[at + n:]
            if f != "":
                out.append(f)
        frags = out
    return frags


@settings(max_examples=300, deadline=None)
@given(tokens=st.sets(st.text("ab\n ", min_size=1, max_size=4), min_size=1, max_size=8),
       text=st.text("ab\n xy", min_size=1, max_size=30))
def test_partition_equals_fragment_by_fragment(tokens, text):
    ids = {t: i for i, t in enumerate(sorted(tokens))}
    assert tk._Partitioner(ids).split(text) == _partition_by_fragments(text, ids)


def test_partition_takes_longer_tokens_first():
    part = tk._Partitioner({"ab": 7, "bcd": 9, "\n": 1, "\n\n": 2})
    # llama.cpp cuts "bcd" before it looks for "ab"; leftmost-longest matching would take "ab".
    assert part.split("abcd") == ["a", 9]
    assert part.split("x\n\n\ny") == ["x", 2, 1, "y"]
    assert part.split("none here") == ["none here"]
    assert part.split("\u2581ab\ue000ab") == ["\u2581", 7, "\ue000", 7]


def test_streaming_equals_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces), text


def test_streaming_holds_back_partial_characters(name, tok):
    # "𠀋" (4 UTF-8 bytes) is not in either vocabulary: Gemma spells it with four <0xXX> byte
    # tokens, SmolLM2 with four byte-level tokens of one byte each.
    ids = tok.encode("a𠀋b", add_bos=False)
    assert len(ids) == 6
    if name == "gemma3-270m":
        assert [tok.token_type(i) for i in ids[1:5]] == [tk.BYTE] * 4
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "𠀋", "b"]
    assert stream.flush() == ""
    # A character cut short by the end of the stream comes out as U+FFFD, once.
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids[:3]] == ["a", "", ""]
    assert stream.flush() == "\ufffd"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_decode_on_any_ids(loaded, data):
    """Arbitrary id sequences, dense in byte and control tokens: invalid UTF-8 included."""
    name = data.draw(st.sampled_from(MODELS))
    tok = loaded(name).tokenizer
    pool = st.one_of(st.integers(0, 600), st.integers(0, tok.vocab_size - 1))
    ids = data.draw(st.lists(pool, max_size=40))
    special = data.draw(st.booleans())
    stream = tok.stream_decoder(special=special)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    # decode() strips a prefix space only with add_space_prefix, off for both bundled models.
    assert text == tok.decode(ids, special=special)


def test_decode_special(loaded):
    tok = loaded("gemma3-270m").tokenizer
    ids = tok.encode("Hi", add_bos=True) + [106]
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, special=True) == "<bos>Hi<end_of_turn>"


def test_errors(loaded):
    meta = dict(loaded("smollm2-135m").gguf.metadata)
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_metadata(meta | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="'deepseek-llm'"):
        Tokenizer.from_metadata(meta | {"tokenizer.ggml.pre": "deepseek-llm"})
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[5] = tokens[7]
    with pytest.raises(ValueError, match="more than once"):
        Tokenizer.from_metadata(meta | {"tokenizer.ggml.tokens": tokens})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    tok = loaded("smollm2-135m").tokenizer
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# ---- the SPM merge list ----------------------------------------------------------------------


def _spm_meta(tokens: list[str], scores: list[float], types: list[int],
              **extra: object) -> dict[str, object]:
    """Tokenizer metadata of a made-up SentencePiece vocabulary with all 256 byte tokens."""
    head = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    head_types = [tk.CONTROL] * 3 + [tk.UNKNOWN] + [tk.BYTE] * 256
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": head + tokens,
        "tokenizer.ggml.scores": np.array([0.0] * len(head) + scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(head_types + types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False,
    } | extra


# Ids 260.. of the made-up vocabulary. "ba" and "ab" share a score (a tie); "é" is no token
# but sits inside "aé"; "xy" and "yzw" are user-defined.
SMALL = [("\u2581", -1.0, tk.NORMAL), ("a", -2.0, tk.NORMAL), ("b", -3.0, tk.NORMAL),
         ("x", -4.0, tk.NORMAL), ("y", -5.0, tk.NORMAL), ("z", -6.0, tk.NORMAL),
         ("w", -7.0, tk.NORMAL), ("ba", -8.0, tk.NORMAL), ("ab", -8.0, tk.NORMAL),
         ("aba", -9.0, tk.NORMAL), ("a\u00e9", -10.0, tk.NORMAL), ("xy", 0.0, tk.USER_DEFINED),
         ("yzw", 0.0, tk.USER_DEFINED)]
SMALL_ID = {t: 260 + i for i, (t, _, _) in enumerate(SMALL)}


def _small_meta(**extra: object) -> dict[str, object]:
    return _spm_meta(*map(list, zip(*SMALL)), **extra)


def test_extra_symbols_merge_like_llamacpp():
    tok = Tokenizer.from_metadata(_small_meta())
    # "é" is not a token, yet it merges with "a" (llama.cpp's symbols are characters) ...
    assert tok.encode("a\u00e9", add_bos=False) == [SMALL_ID["a\u00e9"]]
    # ... and alone it becomes its UTF-8 bytes.
    assert tok.encode("\u00e9", add_bos=False) == [4 + 0xC3, 4 + 0xA9]
    assert tok.decode(tok.encode("b\u00e9a\u00e9")) == "b\u00e9a\u00e9"


def _both_encoders(tok: Tokenizer, monkeypatch, text: str) -> tuple[list[int], list[int]]:
    """Ids of ``text`` from the plain-Python SPM encoder and from the compiled one."""
    spm = tok._encoder
    monkeypatch.setattr(spm, "COMPILED_FROM", 1 << 30)
    plain = tok.encode(text, add_bos=False)
    monkeypatch.setattr(spm, "COMPILED_FROM", 0)
    compiled = tok.encode(text, add_bos=False)
    return plain, compiled


def test_compiled_spm_encoder_equals_plain(loaded, monkeypatch, rng):
    # A slice of Gemma 3's vocabulary (with its user-defined and byte tokens) plus random short
    # strings with many tied scores, on random texts over their alphabet and real text.
    meta = dict(loaded("gemma3-270m").gguf.metadata)
    words = list(meta["tokenizer.ggml.tokens"][:3000])
    alphabet = np.array(list("ab\u2581c\u00e9\u4e2d"))
    words += sorted({"".join(rng.choice(alphabet, size=rng.integers(2, 6))) for _ in range(400)}
                    - set(words))
    scores = np.concatenate([meta["tokenizer.ggml.scores"][:3000],
                             rng.integers(-20, 0, len(words) - 3000)]).astype(np.float32)
    types = np.concatenate([np.array(meta["tokenizer.ggml.token_type"][:3000]),
                            np.full(len(words) - 3000, tk.NORMAL)]).astype(np.int32)
    meta |= {"tokenizer.ggml.tokens": words, "tokenizer.ggml.scores": scores,
             "tokenizer.ggml.token_type": types}
    tok = Tokenizer.from_metadata(meta)
    texts = ["".join(rng.choice(alphabet, size=int(n))) for n in rng.integers(1, 300, 60)]
    texts += [t for t in TEXTS if t]
    merged = 0
    for text in texts:
        plain, compiled = _both_encoders(tok, monkeypatch, text)
        assert compiled == plain, text[:80]
        merged += len(plain) < len(text)
    assert merged > 40  # the merges did happen
    # With base 1 every anagram collides: the compiled route must stand down.
    tok = Tokenizer.from_metadata(meta)
    monkeypatch.setattr(tk, "_HASH_BASES", (1, 1))
    monkeypatch.setattr(tk, "_INV_BASES", (1, 1))
    for text in texts[:10]:
        plain, compiled = _both_encoders(tok, monkeypatch, text)
        assert compiled == plain
    assert not tok._encoder.exact


def test_compiled_spm_encoder_on_gemma(tok, name, monkeypatch):
    if name != "gemma3-270m":
        pytest.skip("SPM vocabulary only")
    for text in TEXTS + _corpus_slices(20, seed=5):
        plain, compiled = _both_encoders(tok, monkeypatch, text)
        assert compiled == plain, text[:80]


# ---- llama.cpp as oracle ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _llama(llama_cpp, path: Path | str):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _write_gguf(path: Path, meta: dict[str, object]) -> Path:
    """A tensor-less GGUF file holding ``meta`` (enough for llama.cpp's vocab_only load)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch=str(meta["general.architecture"]))
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(key, int(value))
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, np.ndarray):
            sub = {np.float32: gguf.GGUFValueType.FLOAT32,
                   np.int32: gguf.GGUFValueType.INT32}[value.dtype.type]
            writer.add_key_value(key, value.tolist(), gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same_ids(llm, tok: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        for special in (False, True):
            want = llm.tokenize(text.encode(), add_bos=special, special=False)
            got = tok.encode(text) if special else tok.encode(text, add_bos=False, add_eos=False)
            assert got == want, (special, text[:80])


@pytest.mark.oracle
def test_ids_equal_llamacpp(name, tok, model_path, llama_cpp):
    _assert_same_ids(_llama(llama_cpp, model_path(name)), tok,
                     TEXTS + _corpus_slices(150, seed=2))


@pytest.mark.oracle
def test_pieces_and_eog_equal_llamacpp(name, tok, model_path, llama_cpp):
    import ctypes

    llm = _llama(llama_cpp, model_path(name))
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    # llama_token_to_piece directly: Llama.detokenize drops pieces longer than its buffer.
    buf = ctypes.create_string_buffer(512)
    for special in (False, True):
        for i in range(tok.vocab_size):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
            assert tok.piece(i, special) == buf.raw[:n], (i, special)
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eos_ids == eog


@pytest.mark.oracle
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "starcoder", "dbrx"])
def test_bpe_pre_tokenizers_equal_llamacpp(pre, loaded, tmp_path, llama_cpp):
    """SmolLM2's vocabulary under other pre-tokenizers: their splits, checked by llama.cpp."""
    meta = dict(loaded("smollm2-135m").gguf.metadata) | {"tokenizer.ggml.pre": pre}
    llm = _llama(llama_cpp, _write_gguf(tmp_path / "vocab.gguf", meta))
    _assert_same_ids(llm, Tokenizer.from_metadata(meta), TEXTS + _corpus_slices(40, seed=3))


@pytest.mark.oracle
def test_spm_space_prefix_and_eos_equal_llamacpp(loaded, tmp_path, llama_cpp):
    """Gemma's vocabulary with Llama-2-style flags: a space before every text fragment."""
    meta = dict(loaded("gemma3-270m").gguf.metadata) | {
        "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_eos_token": True}
    llm = _llama(llama_cpp, _write_gguf(tmp_path / "vocab.gguf", meta))
    tok = Tokenizer.from_metadata(meta)
    _assert_same_ids(llm, tok, TEXTS)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


@pytest.mark.oracle
def test_small_spm_vocabulary_against_llamacpp(loaded, tmp_path, llama_cpp):
    arch = {k: v for k, v in loaded("gemma3-270m").gguf.metadata.items()
            if not k.startswith("tokenizer.")}
    meta = arch | _small_meta()
    llm = _llama(llama_cpp, _write_gguf(tmp_path / "small.gguf", meta))
    tok = Tokenizer.from_metadata(meta)
    _assert_same_ids(llm, tok, ["a\u00e9", "\u00e9", "xyzw", "yzwxy", "ab ba", "aba", "zzz"])

    # Merges of equal score: on "abab" the candidates ab, ba, ab tie, and llama.cpp merges the
    # leftmost (a BPE merge list would take the pair ranked first, "ba": [aba, b]).
    ab = SMALL_ID["ab"]
    assert llm.tokenize(b"abab", add_bos=False, special=False) == [ab, ab]
    assert tok.encode("abab", add_bos=False) == [ab, ab]
