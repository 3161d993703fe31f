"""Tokenizer built from a GGUF file's own vocabulary, giving the token ids llama.cpp gives.

The vocabulary, merges, scores and token types come from the file's ``tokenizer.ggml.*`` keys; no
``tokenizer.json`` is needed. Each step follows llama.cpp's ``llama-vocab.cpp``:

1. **Partition.** Every USER_DEFINED token (type 4) found in the text is cut out and emitted as
   that token, before any other processing, longest token text first
   (``tokenizer_st_partition``; ``tokenize(..., parse_special=false)`` skips only CONTROL and
   UNKNOWN tokens). Control tokens such as ``<bos>`` or ``<|im_start|>`` written in the text are
   plain text. Gemma 3 has 165 user-defined tokens: runs of newlines, tabs and spaces, some HTML
   tags, ``<start_of_image>``.
2. **Each remaining piece** is tokenized on its own:

   - ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE, ``llm_tokenizer_bpe``): split by the
     pre-tokenizer regexes of ``tokenizer.ggml.pre``, map bytes to the GPT-2 byte alphabet,
     merge by the rank of ``tokenizer.ggml.merges``. The ``tokenizers`` package (a Rust BPE
     model) does this work.
   - ``tokenizer.ggml.model = "llama"`` (SentencePiece vocabulary, ``llm_tokenizer_spm``):
     spaces become ``▁`` (and a leading space is added when ``add_space_prefix`` is set), then
     adjacent symbols are merged greedily, starting from single characters: the pair whose
     concatenation is the highest-scoring token first, the leftmost among equal scores (not a
     Viterbi/Unigram search); a symbol left that is not a token becomes its ``<0xXX>`` byte
     tokens. This is llama.cpp's algorithm as it stands, compiled with numba over a hash table
     of the token texts (:class:`_SpmVocab`), which builds in a fraction of the time a merge
     list for a BPE model would take (Gemma 3: 513k pairs).
3. BOS/EOS are added as the file says (``add_bos_token``/``add_eos_token``) unless the caller
   overrides it.

Token types are first adjusted by name as llama.cpp does: end-of-generation texts such as
``<end_of_turn>``, ``<|im_end|>`` and ``</s>`` become CONTROL (so Gemma 3's ``</s>``, stored as a
user-defined HTML tag, is neither cut out of text nor decoded), and make up ``eos_ids`` with the
EOS, EOT and EOM ids the file names.

Known differences from llama.cpp. None shows on the tests' texts (64 chosen texts and slices of
the pydoc topics, for both bundled models, and for SmolLM2's vocabulary under the pre-tokenizers
gpt-2, llama-bpe, qwen2, starcoder and dbrx):

- llama.cpp sorts user-defined tokens by length with an unstable sort: for two of equal length
  that overlap in the text its choice is unspecified; here the lower id wins. Likewise, where
  llama.cpp picks one of several by-name candidates for a fill-in-the-middle role in hash-map
  order, the lowest id is taken here.
- Token attributes llama.cpp sets by model name (LSTRIP/RSTRIP for Phi-3 and Jina) are not
  applied, and decoding skips llama.cpp's optional ``clean_up_tokenization_spaces`` pass (used
  by some BPE pre-tokenizers, not by SmolLM2 or Gemma 3; it loses information).
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numba
import numpy as np

# Token types (llama.h: enum llama_token_type; the GGUF key tokenizer.ggml.token_type).
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# Token texts llama.cpp recognises by name (llama-vocab.cpp, llama_vocab::impl::load, in the
# version llama-cpp-python 0.3.36 vendors). Each found token is forced to CONTROL, which matters
# for tokenizing (a user-defined token stops being cut out of the text) and for decoding (it
# renders as nothing); the EOG ones also end generation.
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
)
# Fill-in-the-middle tokens: when the file names none by key, llama.cpp takes one token per role
# by text; pad, repo and file-separator ones also end generation.
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>",
                "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>",
                "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>",
                "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")
# Tokens llama.cpp always renders as text (its gpt-oss workaround): forced to USER_DEFINED.
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# GPT-2's byte-level split (unicode.cpp: unicode_regex_split_custom_gpt2). llama.cpp's pattern
# lacks the final ``|\s+``; its matcher emits text no branch matches as a piece of its own, and
# the only such text is a lone whitespace character, which is what ``\s+`` yields here.
_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# Llama 3's split with the case-insensitive group spelled out, as llama-vocab.cpp does: an
# ``(?i:...)`` would also let Unicode case folding match e.g. "'ſ" (U+017F).
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
           r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, default add_bos), following the
# pre_type switch in llama-vocab.cpp (llama_vocab::impl::load and llm_tokenizer_bpe). Only the
# families whose splits the tests check against llama.cpp are listed.
_BPE_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _spec in (
    (("gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "gigachat", "jina-es", "jina-de",
      "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code"), ((_GPT2,), False, False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     ((r"\p{N}", _GPT2), False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3"), ((_LLAMA3,), True, True)),
    (("dbrx", "smaug-bpe"), ((_LLAMA3,), False, False)),
    (("qwen2", "stablelm2", "megrez"), ((_QWEN2,), False, False)),
):
    for _name in _names:
        _BPE_PRE[_name] = _spec

SUPPORTED_MODELS = ("llama", "gpt2")


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary, matching llama.cpp's ``llama_tokenize``.

    Build with :meth:`from_metadata`. Ids are plain ``int``; ``vocab_size`` counts every entry of
    ``tokenizer.ggml.tokens``. Attributes: ``model`` and ``pre`` (the file's tokenizer model and
    pre-tokenizer names), ``bos_id``, ``eos_id``, ``unk_id``, ``pad_id`` (None where absent),
    ``eos_ids`` (every id that ends generation, as llama.cpp's ``llama_vocab_is_eog``),
    ``add_bos``, ``add_eos``, ``add_space_prefix`` (the file's flags, llama.cpp's defaults).
    """

    def __init__(self, *, model: str, pre: str, tokens: list[str], vocab: dict[str, int],
                 types: np.ndarray, encoder: Any, bos_id: int | None, eos_id: int | None,
                 unk_id: int | None, pad_id: int | None, eos_ids: frozenset[int], add_bos: bool,
                 add_eos: bool, add_space_prefix: bool) -> None:
        self.model = model
        self.pre = pre
        self._tokens = tokens
        self._vocab = vocab
        self._types = types
        # _SpmVocab (model "llama") or a tokenizers Tokenizer (model "gpt2").
        self._encoder = encoder
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self._partition = _Partitioner(
            {tokens[i]: int(i) for i in np.flatnonzero(types == USER_DEFINED)})
        self._pieces: list[bytes] | None = None
        self._special_pieces: dict[int, bytes] | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (``GGUFFile.metadata``: the file's own keys and values).

        Needs ``tokenizer.ggml.model``, ``.tokens`` and, per model, ``.scores`` (``llama``) or
        ``.merges`` (``gpt2``). Raises ValueError for an unsupported tokenizer model or
        pre-tokenizer, or a malformed vocabulary.
        """
        model = meta.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise ValueError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                             f"supported: {', '.join(SUPPORTED_MODELS)}")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if model == "gpt2" and pre not in _BPE_PRE:
            raise ValueError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre) for "
                             f"tokenizer model 'gpt2'; supported: {', '.join(sorted(_BPE_PRE))}")
        # llama.cpp gives SentencePiece vocabularies no pre-tokenizer: for model "llama",
        # tokenizer.ggml.pre is read but unused, so any value is accepted.
        splits, ignore_merges, default_bos = _BPE_PRE[pre] if model == "gpt2" else ((), False, True)
        # llama.cpp's default ids where the file names none (llama_vocab::impl::load).
        bos, eos, unk = (1, 2, 0) if model == "llama" else (11, 11, None)

        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, Sequence) or isinstance(tokens, str) or not tokens:
            raise ValueError("missing or empty tokenizer.ggml.tokens")
        n = len(tokens)
        # llama.cpp renames empty entries rather than refusing them.
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types = _array(meta, "tokenizer.ggml.token_type", n, np.int32, NORMAL)
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise ValueError(f"tokenizer.ggml.tokens holds {dup!r} more than once")
        bos_id = _key_id(meta, "bos", n, bos)
        eos_id = _key_id(meta, "eos", n, eos)
        unk_id = _key_id(meta, "unknown", n, unk)
        pad_id = _key_id(meta, "padding", n, None)
        eog = _special_by_name(meta, vocab, types, (  # also updates `types`
            eos_id, _key_id(meta, "eot", n, None), _key_id(meta, "eom", n, None)))

        if model == "llama":
            scores = _array(meta, "tokenizer.ggml.scores", n, np.float32, 0.0)
            encoder: Any = _SpmVocab(tokens, scores, types, vocab, unk_id)
        else:
            merges = _bpe_merges(meta.get("tokenizer.ggml.merges"), vocab)
            encoder = _hf_bpe(vocab, merges, pre_splits=splits, ignore_merges=ignore_merges)
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        return cls(model=model, pre=pre, tokens=tokens, vocab=vocab, types=types, encoder=encoder,
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
                   eos_ids=frozenset(eog),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   # Only the SPM path of llama.cpp's tokenize() reads this flag.
                   add_space_prefix=model == "llama" and add_space_prefix)

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of entries in ``tokenizer.ggml.tokens`` (ids run 0 .. vocab_size - 1)."""
        return len(self._tokens)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored in the file (``▁``, ``Ġ`` and all)."""
        return self._tokens[self._check_id(token_id)]

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled ``text`` exactly, or None."""
        return self._vocab.get(text)

    def token_type(self, token_id: int) -> int:
        """The token's type (NORMAL, CONTROL, USER_DEFINED, BYTE, ...), as llama.cpp sees it."""
        return int(self._types[self._check_id(token_id)])

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``, as llama.cpp's ``llama_tokenize(..., parse_special=false)``.

        ``add_bos``/``add_eos``: prepend BOS / append EOS; ``None`` follows the file
        (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``). Control tokens written in
        ``text`` are tokenized as the characters they are made of.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            out.append(self.bos_id)
        if text:
            self._encode_text(text, out)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _encode_text(self, text: str, out: list[int]) -> None:
        parts = self._partition.split(text)  # str: raw text; int: a user-defined token
        pieces: list[str] = []
        slots: list[int] = []  # where each raw piece's ids go in `parts`
        prev_special = True  # llama.cpp: "prefix with space if first token" (SPM only)
        for k, part in enumerate(parts):
            if isinstance(part, str):
                if self.model == "llama":
                    if self.add_space_prefix and prev_special:
                        part = " " + part
                    part = part.replace(" ", "\u2581")  # llama_escape_whitespace
                pieces.append(part)
                slots.append(k)
                prev_special = False
            else:
                prev_special = True
        if self.model == "llama":
            by_slot = {k: self._encoder.encode(piece) for k, piece in zip(slots, pieces)}
        else:
            # One call per piece: as fast as encode_batch here, and no thread pool (whose use
            # makes the tokenizers package warn in every process forked afterwards).
            encode = self._encoder.encode
            by_slot = {k: encode(piece, add_special_tokens=False).ids
                       for k, piece in zip(slots, pieces)}
        for k, part in enumerate(parts):
            if isinstance(part, str):
                out.extend(by_slot[k])
            else:
                out.append(part)

    # ---- decoding -----------------------------------------------------------------------

    def piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes ``token_id`` stands for (llama.cpp's ``token_to_piece``).

        CONTROL and UNKNOWN tokens give ``b""`` unless ``special``; then their text.
        """
        token_id = self._check_id(token_id)
        if special:
            sp = self._special_table()
            if token_id in sp:
                return sp[token_id]
        return self._piece_table()[token_id]

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The text of ``ids``: their pieces joined, then read as UTF-8 (bad bytes -> U+FFFD).

        CONTROL tokens (BOS, EOS, ``<end_of_turn>`` ...) are left out unless ``special``. With
        ``add_space_prefix`` the space the encoder put before the text is removed again, as
        llama.cpp's ``llama_detokenize`` does.
        """
        ids = [self._check_id(i) for i in ids]
        table = self._piece_table()
        if special:
            sp = self._special_table()
            data = [sp.get(i) or table[i] for i in ids]
        else:
            data = [table[i] for i in ids]
        if self.add_space_prefix:
            data = _strip_prefix_space(data)
        return b"".join(data).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        """An incremental decoder for tokens that arrive one at a time (see StreamDecoder)."""
        return StreamDecoder(self, special=special)

    def _check_id(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self._tokens) - 1})")
        return i

    def _piece_table(self) -> list[bytes]:
        # Built on first use: encoding never needs it, and it costs ~0.1 s for 262k tokens.
        if self._pieces is None:
            self._pieces = _piece_table(self._tokens, self._types, self.model)
        return self._pieces

    def _special_table(self) -> dict[int, bytes]:
        if self._special_pieces is None:
            ids = np.flatnonzero((self._types == CONTROL) | (self._types == UNKNOWN))
            self._special_pieces = {int(i): self._tokens[i].encode() for i in ids}
        return self._special_pieces

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


