"""Calibration and evaluation text: the built-in corpus, and text cut into token sequences.

The built-in corpus is text every Python installation carries (DESIGN.md, "Text"): the
``pydoc_data.topics`` help pages and the docstrings of a fixed list of standard-library modules.
Nothing is downloaded and nothing third-party is read, so two machines with the same Python
build get the same bytes; the identity string names the Python version and the sha256 of the
text pins the exact bytes.

The corpus is a list of *documents* (one help topic, one docstring), deduplicated. Each document
goes to the held-out part or to the calibration part by the sha256 of its own text, so the split
does not depend on order, and the two parts never share a document.

:func:`sequences` turns any text into fixed-length token sequences for a model's tokenizer.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SparsifyError

# Standard-library modules whose docstrings join the corpus, in this order: pure-Python sources
# that every CPython installation carries. They are read from the standard library's directory
# and parsed, never imported, so neither import side effects, nor other packages patching
# modules at run time, nor a same-named file on sys.path can change the text.
STDLIB_MODULES: tuple[str, ...] = (
    "_pydecimal", "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "difflib", "doctest", "email.message", "enum", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "json", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pprint", "queue", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)

# One document in HELDOUT_MODULUS goes to the held-out part (about 20%).
HELDOUT_MODULUS = 5
# Documents are joined with a blank line, as paragraphs are in the sources.
SEPARATOR = "\n\n"
# Docstrings shorter than this are one-liners ("Return self+value."); they add little text.
MIN_DOC_CHARS = 40


@dataclass(frozen=True)
class Corpus:
    """A calibration or held-out text with its identity and the sha256 of its UTF-8 bytes."""

    identity: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _source(modname: str) -> Path | None:
    """The module's source file in the standard library's directory (None if not shipped)."""
    base = Path(sysconfig.get_paths()["stdlib"]) / Path(*modname.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _docstrings(modname: str) -> list[str]:
    """Docstrings of the module, its top-level classes and functions and their methods, in
    source order."""
    path = _source(modname)
    if path is None:
        return []
    tree = ast.parse(path.read_bytes(), filename=str(path))
    nodes: list[ast.AST] = [tree]
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, defs):
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                nodes.extend(n for n in node.body if isinstance(n, defs))
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docs if d]


@functools.cache
def documents() -> tuple[str, ...]:
    """Every document of the built-in corpus, in a fixed order, without duplicates."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    for name in STDLIB_MODULES:
        docs.extend(_docstrings(name))
    seen: set[str] = set()
    out = []
    for d in docs:
        if len(d) >= MIN_DOC_CHARS and d not in seen:
            seen.add(d)
            out.append(d)
    return tuple(out)


def is_heldout(doc: str) -> bool:
    """Whether a document belongs to the held-out part (decided by its own sha256)."""
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_MODULUS == 0


def _identity(part: str) -> str:
    return f"builtin:python-{platform.python_version()}-docs:{part}"


@functools.cache
def calibration() -> Corpus:
    """The calibration part of the built-in corpus."""
    text = SEPARATOR.join(d for d in documents() if not is_heldout(d))
    return Corpus(_identity("calibration"), text)


@functools.cache
def heldout() -> Corpus:
    """The held-out part of the built-in corpus (never overlaps the calibration part)."""
    text = SEPARATOR.join(d for d in documents() if is_heldout(d))
    return Corpus(_identity("heldout"), text)


def calibration_text() -> str:
    """Text of the calibration part of the built-in corpus."""
    return calibration().text


def heldout_text() -> str:
    """Text of the held-out part of the built-in corpus."""
    return heldout().text


def from_file(path: str | Path) -> Corpus:
    """A UTF-8 text file as a corpus; identity ``file:<name>``. SparsifyError if unreadable."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SparsifyError(f"cannot read corpus: {e.strerror}", p) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SparsifyError(f"corpus is not UTF-8 text (byte {e.start})", p) from None
    if not text.strip():
        raise SparsifyError("corpus file is empty", p)
    return Corpus(f"file:{p.name}", text)


# Text is tokenized in pieces of about this many characters, cut after a blank line, so that
# a long corpus never becomes one huge string in the tokenizer and tokenizing can stop early.
_PIECE_CHARS = 1 << 15


def _pieces(text: str) -> list[str]:
    out = []
    start = 0
    while start < len(text):
        end = min(start + _PIECE_CHARS, len(text))
        if end < len(text):
            cut = text.rfind(SEPARATOR, start + 1, end)
            end = cut + len(SEPARATOR) if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def adds_bos(tokenizer) -> bool:
    """Whether the model file asks for a BOS token before each text (``add_bos_token``)."""
    return bool(tokenizer.encode("", add_bos=None))


def sequences(tokenizer, text: str, seq_len: int, n_seq: int | None = None,
              seed: int | None = None) -> np.ndarray:
    """Cut ``text`` into token sequences: int64 array (n_seq, seq_len), row-major.

    The text is tokenized as one stream (without BOS) and cut into consecutive, non-overlapping
    windows. When the file asks for a BOS token (``tokenizer.ggml.add_bos_token``), each row is
    BOS followed by ``seq_len - 1`` text tokens; otherwise ``seq_len`` text tokens. A trailing
    partial window is dropped.

    ``n_seq=None`` takes every window. With ``seed=None`` the first ``n_seq`` windows are taken
    (only as much text as needed is tokenized); with a seed, ``n_seq`` windows are drawn without
    replacement by ``np.random.default_rng(seed)`` and kept in text order.
    Raises SparsifyError when the text holds fewer than ``n_seq`` windows.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if n_seq is not None and n_seq < 1:
        raise ValueError(f"n_seq must be positive, got {n_seq}")
    bos = tokenizer.bos_id if adds_bos(tokenizer) else None
    width = seq_len - (bos is not None)
    stop = None if (n_seq is None or seed is not None) else n_seq * width
    ids: list[int] = []
    for piece in _pieces(text):
        ids.extend(tokenizer.encode(piece, add_bos=False, add_eos=False))
        if stop is not None and len(ids) >= stop:
            break
    available = len(ids) // width
    if n_seq is None:
        n_seq = available
    if available < n_seq or available == 0:
        raise SparsifyError(f"text holds {len(ids)} tokens: {available} sequences of {seq_len}, "
                            f"{n_seq} wanted")
    windows = np.asarray(ids[:available * width], dtype=np.int64).reshape(available, width)
    if seed is not None:
        pick = np.sort(np.random.default_rng(seed).choice(available, n_seq, replace=False))
        windows = windows[pick]
    else:
        windows = windows[:n_seq]
    if bos is not None:
        windows = np.concatenate([np.full((n_seq, 1), bos, dtype=np.int64), windows], axis=1)
    return np.ascontiguousarray(windows)