class StreamDecoder:
    """Turns token ids arriving one by one into text, never splitting a UTF-8 character.

    ``push(id)`` returns the text that became complete with that token (possibly ``""``: a
    byte-fallback token such as ``<0xE2>`` holds the start of a character); ``flush()`` returns
    what is left at the end (incomplete bytes as U+FFFD). The concatenation of everything
    returned equals ``Tokenizer.decode(ids)`` of the same ids, except that no leading space is
    stripped: the stream continues text that came before it.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by ``token_id``."""
        return self._utf8.decode(self._tok.piece(token_id, self._special))

    def flush(self) -> str:
        """Whatever is still held back, with incomplete bytes replaced; resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---- construction helpers ---------------------------------------------------------------


def _array(meta: Mapping[str, Any], key: str, n: int, dtype: type, default: float) -> np.ndarray:
    value = meta.get(key)
    if value is None:
        return np.full(n, default, dtype=dtype)
    arr = np.array(value, dtype=dtype)  # a copy: the by-name rules write into it
    if arr.shape != (n,):
        raise ValueError(f"{key} has {arr.size} entries but tokenizer.ggml.tokens has {n}")
    return arr


def _key_id(meta: Mapping[str, Any], name: str, n: int, default: int | None) -> int | None:
    # llama.cpp keeps its default when the file's id is out of range (with a warning).
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is None or not 0 <= int(value) < n:
        return default if default is None or default < n else None
    return int(value)


def _special_by_name(meta: Mapping[str, Any], vocab: Mapping[str, int], types: np.ndarray,
                     by_key: Iterable[int | None]) -> set[int]:
    """Apply llama.cpp's by-name special-token rules to ``types``; return the EOG ids.

    Where llama.cpp picks the first of several candidates in hash-map order, the lowest id is
    taken here; the bundled models have at most one candidate per role.
    """
    eog: set[int] = set()
    n = len(types)
    for role, texts in _FIM_TEXTS.items():
        i = _key_id(meta, role, n, None)
        if i is None:
            found = [vocab[t] for t in texts if t in vocab]
            if not found:
                continue
            i = min(found)
            types[i] = CONTROL
        if role in _FIM_EOG:
            eog.add(i)
    for text in EOG_TEXTS:
        i = vocab.get(text)
        if i is not None:
            types[i] = CONTROL
            eog.add(i)
    for text in _ALWAYS_USER_DEFINED:
        if text in vocab:
            types[vocab[text]] = USER_DEFINED
    eog.update(i for i in by_key if i is not None)  # EOS, EOT and EOM named by key
    # Two workarounds in llama.cpp: "<|end|>" is not EOG next to "<|return|>" and "<|call|>"
    # (or "<|calls|>" and "<|flush|>"), and "</s>" is a plain token next to "<|tool_response>".
    if "<|end|>" in vocab and (("<|return|>" in vocab and "<|call|>" in vocab)
                               or ("<|calls|>" in vocab and "<|flush|>" in vocab)):
        eog.discard(vocab["<|end|>"])
        types[vocab["<|end|>"]] = USER_DEFINED
    if "</s>" in vocab and "<|tool_response>" in vocab:
        eog.discard(vocab["</s>"])
        types[vocab["</s>"]] = NORMAL
    return eog


def _hf_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], *, pre_splits: Sequence[str],
            ignore_merges: bool) -> Any:
    """A byte-level BPE ``tokenizers`` model: the pre-tokenizer's splits, then GPT-2 bytes."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    bpe = models.BPE(vocab, merges, ignore_merges=ignore_merges)
    hf = HFTokenizer(bpe)
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in pre_splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return hf


def _bpe_merges(raw: Any, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` ("a b" strings, in rank order) as pairs.

    llama.cpp splits at the first space after the first character and keeps the first rank of a
    repeated pair. The ``tokenizers`` BPE model refuses pairs whose parts or result are not in
    the vocabulary, so they are dropped. None exist in a well-formed file (SmolLM2: none); a
    part outside the vocabulary never meets the merger anyway, but llama.cpp would apply a pair
    whose result is missing and then spell that result byte by byte.
    """
    if raw is None or isinstance(raw, str):
        raise ValueError("tokenizer model 'gpt2' needs tokenizer.ggml.merges")
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for m in raw:
        cut = m.find(" ", 1)
        if cut < 0:
            continue
        pair = (m[:cut], m[cut + 1:])
        if pair in seen or pair[0] not in vocab or pair[1] not in vocab:
            continue
        if pair[0] + pair[1] not in vocab:
            continue
        seen.add(pair)
        out.append(pair)
    return out


# Two odd 64-bit multipliers for polynomial string hashes (any odd constants work).
_HASH_BASES = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)
_INV_BASES = tuple(pow(b, -1, 1 << 64) for b in _HASH_BASES)


class _SpmVocab:
    """What llama.cpp's SPM tokenizer needs of the vocabulary, and the encoder over it.

    Pieces shorter than ``COMPILED_FROM`` characters (prompts, chat turns) go through the
    plain-Python encoder over the vocabulary dict: it is done before the compiled one would
    have loaded from numba's cache (about 0.3 s). Longer ones (corpora) go through the
    compiled encoder, whose tables are built on first use: token texts are looked up by two
    64-bit polynomial hashes of their code points, computed for all tokens at once with prefix
    sums, and a lookup accepts a token only when both hashes and the length agree. If two
    tokens share all three (no real vocabulary does), the plain encoder does all the work.
    """

    COMPILED_FROM = 2048

    def __init__(self, tokens: list[str], scores: np.ndarray, types: np.ndarray,
                 vocab: Mapping[str, int], unk_id: int | None) -> None:
        self.tokens, self.vocab = tokens, vocab
        self.scores = np.asarray(scores, dtype=np.float64)
        # A user-defined token's text never reaches the merger (the partition cuts it out), so
        # it is never the result of a merge; it may still be looked up as a whole symbol.
        self.mergeable = types != USER_DEFINED
        self.unk = -1 if unk_id is None else int(unk_id)
        self.byte_ids = np.array([vocab.get(f"<0x{b:02X}>", self.unk) for b in range(256)],
                                 dtype=np.int64)
        self._tables: tuple | None = None
        self.exact = True

    def _build(self) -> tuple:
        lens = np.fromiter(map(len, self.tokens), dtype=np.int64, count=len(self.tokens))
        cps = np.frombuffer("".join(self.tokens).encode("utf-32-le", "surrogatepass"),
                            dtype="<u4").astype(np.uint64)
        ends = np.cumsum(lens)
        starts = ends - lens
        with np.errstate(over="ignore"):
            h1, h2 = (_substring_hashes(cps, base, inv, starts, ends)
                      for base, inv in zip(_HASH_BASES, _INV_BASES))
        order = np.lexsort((h2, h1, lens))
        key = np.stack([lens[order], h1[order].view(np.int64), h2[order].view(np.int64)])
        self.exact = not np.any(np.all(key[:, 1:] == key[:, :-1], axis=0))
        table = _HashTable(h1)
        return (table._slots, np.uint64(table._mask), table._shift, h1, h2, lens)

    def encode(self, piece: str) -> list[int]:
        """Ids of one text piece (spaces already escaped), as llama.cpp's SPM session gives."""
        if len(piece) >= self.COMPILED_FROM and self._tables is None:
            self._tables = self._build()
        if len(piece) < self.COMPILED_FROM or not self.exact:
            return _spm_encode_py(piece, self.vocab, self.scores, self.mergeable,
                                  self.byte_ids)
        cps = np.frombuffer(piece.encode("utf-32-le", "surrogatepass"),
                            dtype="<u4").astype(np.uint64)
        ids = _spm_encode(cps, np.uint64(_HASH_BASES[0]), np.uint64(_INV_BASES[0]),
                          np.uint64(_HASH_BASES[1]), np.uint64(_INV_BASES[1]), *self._tables,
                          self.mergeable, self.scores, self.byte_ids)
        if ids.size and ids[-1] == -1:
            bad = next(c for c in piece if c not in self.vocab)
            raise ValueError(f"the vocabulary has no byte token for character {bad!r} and no "
                             f"unknown token")
        return ids.tolist()


def _substring_hashes(cps: np.ndarray, base: int, inv: int, starts: np.ndarray,
                      ends: np.ndarray) -> np.ndarray:
    """h(s, e) = sum_{s<=i<e} cps[i] * base^(i-s) (mod 2^64) for every (start, end) pair."""
    total = cps.size
    powers = np.ones(total + 1, dtype=np.uint64)
    inverse = np.ones(total + 1, dtype=np.uint64)
    powers[1:] = np.cumprod(np.full(total, base, dtype=np.uint64))
    inverse[1:] = np.cumprod(np.full(total, inv, dtype=np.uint64))
    prefix = np.zeros(total + 1, dtype=np.uint64)
    np.cumsum(cps * powers[:total], out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * inverse[starts]


class _HashTable:
    """Open-addressing table (linear probing) from 64-bit keys to their index, built with
    whole-array numpy operations; ``_spm_lookup`` probes it (same slot function, same order)."""

    def __init__(self, keys: np.ndarray) -> None:
        bits = max(4, int(keys.size).bit_length() + 3)  # load factor at most 1/8
        self._mask = (1 << bits) - 1
        self._shift = np.uint64(64 - bits)
        self._slots = np.full(1 << bits, -1, dtype=np.int64)
        pending = np.arange(keys.size)
        slot = self._slot(keys)
        while pending.size:
            s = slot[pending]
            free = self._slots[s] < 0
            # Keys aiming at the same free slot: the last write wins, the others probe on.
            self._slots[s[free]] = pending[free]
            placed = free & (self._slots[s] == pending)
            pending, slot_left = pending[~placed], s[~placed]
            slot[pending] = (slot_left + 1) & self._mask

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        # The polynomial hash of a short string is a small number; scramble it (splitmix64's
        # finalizer) and take the high bits, or all one-character keys share a slot.
        with np.errstate(over="ignore"):
            x = keys ^ (keys >> np.uint64(30))
            x = x * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x = x * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        return (x >> self._shift).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _spm_encode(cps, b1, i1, b2, i2, slots, mask, shift, h1, h2, lens, mergeable, scores,
                byte_ids):  # pragma: no cover - compiled
    """llama.cpp's ``llm_tokenizer_spm_session::tokenize`` over one piece's code points.

    Symbols start as single characters. Every adjacent pair whose concatenation is a token is
    a candidate, scored by that token; the best (ties: the leftmost) is merged and its
    neighbours become candidates, until none is left. A final symbol that is a token is emitted
    as such; one that is not (a single character) as the byte tokens of its UTF-8 encoding, or
    the unknown token. Returns the ids, ending in -1 if a byte had no token and no unknown
    token stands in. The vocabulary is read through the hash table of ``_SpmVocab``.
    """
    n = cps.size
    p1 = np.zeros(n + 1, dtype=np.uint64)
    p2 = np.zeros(n + 1, dtype=np.uint64)
    q1 = np.ones(n + 1, dtype=np.uint64)  # inverse powers
    q2 = np.ones(n + 1, dtype=np.uint64)
    w1 = np.uint64(1)
    w2 = np.uint64(1)
    for i in range(n):
        p1[i + 1] = p1[i] + cps[i] * w1
        p2[i + 1] = p2[i] + cps[i] * w2
        w1 *= b1
        w2 *= b2
        q1[i + 1] = q1[i] * i1
        q2[i + 1] = q2[i] * i2
    start = np.arange(n)
    size = np.ones(n, dtype=np.int64)
    prev = np.arange(n) - 1
    nxt = np.arange(n) + 1
    nxt[n - 1] = -1
    heap = [(0.0, 0, 0, 0)]
    heap.pop()
    for i in range(1, n):
        _spm_candidate(heap, i - 1, i, start, size, p1, p2, q1, q2, slots, mask, shift, h1, h2,
                       lens, mergeable, scores)
    while heap:
        _, left, right, total = heapq.heappop(heap)
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
            continue  # a symbol changed since this candidate was made
        size[left] += size[right]
        size[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        _spm_candidate(heap, prev[left], left, start, size, p1, p2, q1, q2, slots, mask, shift,
                       h1, h2, lens, mergeable, scores)
        _spm_candidate(heap, left, nxt[left], start, size, p1, p2, q1, q2, slots, mask, shift,
                       h1, h2, lens, mergeable, scores)
    out = []
    i = 0
    while i != -1:
        s, e = start[i], start[i] + size[i]
        tok = _spm_lookup(s, e, p1, p2, q1, q2, slots, mask, shift, h1, h2, lens, mergeable,
                          False)
        if tok >= 0:
            out.append(tok)
        else:
            for k in range(s, e):
                c = np.int64(cps[k])
                if c < 0x80:
                    nb = 1
                elif c < 0x800:
                    nb = 2
                elif c < 0x10000:
                    nb = 3
                else:
                    nb = 4
                for j in range(nb):
                    shifted = (c >> (6 * (nb - 1 - j))) & 0x3F
                    if j > 0:
                        byte = 0x80 | shifted
                    elif nb == 1:
                        byte = c
                    else:
                        byte = ((0xF00 >> nb) & 0xF0) | (c >> (6 * (nb - 1)))
                    tok = byte_ids[byte]
                    out.append(tok)
                    if tok < 0:
                        return np.array(out, dtype=np.int64)
        i = nxt[i]
    return np.array(out, dtype=np.int64)


@numba.njit(cache=True, inline="always")
def _spm_lookup(s, e, p1, p2, q1, q2, slots, mask, shift, h1, h2, lens, mergeable,
                merge_only):  # pragma: no cover - compiled
    """Id of the token spelled by code points [s, e) of the piece, or -1."""
    k1 = (p1[e] - p1[s]) * q1[s]
    k2 = (p2[e] - p2[s]) * q2[s]
    x = k1 ^ (k1 >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x = x * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    slot = x >> shift
    while True:
        held = slots[slot]
        if held < 0:
            return -1
        if (h1[held] == k1 and lens[held] == e - s and h2[held] == k2
                and (mergeable[held] or not merge_only)):
            return held
        slot = (slot + np.uint64(1)) & mask


@numba.njit(cache=True, inline="always")
def _spm_candidate(heap, left, right, start, size, p1, p2, q1, q2, slots, mask, shift, h1, h2,
                   lens, mergeable, scores):  # pragma: no cover - compiled
    if left < 0 or right < 0:
        return
    s, e = start[left], start[right] + size[right]
    tok = _spm_lookup(s, e, p1, p2, q1, q2, slots, mask, shift, h1, h2, lens, mergeable, True)
    if tok >= 0:
        # heapq pops the smallest: the best score first, then the leftmost pair.
        heapq.heappush(heap, (-scores[tok], left, right, e - s))


def _spm_encode_py(piece: str, vocab: Mapping[str, int], scores: np.ndarray,
                   mergeable: np.ndarray, byte_ids: np.ndarray) -> list[int]:
    """Plain-Python twin of :func:`_spm_encode` over a dict vocabulary (the reference the
    tests hold it to, and the route taken when the hashes cannot tell two tokens apart)."""
    text = [c for c in piece]
    alive = [True] * len(text)
    prev = list(range(-1, len(text) - 1))
    nxt = list(range(1, len(text))) + [-1]
    heap: list[tuple[float, int, int, int]] = []

    def candidate(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        tok = vocab.get(text[left] + text[right])
        if tok is not None and mergeable[tok]:
            heapq.heappush(heap, (-float(scores[tok]), left, right,
                                  len(text[left]) + len(text[right])))

    for i in range(1, len(text)):
        candidate(i - 1, i)
    while heap:
        _, left, right, total = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or len(text[left]) + len(text[right]) != total:
            continue
        text[left] += text[right]
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        candidate(prev[left], left)
        candidate(left, nxt[left])
    out: list[int] = []
    i = 0
    while i != -1:
        tok = vocab.get(text[i])
        if tok is not None:
            out.append(tok)
        else:
            for b in text[i].encode("utf-8", "surrogatepass"):
                out.append(int(byte_ids[b]))
                if out[-1] < 0:
                    raise ValueError(f"the vocabulary has no byte token for character "
                                     f"{text[i]!r} and no unknown token")
        i = nxt[i]
    return out


class _Partitioner:
    """Cuts user-defined tokens out of text the way llama.cpp's ``tokenizer_st_partition`` does.

    llama.cpp takes the tokens longest first and, for each, splits every remaining text fragment
    at its leftmost non-overlapping occurrences. That is not the same as a left-to-right scan
    for the longest token ("ab", "bcd" on "abcd": llama.cpp keeps "bcd"), but it only differs
    where occurrences overlap. So one left-to-right regex scan finds the matches; a match that
    some other occurrence could overlap (it starts inside the match and runs past its end) is
    grown into a region, and regions are redone the llama.cpp way: one regex per token length,
    longest first, each matched span overwritten with a character no token contains so shorter
    tokens can neither match inside nor across it. Occurrences never cross regions, so regions
    are independent.
    """

    def __init__(self, texts: Mapping[str, int]) -> None:
        self._ids = dict(texts)
        # Python's regex alternation takes the first alternative that matches: longest first.
        self._scan = re.compile("|".join(map(re.escape, sorted(texts, key=lambda t: -len(t)))))
        by_len: dict[int, list[str]] = {}
        for t in sorted(texts, key=texts.__getitem__):
            by_len.setdefault(len(t), []).append(t)
        self._passes = [(n, re.compile("|".join(map(re.escape, by_len[n]))))
                        for n in sorted(by_len, reverse=True)]
        used = set("".join(texts))
        self._blank = next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in used)
        # For each token A: the characters that, right after an occurrence of A, would let
        # another token start inside A and run past its end (A's tail is B's head).
        heads: dict[str, set[str]] = {}
        for b in texts:
            for k in range(1, len(b)):
                heads.setdefault(b[:k], set()).add(b[k])
        self._overlap_next = {a: set().union(*(heads.get(a[i:], ()) for i in range(1, len(a))))
                              for a in texts}

    def split(self, text: str) -> list[str | int]:
        """``text`` as a list of raw-text pieces (str) and user-defined token ids (int)."""
        if not self._ids:
            return [text]
        regions: list[list[int]] = []  # [start, end, 1 if it needs the slow pass]
        for m in self._scan.finditer(text):
            s, e = m.span()
            end = e
            if e < len(text) and text[e] in self._overlap_next[m.group()]:
                for p in range(s + 1, e):
                    o = self._scan.match(text, p)
                    if o is not None and o.end() > end:
                        end = o.end()
            if regions and s < regions[-1][1]:
                regions[-1][1] = max(regions[-1][1], end)
                regions[-1][2] = 1
            else:
                regions.append([s, end, int(end > e)])
        if not regions:
            return [text]
        parts: list[str | int] = []
        last = 0
        for s, e, slow in regions:
            if s > last:
                parts.append(text[last:s])
            if slow:
                parts.extend(self._longest_first(text[s:e]))
            else:
                parts.append(self._ids[text[s:e]])
            last = e
        if last < len(text):
            parts.append(text[last:])
        if any(slow for _, _, slow in regions):
            # Raw text at the edge of a region joins the raw text next to it.
            merged: list[str | int] = []
            for part in parts:
                if isinstance(part, str) and merged and isinstance(merged[-1], str):
                    merged[-1] += part
                else:
                    merged.append(part)
            parts = merged
        return parts

    def _longest_first(self, text: str) -> list[str | int]:
        work = text
        found: list[tuple[int, int]] = []  # (start, length)
        for n, pattern in self._passes:
            if n > len(text):
                continue
            spans = [m.start() for m in pattern.finditer(work)]
            if not spans:
                continue
            found.extend((s, n) for s in spans)
            chunks, last, blank = [], 0, self._blank * n
            for s in spans:
                chunks.append(work[last:s])
                chunks.append(blank)
                last = s + n
            chunks.append(work[last:])
            work = "".join(chunks)
        found.sort()
        parts: list[str | int] = []
        last = 0
        for s, n in found:
            if s > last:
                parts.append(text[last:s])
            parts.append(self._ids[text[s:s + n]])
            last = s + n
        if last < len(text):
            parts.append(text[last:])
        return parts


# ---- decoding helpers -------------------------------------------------------------------


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (unicode.cpp: unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _piece_table(tokens: list[str], types: np.ndarray, model: str) -> list[bytes]:
    """Each token's bytes as llama.cpp's ``token_to_piece(..., special=false)`` gives them."""
    pieces = [b""] * len(tokens)
    normal = np.flatnonzero(types == NORMAL).tolist()
    if model == "llama":
        for i in normal:
            pieces[i] = tokens[i].replace("\u2581", " ").encode()
        for i in np.flatnonzero(types == BYTE).tolist():
            pieces[i] = bytes([int(tokens[i][3:5], 16)])  # "<0xAB>"
    else:
        # Map the byte alphabet back to latin-1 characters, whose encoding is the byte itself.
        table = str.maketrans({c: chr(b) for b, c in enumerate(_gpt2_byte_chars())})
        for i in normal:
            text = tokens[i].translate(table)
            try:
                pieces[i] = text.encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte alphabet: keep it as is
                pieces[i] = b"".join(c.encode("latin-1") if ord(c) < 256 else c.encode()
                                     for c in text)
    for i in np.flatnonzero(types == USER_DEFINED).tolist():
        pieces[i] = tokens[i].encode()
    return pieces


def _strip_prefix_space(data: list[bytes]) -> list[bytes]:
    # llama_detokenize drops one leading space of the first token's piece (its lstrip); leading
    # control tokens (BOS) are skipped first, as with remove_special.
    for k, piece in enumerate(data):
        if piece:
            if piece.startswith(b" "):
                data = [*data[:k], piece[1:], *data[k + 1:]]
            break
    return data
