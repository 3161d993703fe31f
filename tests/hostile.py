"""Hostile inputs: a corpus of broken GGUF files and threshold tables, made from valid ones.

Every case names what it breaks and what sparsify must say about it. GGUF cases are made from
small synthetic models (:mod:`sparsify.synthetic`) by editing a parsed copy of the file
(:class:`Gguf`) and writing it back, so a case can break one field while every other byte stays
valid; a few cases start from the header of the bundled SmolLM2-135M, written as a sparse file
of the model's size (the header and zeros: no 98 MB copy) or cut short.

A case's ``stage`` is where the problem must surface:

- ``open``: :meth:`GGUFFile.open` refuses the file;
- ``load``: the header parses, :func:`sparsify.loader.load` refuses the model;
- ``tokenizer``: the model loads, building its tokenizer is refused;
- ``weights``: the model loads, reading its weights is refused (NaN, unsupported type);
- ``ok``: a valid file (a control: the corpus must not refuse good files).

Refusals are :class:`SparsifyError` with a one-line message matching ``match`` (a regex).
Nothing here imports pytest; tests and ``scripts/hostile_report.py`` share it.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsify import quants

# GGUF value types (gguf.h: enum gguf_type).
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}
ALIGN = 32

REAL_MODEL = Path("/root/.cache/sparsify/models/SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- a GGUF file as editable parts ------------------------------------------------------

@dataclass
class Raw:
    """Bytes written as they are in place of an encoded value (to break its encoding)."""

    data: bytes


@dataclass
class KV:
    """One metadata entry. ``value`` is a Python value of ``vtype``, ``(etype, items)`` for an
    array (items nested the same way), or :class:`Raw`."""

    key: str | bytes
    vtype: int
    value: Any


@dataclass
class TI:
    """One tensor-info entry; ``dims`` in ggml order (fastest first), ``offset`` relative to the
    data section."""

    name: str | bytes
    dims: list[int]
    qtype: int
    offset: int
    n_dims: int | None = None  # written instead of len(dims) when set


@dataclass
class Gguf:
    """A GGUF file: header fields, metadata, tensor infos, and the data section as bytes."""

    kvs: list[KV]
    tensors: list[TI]
    data: bytearray
    version: int = 3
    magic: bytes = b"GGUF"
    n_tensors: int | None = None  # written instead of len(tensors) when set
    n_kv: int | None = None
    big_endian_header: bool = False
    pad: int = ALIGN  # padding granularity after the tensor infos

    def copy(self) -> Gguf:
        return copy.deepcopy(self)

    # -- metadata
    def get(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, vtype: int, value: Any) -> Gguf:
        for kv in self.kvs:
            if kv.key == key:
                kv.vtype, kv.value = vtype, value
                return self
        self.kvs.append(KV(key, vtype, value))
        return self

    def drop(self, key: str) -> Gguf:
        self.kvs = [kv for kv in self.kvs if kv.key != key]
        return self

    # -- tensors
    def tensor(self, name: str) -> TI:
        return next(t for t in self.tensors if t.name == name)

    def drop_tensor(self, name: str) -> Gguf:
        self.tensors = [t for t in self.tensors if t.name != name]
        return self

    def nbytes(self, t: TI) -> int:
        return quants.nbytes(t.qtype, tuple(reversed(t.dims)))

    def values(self, name: str) -> np.ndarray:
        """A writable float32 view of an F32 tensor's data, ggml order flattened."""
        t = self.tensor(name)
        assert t.qtype == 0, "values() needs an F32 tensor"
        return np.frombuffer(self.data, dtype="<f4", count=math.prod(t.dims),
                             offset=t.offset)

    def relayout(self, new: dict[str, tuple[int, list[int], bytes]] | None = None) -> Gguf:
        """Rebuild the data section with every tensor at the next aligned offset, replacing the
        (qtype, dims, bytes) of the tensors in ``new``."""
        new = new or {}
        parts, off = [], 0
        for t in self.tensors:
            if t.name in new:
                t.qtype, t.dims, blob = new[t.name][0], list(new[t.name][1]), new[t.name][2]
            else:
                blob = bytes(self.data[t.offset:t.offset + self.nbytes(t)])
            off = -(-off // self.pad) * self.pad
            parts.append((off, blob))
            t.offset = off
            off += len(blob)
        data = bytearray(-(-off // self.pad) * self.pad)
        for o, blob in parts:
            data[o:o + len(blob)] = blob
        self.data = data
        return self

    # -- bytes
    def encode(self) -> tuple[bytes, list[tuple[int, int, str]]]:
        """The file's bytes and the header's numeric fields as (offset, size, what)."""
        w = _Writer()
        w.raw(self.magic)
        if self.big_endian_header:
            w.put(">I", self.version, "version")
            w.put(">Q", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                  "n_tensors")
            w.put(">Q", len(self.kvs) if self.n_kv is None else self.n_kv, "n_kv")
        else:
            w.put("<I", self.version, "version")
            w.put("<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                  "n_tensors")
            w.put("<Q", len(self.kvs) if self.n_kv is None else self.n_kv, "n_kv")
        for kv in self.kvs:
            w.string(kv.key, "key length")
            w.put("<I", kv.vtype, "value type")
            w.value(kv.vtype, kv.value)
        for t in self.tensors:
            w.string(t.name, "name length")
            w.put("<I", len(t.dims) if t.n_dims is None else t.n_dims, "n_dims")
            for d in t.dims:
                w.put("<Q", d, "dim")
            w.put("<I", t.qtype, "tensor type")
            w.put("<Q", t.offset, "tensor offset")
        w.fields.append((len(w.buf), -len(w.buf) % self.pad, "padding"))
        w.raw(bytes(-len(w.buf) % self.pad))
        w.raw(bytes(self.data))
        return bytes(w.buf), w.fields

    def to_bytes(self) -> bytes:
        return self.encode()[0]


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.fields: list[tuple[int, int, str]] = []

    def raw(self, b: bytes) -> None:
        self.buf += b

    def put(self, fmt: str, v: Any, what: str) -> None:
        self.fields.append((len(self.buf), struct.calcsize(fmt), what))
        self.buf += struct.pack(fmt, v)

    def string(self, s: str | bytes | Raw, what: str) -> None:
        if isinstance(s, Raw):
            self.raw(s.data)
            return
        b = s.encode("utf-8") if isinstance(s, str) else s
        self.put("<Q", len(b), what)
        self.raw(b)

    def value(self, vtype: int, v: Any) -> None:
        if isinstance(v, Raw):
            self.raw(v.data)
        elif vtype in _FMT:
            self.put(_FMT[vtype], v, "scalar")
        elif vtype == STR:
            self.string(v, "string length")
        elif vtype == ARR:
            etype, items = v
            self.put("<I", etype, "array type")
            self.put("<Q", len(items), "array count")
            for x in items:
                self.value(etype, x)
        else:
            raise ValueError(f"cannot encode value type {vtype}")


def parse(data: bytes) -> Gguf:
    """Parse a valid little-endian GGUF file into parts (trusted input: no checks)."""
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(vtype: int) -> Any:
        if vtype in _FMT:
            return take(_FMT[vtype])
        if vtype == STR:
            return string()
        etype, n = take("<I"), take("<Q")
        return (etype, [value(etype) for _ in range(n)])

    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kvs = []
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        kvs.append(KV(key, vtype, value(vtype)))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        nd = take("<I")
        dims = [take("<Q") for _ in range(nd)]
        tensors.append(TI(name, dims, take("<I"), take("<Q")))
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), ALIGN)
    start = -(-pos // align) * align
    return Gguf(kvs, tensors, bytearray(data[start:]), version=version, pad=align)


def header_prefix(path: Path) -> tuple[Gguf, int]:
    """Parse only the header of a (large) GGUF file: its parts with an empty data section, and
    the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 << 20)  # SmolLM2's header is 1.8 MB (49152 tokens and merges)
    g = parse(head)
    g.data = bytearray()
    return g, size


# ---- the bases --------------------------------------------------------------------------

@dataclass
class Bases:
    """Valid files the cases are made from, parsed once."""

    mini: Gguf  # 1 block, d_model 8, F32: 27 KB
    wide: Gguf  # 1 block, d_model 256, F16: rows long enough for 256-element quant blocks
    real: Gguf | None = None  # SmolLM2-135M's header, data section empty
    real_size: int = 0


def mini_spec(**changes):
    from sparsify.synthetic import preset

    return preset("tiny", n_layer=1, d_model=8, n_head=2, n_head_kv=1, d_ff=8,
                  vocab_size=278, **changes)


def wide_spec(**changes):
    from sparsify.synthetic import preset

    return preset("tiny", n_layer=1, d_model=256, n_head=4, n_head_kv=2, d_ff=256,
                  dtype="f16", **changes)


def make_bases(workdir: Path, real: Path | None = REAL_MODEL) -> Bases:
    """Write the synthetic bases under ``workdir`` and parse them, and the header of the real
    model at ``real`` (None or a missing file: no real-model cases)."""
    from sparsify.synthetic import write_synthetic_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    mini = parse(write_synthetic_gguf(workdir / "base-mini.gguf", mini_spec(), threads=1)
                 .read_bytes())
    wide = parse(write_synthetic_gguf(workdir / "base-wide.gguf", wide_spec(), threads=1)
                 .read_bytes())
    b = Bases(mini, wide)
    if real is not None and Path(real).exists():
        b.real, b.real_size = header_prefix(Path(real))
    return b


# ---- cases ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One hostile input: how to make it from the bases and what sparsify must do with it."""

    id: str
    group: str
    stage: str  # open | load | tokenizer | weights | ok
    match: str  # regex the one-line error must contain ("" for ok)
    make: Callable[[Bases], bytes | tuple[bytes, int]] = field(repr=False)
    bomb: bool = False  # a small file claiming a huge count or length
    base: str = "mini"  # mini | wide | real

    def write(self, bases: Bases, path: Path) -> Path:
        """Write the case's file at ``path``. A (bytes, size) result becomes a sparse file
        of ``size`` bytes that starts with ``bytes``."""
        out = self.make(bases)
        if isinstance(out, tuple):
            head, size = out
            with open(path, "wb") as f:
                f.write(head)
                f.truncate(size)
        else:
            path.write_bytes(out)
        return path


def _edit(fn: Callable[[Gguf], Any], base: str = "mini") -> Callable[[Bases], bytes]:
    def make(b: Bases) -> bytes:
        g = getattr(b, base).copy()
        fn(g)
        return g.to_bytes()
    return make


def _cut(at: Callable[[Gguf], int]) -> Callable[[Bases], bytes]:
    def make(b: Bases) -> bytes:
        data, _ = b.mini.encode()
        return data[:at(b.mini)]
    return make


def _section(g: Gguf) -> dict[str, int]:
    """Byte offsets of the sections of ``g``'s encoding."""
    data, fields = g.encode()
    first_tensor = next(o for o, _, w in fields if w == "name length")
    padding = next(o for o, _, w in fields if w == "padding")
    return {"kv_start": 24, "kv_end": first_tensor, "ti_start": first_tensor,
            "ti_end": padding, "data_start": len(data) - len(g.data), "size": len(data)}


def _real(fn: Callable[[Gguf], Any] | None = None, cut: int | None = None,
          sparse: bool = False) -> Callable[[Bases], bytes | tuple[bytes, int]]:
    """A case from SmolLM2's header: edited by ``fn``, then cut after ``cut`` bytes of the
    header, or written as a sparse file of the model's size (zeros for data)."""
    def make(b: Bases) -> bytes | tuple[bytes, int]:
        if b.real is None:
            raise FileNotFoundError(REAL_MODEL)
        g = b.real.copy()
        if fn is not None:
            fn(g)
        head = g.to_bytes()
        if sparse:
            return head, max(b.real_size + len(head) - len(b.real.to_bytes()), len(head))
        return head[:cut] if cut is not None else head
    return make


def _set_u64_field(what: str, value: int, index: int = 0) -> Callable[[Gguf], bytes]:
    """Bytes of the base with the index-th header field named ``what`` overwritten."""
    def make(b: Bases) -> bytes:
        data, fields = b.mini.encode()
        off, size, _ = [f for f in fields if f[2] == what][index]
        out = bytearray(data)
        out[off:off + size] = value.to_bytes(size, "little")
        return bytes(out)
    return make


def _nan_in(name: str, where: str = "first", value: float = math.nan) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        v = g.values(name)
        if where == "first":
            v[0] = value
        elif where == "last":
            v[-1] = value
        else:  # one value per row
            row = g.tensor(name).dims[0]
            v[::row] = value
    return edit


def _f16_nan(name: str) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        t = g.tensor(name)
        assert t.qtype == 1
        g.data[t.offset + 6:t.offset + 8] = np.float16(np.nan).tobytes()
    return edit


def _quantized(name: str, qtype: int, nan_scale: bool = False) -> Callable[[Gguf], None]:
    """Re-store an F16 tensor of ``g`` as ``qtype`` (gguf-py's quantizer; for Q8_0) or as
    zero bytes of the right size (for types we cannot decode)."""
    def edit(g: Gguf) -> None:
        t = g.tensor(name)
        shape = tuple(reversed(t.dims))
        if qtype == 8:
            import gguf

            w = np.frombuffer(g.data, "<f2", math.prod(t.dims), t.offset).astype(np.float32)
            blob = bytearray(gguf.quants.quantize(w.reshape(shape),
                                                  gguf.GGMLQuantizationType.Q8_0).tobytes())
            if nan_scale:
                blob[34 * 3:34 * 3 + 2] = np.float16(np.nan).tobytes()  # 4th block's scale
        else:
            blob = bytes(quants.nbytes(qtype, shape))
        g.relayout({name: (qtype, t.dims, bytes(blob))})
    return edit


def _dims(name: str, dims: list[int], n_dims: int | None = None) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        t = g.tensor(name)
        t.dims, t.n_dims = dims, n_dims
    return edit


def _tokens(edit_tokens: Callable[[list[str]], Any]) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        kv = g.get("tokenizer.ggml.tokens")
        edit_tokens(kv.value[1])
    return edit


def _chain(*fns: Callable[[Gguf], Any]) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        for fn in fns:
            fn(g)
    return edit


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


BIG = (1 << 63) - 1
HUGE = (1 << 64) - 1


def gguf_cases() -> list[Case]:
    """Every hostile GGUF case; ids are unique."""
    sec = _section
    cases = [
        # -- truncation at many offsets: header, metadata, tensor infos, padding, data
        Case("cut-empty", "truncation", "open", r"bad magic|empty", _cut(lambda g: 0)),
        Case("cut-in-magic", "truncation", "open", r"truncated GGUF file: 2 bytes",
             _cut(lambda g: 2)),
        Case("cut-in-version", "truncation", "open", r"truncated GGUF file: 6 bytes",
             _cut(lambda g: 6)),
        Case("cut-in-tensor-count", "truncation", "open", r"truncated GGUF file: 12 bytes",
             _cut(lambda g: 12)),
        Case("cut-in-kv-count", "truncation", "open", r"truncated GGUF file: 20 bytes",
             _cut(lambda g: 20)),
        Case("cut-after-header", "truncation", "open", r"metadata entries cannot fit",
             _cut(lambda g: 24)),
        Case("cut-in-first-key", "truncation", "open", r"truncated|cannot fit",
             _cut(lambda g: 24 + 8 + 5)),
        Case("cut-in-token-list", "truncation", "open", r"truncated|cannot fit",
             _cut(lambda g: sec(g)["kv_start"] + (sec(g)["kv_end"] - sec(g)["kv_start"]) // 2)),
        Case("cut-at-kv-end", "truncation", "open", r"truncated|cannot fit",
             _cut(lambda g: sec(g)["kv_end"])),
        Case("cut-in-tensor-infos", "truncation", "open", r"truncated GGUF file",
             _cut(lambda g: (sec(g)["ti_start"] + sec(g)["data_start"]) // 2)),
        Case("cut-in-padding", "truncation", "open", r"truncated GGUF file: tensor",
             _cut(lambda g: sec(g)["data_start"] - 1)),
        Case("cut-at-data-start", "truncation", "open", r"truncated GGUF file: tensor",
             _cut(lambda g: sec(g)["data_start"])),
        Case("cut-in-data", "truncation", "open", r"truncated GGUF file: tensor",
             _cut(lambda g: (sec(g)["data_start"] + sec(g)["size"]) // 2)),
        Case("cut-last-byte", "truncation", "open", r"truncated GGUF file: tensor blk\.0\.",
             _cut(lambda g: sec(g)["size"] - 1)),

        # -- magic and version
        Case("magic-ggml", "magic/version", "open", r"not a GGUF file \(bad magic\)",
             _edit(lambda g: setattr(g, "magic", b"GGML"))),
        Case("magic-zip", "magic/version", "open", r"not a GGUF file",
             _edit(lambda g: setattr(g, "magic", b"PK\x03\x04"))),
        Case("magic-lowercase", "magic/version", "open", r"not a GGUF file",
             _edit(lambda g: setattr(g, "magic", b"gguf"))),
        Case("version-0", "magic/version", "open", r"unsupported GGUF version 0",
             _edit(lambda g: setattr(g, "version", 0))),
        Case("version-1", "magic/version", "open", r"unsupported GGUF version 1\b",
             _edit(lambda g: setattr(g, "version", 1))),
        Case("version-4", "magic/version", "open", r"unsupported GGUF version 4",
             _edit(lambda g: setattr(g, "version", 4))),
        Case("version-max", "magic/version", "open", r"unsupported GGUF version 4294967295",
             _edit(lambda g: setattr(g, "version", 0xFFFFFFFF))),
        Case("big-endian", "magic/version", "open", r"big-endian",
             _edit(lambda g: setattr(g, "big_endian_header", True))),
        Case("version-2", "magic/version", "ok", "",
             _edit(lambda g: setattr(g, "version", 2))),

        # -- absurd counts and lengths (must be refused before allocating)
        Case("n-tensors-2^63", "counts", "open", r"tensor count\) cannot fit",
             _edit(lambda g: setattr(g, "n_tensors", BIG)), bomb=True),
        Case("n-tensors-2^64-1", "counts", "open", r"tensor count\) cannot fit",
             _edit(lambda g: setattr(g, "n_tensors", HUGE)), bomb=True),
        Case("n-kv-2^63", "counts", "open", r"metadata entries cannot fit",
             _edit(lambda g: setattr(g, "n_kv", 1 << 63)), bomb=True),
        Case("n-kv-plus-one", "counts", "open", r".",
             _edit(lambda g: setattr(g, "n_kv", len(g.kvs) + 1))),
        Case("n-kv-minus-one", "counts", "open", r".",
             _edit(lambda g: setattr(g, "n_kv", len(g.kvs) - 1))),
        Case("n-tensors-plus-one", "counts", "open", r"tensor +has 0 dimensions",
             _edit(lambda g: setattr(g, "n_tensors", len(g.tensors) + 1))),
        Case("n-tensors-minus-one", "counts", "load", r"missing tensor blk\.0\.ffn_down",
             _edit(lambda g: setattr(g, "n_tensors", len(g.tensors) - 1))),
        Case("key-length-2^63", "counts", "open", r"truncated GGUF file: key of metadata",
             _set_u64_field("key length", BIG), bomb=True),
        Case("key-length-2^64-1", "counts", "open", r"truncated GGUF file: key of metadata",
             _set_u64_field("key length", HUGE, index=3), bomb=True),
        Case("string-value-length-2^63", "counts", "open", r"truncated GGUF file: general\.name",
             _set_u64_field("string length", BIG, index=1), bomb=True),
        Case("token-count-2^62", "counts", "open", r"tokenizer\.ggml\.tokens",
             _edit(lambda g: g.get("tokenizer.ggml.tokens").__setattr__(
                 "value", Raw(struct.pack("<IQ", STR, 1 << 62) + _u64(1) + b"a"))), bomb=True),
        Case("token-length-2^63", "counts", "open", r"tokenizer\.ggml\.tokens\[0\]",
             _edit(lambda g: g.get("tokenizer.ggml.tokens").__setattr__(
                 "value", Raw(struct.pack("<IQ", STR, 2) + _u64(BIG) + b"a"))), bomb=True),
        Case("int-array-count-2^62", "counts", "open", r"tokenizer\.ggml\.token_type",
             _edit(lambda g: g.get("tokenizer.ggml.token_type").__setattr__(
                 "value", Raw(struct.pack("<IQ", I32, 1 << 62)))), bomb=True),
        Case("nested-array-count-2^60", "counts", "open", r"test\.nested: arrays of arrays",
             _edit(lambda g: g.set("test.nested", ARR, Raw(struct.pack("<IQ", ARR, 1 << 60)))),
             bomb=True),
        Case("arrays-of-arrays", "counts", "open", r"test\.nested: arrays of arrays",
             _edit(lambda g: g.set("test.nested", ARR, (ARR, [(U8, [1]), (U8, [])])))),
        Case("tensor-name-length-2^63", "counts", "open", r"truncated GGUF file: name of tensor",
             _set_u64_field("name length", BIG, index=2), bomb=True),
        Case("n-dims-2^31", "counts", "open", r"has 2147483648 dimensions",
             _edit(_dims("blk.0.ffn_up.weight", [8, 8], n_dims=1 << 31)), bomb=True),
        Case("dim-2^63", "counts", "open", r"impossible shape",
             _edit(_dims("blk.0.ffn_up.weight", [8, BIG])), bomb=True),
        Case("dims-product-2^78", "counts", "open", r"truncated GGUF file: tensor blk\.0\.ffn_up",
             _edit(_dims("blk.0.ffn_up.weight", [1 << 39, 1 << 39])), bomb=True),
        Case("unknown-value-type", "counts", "open", r"unknown value type 13",
             _edit(lambda g: g.set("test.odd", 13, Raw(b"")))),
        Case("unknown-array-type", "counts", "open", r"unknown array element type 99",
             _edit(lambda g: g.set("test.odd", ARR, Raw(struct.pack("<IQ", 99, 1))))),

        # -- duplicates
        Case("duplicate-key", "duplicates", "open", r"duplicate metadata key llama\.block_count",
             _edit(lambda g: g.kvs.append(KV("llama.block_count", U32, 1)))),
        Case("duplicate-tensor-escape-name", "duplicates", "open", r"duplicate tensor name",
             _edit(lambda g: g.tensors.extend([TI("\x1b[2J\x07", [8], 0, 0)] * 2))),
        Case("duplicate-tensor", "duplicates", "open",
             r"duplicate tensor name blk\.0\.ffn_up\.weight",
             _edit(lambda g: g.tensors.append(copy.deepcopy(g.tensor("blk.0.ffn_up.weight"))))),

        # -- offsets and alignment
        Case("offset-past-end", "offsets", "open", r"truncated GGUF file: tensor blk\.0\.ffn_down",
             _edit(lambda g: setattr(g.tensor("blk.0.ffn_down.weight"), "offset",
                                     len(g.data) + 1024))),
        Case("offset-2^64-32", "offsets", "open", r"truncated GGUF file: tensor blk\.0\.ffn_down",
             _edit(lambda g: setattr(g.tensor("blk.0.ffn_down.weight"), "offset", HUGE - 31))),
        Case("offsets-overlap", "offsets", "open", r"overlap",
             _edit(lambda g: setattr(g.tensor("blk.0.ffn_down.weight"), "offset",
                                     g.tensor("blk.0.ffn_up.weight").offset))),
        Case("offsets-overlap-partly", "offsets", "open", r"overlap",
             _edit(lambda g: setattr(g.tensor("blk.0.ffn_down.weight"), "offset",
                                     g.tensor("blk.0.ffn_up.weight").offset + 128))),
        Case("offset-unaligned", "offsets", "open", r"not a multiple of the alignment 32",
             _edit(lambda g: setattr(g.tensor("blk.0.ffn_up.weight"), "offset",
                                     g.tensor("blk.0.ffn_up.weight").offset + 4))),
        Case("alignment-0", "offsets", "open", r"general\.alignment must be a power of two",
             _edit(lambda g: g.set("general.alignment", U32, 0))),
        Case("alignment-3", "offsets", "open", r"general\.alignment must be a power of two",
             _edit(lambda g: g.set("general.alignment", U32, 3))),
        Case("alignment-2^31", "offsets", "open", r"general\.alignment must be a power of two",
             _edit(lambda g: g.set("general.alignment", U32, 1 << 31))),
        Case("alignment-string", "offsets", "open", r"general\.alignment must be a power of two",
             _edit(lambda g: g.set("general.alignment", STR, "32"))),
        Case("alignment-float", "offsets", "open", r"general\.alignment must be a power of two",
             _edit(lambda g: g.set("general.alignment", F32, 32.0))),
        Case("alignment-64", "offsets", "ok", "",
             _edit(lambda g: (g.set("general.alignment", U32, 64), setattr(g, "pad", 64),
                              g.relayout()))),

        # -- tensor types
        Case("type-id-255", "types", "open", r"blk\.0\.attn_q\.weight: unknown tensor type id 255",
             _edit(lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype", 255))),
        Case("type-id-retired-4", "types", "open", r"unknown tensor type id 4\b",
             _edit(lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype", 4))),
        Case("type-id-2^32-1", "types", "open", r"unknown tensor type id 4294967295",
             _edit(lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype", 0xFFFFFFFF))),
        Case("type-block-mismatch", "types", "open", r"not a multiple of its block size 32",
             _edit(lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype", 2))),
        Case("type-iq2-xxs", "types", "weights", r"blk\.0\.ffn_gate\.weight.*IQ2_XXS",
             _edit(_quantized("blk.0.ffn_gate.weight", 16), "wide"), base="wide"),
        Case("type-q8-k", "types", "weights", r"blk\.0\.ffn_up\.weight.*Q8_K",
             _edit(_quantized("blk.0.ffn_up.weight", 15), "wide"), base="wide"),
        Case("type-q8-0", "types", "ok", "",
             _edit(_quantized("blk.0.ffn_up.weight", 8), "wide"), base="wide"),

        # -- architecture and keys
        Case("arch-unknown", "keys", "load", r"unsupported architecture 'mamba'",
             _edit(lambda g: g.set("general.architecture", STR, "mamba"))),
        Case("arch-missing", "keys", "load", r"missing key general\.architecture",
             _edit(lambda g: g.drop("general.architecture"))),
        Case("arch-int", "keys", "load", r"general\.architecture should be a string",
             _edit(lambda g: g.set("general.architecture", U32, 1))),
        Case("block-count-missing", "keys", "load", r"missing key llama\.block_count",
             _edit(lambda g: g.drop("llama.block_count"))),
        Case("embedding-length-missing", "keys", "load", r"missing key llama\.embedding_length",
             _edit(lambda g: g.drop("llama.embedding_length"))),
        Case("head-count-missing", "keys", "load", r"missing key llama\.attention\.head_count",
             _edit(lambda g: g.drop("llama.attention.head_count"))),
        Case("eps-missing", "keys", "load", r"missing key llama\.attention\.layer_norm_rms",
             _edit(lambda g: g.drop("llama.attention.layer_norm_rms_epsilon"))),
        Case("block-count-string", "keys", "load", r"llama\.block_count should be an integer",
             _edit(lambda g: g.set("llama.block_count", STR, "1"))),
        Case("embedding-length-float", "keys", "load",
             r"llama\.embedding_length should be an integer",
             _edit(lambda g: g.set("llama.embedding_length", F32, 8.0))),
        Case("head-count-0", "keys", "load", r"attention\.head_count has an impossible value 0",
             _edit(lambda g: g.set("llama.attention.head_count", U32, 0))),
        Case("head-count-kv-3", "keys", "load", r"not a multiple of head_count_kv",
             _edit(lambda g: g.set("llama.attention.head_count_kv", U32, 3))),
        Case("head-count-kv-string", "keys", "load", r"head_count_kv",
             _edit(lambda g: g.set("llama.attention.head_count_kv", STR, "1"))),
        Case("block-count-2^32-1", "keys", "load", r"block_count has an impossible value",
             _edit(lambda g: g.set("llama.block_count", U32, 0xFFFFFFFF))),
        Case("block-count-2", "keys", "load", r"missing tensor blk\.1\.attn_norm\.weight",
             _edit(lambda g: g.set("llama.block_count", U32, 2))),
        Case("head-count-16", "keys", "load", r"head_count|head width|head_dim",
             _edit(lambda g: g.set("llama.attention.head_count", U32, 16))),
        Case("key-length-string", "keys", "load", r"llama\.attention\.key_length",
             _edit(lambda g: g.set("llama.attention.key_length", STR, "4"))),
        Case("key-length-0", "keys", "load", r"llama\.attention\.key_length",
             _edit(lambda g: g.set("llama.attention.key_length", U32, 0))),
        Case("context-length-string", "keys", "load", r"llama\.context_length",
             _edit(lambda g: g.set("llama.context_length", STR, "many"))),
        Case("context-length-0", "keys", "load", r"llama\.context_length",
             _edit(lambda g: g.set("llama.context_length", U32, 0))),
        Case("rope-base-string", "keys", "load", r"llama\.rope\.freq_base",
             _edit(lambda g: g.set("llama.rope.freq_base", STR, "1e4"))),
        Case("rope-base-nan", "keys", "load", r"llama\.rope\.freq_base",
             _edit(lambda g: g.set("llama.rope.freq_base", F32, math.nan))),
        Case("rope-base-negative", "keys", "load", r"llama\.rope\.freq_base",
             _edit(lambda g: g.set("llama.rope.freq_base", F32, -10000.0))),
        Case("rope-dim-odd", "keys", "load", r"llama\.rope\.dimension_count",
             _edit(lambda g: g.set("llama.rope.dimension_count", U32, 3))),
        Case("rope-dim-too-big", "keys", "load", r"llama\.rope\.dimension_count",
             _edit(lambda g: g.set("llama.rope.dimension_count", U32, 64))),
        Case("eps-nan", "keys", "load", r"layer_norm_rms_epsilon",
             _edit(lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32, math.nan))),
        Case("eps-negative", "keys", "load", r"layer_norm_rms_epsilon",
             _edit(lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32, -1.0))),
        Case("eps-string", "keys", "load", r"layer_norm_rms_epsilon should be a number",
             _edit(lambda g: g.set("llama.attention.layer_norm_rms_epsilon", STR, "1e-5"))),
        Case("rope-scaling-yarn", "keys", "load", r"unsupported rope scaling 'yarn'",
             _edit(lambda g: g.set("llama.rope.scaling.type", STR, "yarn"))),
        Case("rope-scaling-factor-string", "keys", "load", r"rope\.scaling\.factor",
             _edit(lambda g: (g.set("llama.rope.scaling.type", STR, "linear"),
                              g.set("llama.rope.scaling.factor", STR, "2")))),
        Case("vocab-longer-than-embedding", "keys", "load", r"tokenizer\.ggml\.tokens",
             _edit(_chain(_tokens(lambda t: t.extend(["<extra_a>", "<extra_b>"])),
                          lambda g: g.get("tokenizer.ggml.token_type").value[1].extend([1, 1])))),
        Case("tokens-not-a-list", "keys", "tokenizer", r"tokenizer\.ggml\.tokens",
             _edit(lambda g: g.set("tokenizer.ggml.tokens", U32, 5))),
        Case("tokenizer-model-unknown", "keys", "tokenizer", r"unsupported tokenizer model",
             _edit(lambda g: g.set("tokenizer.ggml.model", STR, "wordpiece"))),
        # llama.cpp keeps its default BOS when the file's id is out of range; so do we.
        Case("bos-id-out-of-range", "keys", "ok", "",
             _edit(lambda g: g.set("tokenizer.ggml.bos_token_id", U32, 1 << 30))),
        Case("bos-id-array", "keys", "tokenizer", r"bad tokenizer metadata",
             _edit(lambda g: g.set("tokenizer.ggml.bos_token_id", ARR, (U32, [1, 2])))),
        Case("rope-scaling-type-array", "keys", "load", r"rope\.scaling\.type should be a str",
             _edit(lambda g: g.set("llama.rope.scaling.type", ARR, (U8, [1, 2])))),
        Case("merges-not-strings", "keys", "tokenizer", r"bad tokenizer metadata",
             _edit(lambda g: g.set("tokenizer.ggml.merges", ARR, (I32, [1, 2, 3])))),
        Case("unknown-key-extra", "keys", "ok", "",
             _edit(lambda g: g.set("vendor.private\x00key", ARR, (F64, [math.nan, 1.0])))),

        # -- tensors: missing, extra, wrong shapes, dims
        Case("tensor-missing", "tensors", "load", r"missing tensor blk\.0\.ffn_down\.weight",
             _edit(lambda g: g.drop_tensor("blk.0.ffn_down.weight"))),
        Case("token-embd-missing", "tensors", "load", r"missing tensor token_embd\.weight",
             _edit(lambda g: g.drop_tensor("token_embd.weight"))),
        Case("shape-transposed", "tensors", "load",
             r"blk\.0\.attn_k\.weight has shape \[8, 4\], expected \[4, 8\]",
             _edit(_dims("blk.0.attn_k.weight", [4, 8]))),
        Case("shape-1d", "tensors", "load", r"tensor blk\.0\.ffn_gate\.weight has shape \[64\]",
             _edit(_dims("blk.0.ffn_gate.weight", [64]))),
        Case("shape-extra-dim", "tensors", "load", r"blk\.0\.attn_q\.weight has shape",
             _edit(_dims("blk.0.attn_q.weight", [8, 8, 1]))),
        Case("embedding-1d", "tensors", "load", r"token_embd\.weight has shape",
             _edit(_dims("token_embd.weight", [8 * 278]))),
        Case("n-dims-0", "tensors", "open", r"has 0 dimensions",
             _edit(_dims("blk.0.ffn_up.weight", [], n_dims=0))),
        Case("n-dims-9", "tensors", "open", r"has 9 dimensions",
             _edit(_dims("blk.0.ffn_up.weight", [8, 8, 1, 1, 1, 1, 1, 1, 1]))),
        Case("n-dims-5", "tensors", "open", r"has 5 dimensions",
             _edit(_dims("blk.0.ffn_up.weight", [8, 8, 1, 1, 1]))),
        Case("dim-zero", "tensors", "open", r"impossible shape \[8, 0\]",
             _edit(_dims("blk.0.ffn_up.weight", [8, 0]))),
        Case("tensor-extra", "tensors", "ok", "",
             _edit(lambda g: (g.tensors.append(TI("vendor.extra", [8], 0, len(g.data))),
                              g.data.extend(bytes(32))))),
        Case("output-tied", "tensors", "ok", "",
             _edit(lambda g: (g.drop_tensor("output.weight"), g.relayout()))),

        # -- non-finite weights
        Case("nan-ffn-down", "non-finite", "weights", r"blk\.0\.ffn_down\.weight.*NaN",
             _edit(_nan_in("blk.0.ffn_down.weight"))),
        Case("inf-attn-norm", "non-finite", "weights", r"blk\.0\.attn_norm\.weight.*inf",
             _edit(_nan_in("blk.0.attn_norm.weight", value=math.inf))),
        Case("neg-inf-ffn-norm", "non-finite", "weights", r"blk\.0\.ffn_norm\.weight.*inf",
             _edit(_nan_in("blk.0.ffn_norm.weight", "last", -math.inf))),
        Case("nan-token-embd", "non-finite", "weights", r"token_embd\.weight.*NaN",
             _edit(_nan_in("token_embd.weight", "rows"))),
        Case("nan-f16", "non-finite", "weights", r"blk\.0\.attn_v\.weight.*NaN",
             _edit(_f16_nan("blk.0.attn_v.weight"), "wide"), base="wide"),
        Case("nan-q8-0-scale", "non-finite", "weights", r"blk\.0\.ffn_up\.weight.*NaN",
             _edit(_quantized("blk.0.ffn_up.weight", 8, nan_scale=True), "wide"), base="wide"),
        Case("huge-finite-weights", "non-finite", "ok", "",
             _edit(lambda g: g.values("blk.0.ffn_up.weight").__setitem__(
                 slice(None), np.float32(3e38)))),
    ]
    cases += [
        # -- from the real SmolLM2-135M header
        Case("real-header-only", "real model", "open",
             r"truncated GGUF file: tensor token_embd\.weight", _real(), base="real"),
        Case("real-cut-in-tokens", "real model", "open", r"tokenizer\.ggml\.tokens",
             _real(cut=200_000), base="real"),
        Case("real-cut-in-tensor-infos", "real model", "open", r"truncated GGUF file",
             _real(cut=1_780_000), base="real"),
        Case("real-n-tensors-2^63", "real model", "open", r"tensor count\) cannot fit",
             _real(lambda g: setattr(g, "n_tensors", BIG), sparse=True), bomb=True,
             base="real"),
        Case("real-type-id-200", "real model", "open", r"unknown tensor type id 200",
             _real(lambda g: setattr(g.tensors[0], "qtype", 200), sparse=True), base="real"),
        Case("real-token-count-2^62", "real model", "open", r"tokenizer\.ggml\.tokens",
             _real(lambda g: setattr(g.get("tokenizer.ggml.tokens"), "value",
                                     Raw(struct.pack("<IQ", STR, 1 << 62)))), bomb=True,
             base="real"),
        Case("real-arch-mamba", "real model", "load", r"unsupported architecture 'mamba'",
             _real(lambda g: g.set("general.architecture", STR, "mamba"), sparse=True),
             base="real"),
        Case("real-block-count-31", "real model", "load", r"missing tensor blk\.30\.",
             _real(lambda g: g.set("llama.block_count", U32, 31), sparse=True), base="real"),
        Case("real-sparse-zeros", "real model", "ok", "", _real(sparse=True), base="real"),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


# ---- threshold tables ---------------------------------------------------------------------

def valid_table(loaded, rng: np.random.Generator, levels: tuple[float, ...] | None = None):
    """A valid :class:`ThresholdTable` for ``loaded``: random non-decreasing float32 thresholds
    on ``levels`` (default: profile's grid), no allocations."""
    from sparsify.table import DEFAULT_LEVELS, SCHEMA_VERSION, ThresholdTable, fingerprint

    levels = DEFAULT_LEVELS if levels is None else levels
    th = {}
    for n in loaded.cfg.projection_names:
        steps = rng.exponential(0.05, size=len(levels)).astype(np.float32)
        steps[0] = 0.0
        th[n] = [float(str(v)) for v in np.cumsum(steps, dtype=np.float32)]
    prov = {"corpus": "file:hostile.txt", "corpus_sha256": "0" * 64, "tokens": 256,
            "seq_len": 32, "seed": 0, "sparsify_version": "0.1.0"}
    return ThresholdTable(SCHEMA_VERSION, fingerprint(loaded), prov, "magnitude",
                          list(levels), th, {})


@dataclass(frozen=True)
class TableCase:
    """One hostile table: made from a valid table's JSON text and parsed dict.

    ``stage``: ``load`` (ThresholdTable.load refuses it), ``check`` (it loads, but checking it
    against the model it was made for refuses it), ``ok`` (a control)."""

    id: str
    group: str
    stage: str
    match: str
    make: Callable[[str, dict, dict], bytes] = field(repr=False)
    # make(text, parsed, others): others holds "f16" and "other" (the texts of valid tables
    # for a model of another quantization and one of other weights)


def _j(edit: Callable[[dict], Any]) -> Callable[[str, dict, dict], bytes]:
    def make(text: str, d: dict, others: dict) -> bytes:
        d = copy.deepcopy(d)
        edit(d)
        return json.dumps(d).encode()  # json writes NaN and Infinity literals as Python does
    return make


def _t(fn: Callable[[str], str | bytes]) -> Callable[[str, dict, dict], bytes]:
    def make(text: str, d: dict, others: dict) -> bytes:
        out = fn(text)
        return out.encode() if isinstance(out, str) else out
    return make


def _first(d: dict) -> str:
    return min(d["thresholds"])


def _fp_from(key: str) -> Callable[[str, dict, dict], bytes]:
    def make(text: str, d: dict, others: dict) -> bytes:
        d = copy.deepcopy(d)
        d["fingerprint"] = json.loads(others[key])["fingerprint"]
        return json.dumps(d).encode()
    return make


TABLE_CAP_PROBE = 50 << 20  # the 50 MB table


def _huge(text: str) -> bytes:
    # A 50 MB file that is valid JSON up to its size: the table, then spaces.
    return text.encode() + b" " * (TABLE_CAP_PROBE - len(text))


def table_cases() -> list[TableCase]:
    """Every hostile table case; ids are unique."""
    T = TableCase
    cases = [
        T("cut-1-byte", "truncation", "load", r"invalid JSON.*truncated", _t(lambda s: s[:1])),
        T("cut-half", "truncation", "load", r"invalid JSON.*truncated",
          _t(lambda s: s[:len(s) // 2])),
        T("cut-last-brace", "truncation", "load", r"invalid JSON.*truncated",
          _t(lambda s: s.rstrip()[:-1])),
        T("empty", "truncation", "load", r"invalid JSON", _t(lambda s: "")),
        T("binary", "not JSON", "load", r"not UTF-8|invalid JSON",
          _t(lambda s: bytes(range(256)) * 4)),
        T("gguf-as-table", "not JSON", "load", r"not UTF-8|invalid JSON",
          _t(lambda s: b"GGUF\x03\x00\x00\x00" + bytes(64))),
        T("utf16", "not JSON", "load", r"not UTF-8|invalid JSON",
          _t(lambda s: s.encode("utf-16"))),
        T("yaml", "not JSON", "load", r"invalid JSON", _t(lambda s: "schema_version: 1\n")),
        T("json-list", "wrong type", "load", r"not a JSON object", _t(lambda s: "[1, 2, 3]")),
        T("json-string", "wrong type", "load", r"not a JSON object", _t(lambda s: '"table"')),
        T("json-null", "wrong type", "load", r"not a JSON object", _t(lambda s: "null")),
        T("json-number", "wrong type", "load", r"not a JSON object", _t(lambda s: "1")),
        T("schema-2", "schema", "load", r"unsupported schema_version 2",
          _j(lambda d: d.__setitem__("schema_version", 2))),
        T("schema-string", "schema", "load", r"unsupported schema_version '1'",
          _j(lambda d: d.__setitem__("schema_version", "1"))),
        T("schema-float", "schema", "load", r"unsupported schema_version 1\.0",
          _j(lambda d: d.__setitem__("schema_version", 1.0))),
        T("schema-true", "schema", "load", r"unsupported schema_version True",
          _j(lambda d: d.__setitem__("schema_version", True))),
        T("schema-missing", "schema", "load", r"no schema_version",
          _j(lambda d: d.pop("schema_version"))),
        T("unknown-top-key", "schema", "load", r"unknown key 'extra'",
          _j(lambda d: d.__setitem__("extra", 1))),
        T("fingerprint-missing", "schema", "load", r"lacks 'fingerprint'",
          _j(lambda d: d.pop("fingerprint"))),
        T("fingerprint-list", "schema", "load", r"fingerprint must be a JSON object",
          _j(lambda d: d.__setitem__("fingerprint", []))),
        T("sha-uppercase", "schema", "load", r"data_sha256 must be 64 lowercase hex",
          _j(lambda d: d["fingerprint"].__setitem__("data_sha256",
                                                    d["fingerprint"]["data_sha256"].upper()))),
        T("dims-negative", "schema", "load", r"dims\.d_model must be a positive integer",
          _j(lambda d: d["fingerprint"]["dims"].__setitem__("d_model", -8))),
        T("criterion-unknown", "schema", "load", r"unknown criterion 'entropy'",
          _j(lambda d: d.__setitem__("criterion", "entropy"))),
        T("provenance-tokens-string", "schema", "load", r"provenance\.tokens must be an integer",
          _j(lambda d: d["provenance"].__setitem__("tokens", "256"))),
        T("other-quantization", "fingerprint", "check", r"made for F16, model file .* is F32",
          _fp_from("f16")),
        T("other-weights", "fingerprint", "check", r"other weights",
          _fp_from("other")),
        T("other-dims", "fingerprint", "check", r"made for d_model 16",
          _j(lambda d: d["fingerprint"]["dims"].__setitem__("d_model", 16))),
        T("other-arch", "fingerprint", "check", r"made for a gemma3 model",
          _j(lambda d: d["fingerprint"].__setitem__("architecture", "gemma3"))),
        T("tensor-missing", "tensors", "load", r"no thresholds for blk\.0\.ffn_up",
          _j(lambda d: d["thresholds"].pop("blk.0.ffn_up"))),
        T("tensor-extra", "tensors", "load", r"thresholds for blk\.7\.attn_q, which",
          _j(lambda d: d["thresholds"].__setitem__("blk.7.attn_q", d["thresholds"][_first(d)]))),
        T("tensor-surrogate-name", "tensors", "load", r"thresholds for .*which",
          _t(lambda s: s.replace('"thresholds": {', '"thresholds": {"\\ud800": [], ', 1))),
        T("tensor-escape-name", "tensors", "load", r"thresholds for .*which",
          _t(lambda s: s.replace('"thresholds": {', '"thresholds": {"\\u001b[2J": [], ', 1))),
        T("threshold-nan", "thresholds", "load", r"not a number",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(5, math.nan))),
        T("threshold-inf", "thresholds", "load", r"finite and non-negative",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(99, math.inf))),
        T("threshold-1e400", "thresholds", "load", r"finite and non-negative",
          _t(lambda s: _replace_second(s, "1e400"))),
        T("threshold-10^400-int", "thresholds", "load", r"finite|not a number",
          _t(lambda s: _replace_last(s, "1" + "0" * 400))),
        T("threshold-5000-digits", "thresholds", "load", r"invalid JSON|too long|digits",
          _t(lambda s: _replace_last(s, "9" * 5000))),
        T("threshold-negative", "thresholds", "load", r"finite and non-negative",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(0, -0.5))),
        T("threshold-decreasing", "thresholds", "load", r"decreases at level 0\.51",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(51, 0.0))),
        T("threshold-string", "thresholds", "load", r"not a number",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(3, "0.1"))),
        T("threshold-null", "thresholds", "load", r"not a number",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(3, None))),
        T("threshold-bool", "thresholds", "load", r"not a number",
          _j(lambda d: d["thresholds"][_first(d)].__setitem__(3, True))),
        T("thresholds-short", "thresholds", "load", r"99 thresholds for 100 levels",
          _j(lambda d: d["thresholds"][_first(d)].pop())),
        T("thresholds-object", "thresholds", "load", r"no list of thresholds",
          _j(lambda d: d["thresholds"].__setitem__(_first(d), {"0": 1}))),
        T("levels-not-ascending", "levels", "load", r"levels are not ascending",
          _j(lambda d: d["levels"].__setitem__(slice(10, 12), d["levels"][11:9:-1]))),
        T("levels-repeated", "levels", "load", r"levels are not ascending",
          _j(lambda d: d["levels"].__setitem__(11, d["levels"][10]))),
        T("levels-empty", "levels", "load", r"levels must start at 0",
          _j(lambda d: d.__setitem__("levels", []))),
        T("levels-reach-1", "levels", "load", r"levels must stay below 1",
          _j(lambda d: d["levels"].__setitem__(-1, 1.0))),
        T("levels-nan", "levels", "load", r"levels",
          _j(lambda d: d["levels"].__setitem__(50, math.nan))),
        T("levels-10^400", "levels", "load", r"levels",
          _t(lambda s: s.replace('"levels": [0.0, ', '"levels": [0.0, 1' + "0" * 400 + ", ", 1))),
        T("levels-coarse", "levels", "load", r"levels lack 0\.05",
          _j(lambda d: (d.__setitem__("levels", [0.0, 0.5]),
                        [d["thresholds"].__setitem__(k, [0.0, 1.0]) for k in d["thresholds"]]))),
        T("allocation-unknown-tensor", "allocations", "load", r"unknown tensor blk\.9\.attn_q",
          _j(lambda d: d.__setitem__("allocations", {"greedy": {"0.50": {"blk.9.attn_q": 0.5}}}))),
        T("allocation-level-nan", "allocations", "load", r"not in \[0, 1\]",
          _j(lambda d: d.__setitem__("allocations",
                                     {"greedy": {"0.50": {_first(d): math.nan}}}))),
        T("allocation-target-0.5", "allocations", "load", r"target '0\.5' is not a level",
          _j(lambda d: d.__setitem__("allocations", {"greedy": {"0.5": {}}}))),
        T("allocation-named-uniform", "allocations", "load", r"may not be named 'uniform'",
          _j(lambda d: d.__setitem__("allocations", {"uniform": {}}))),
        T("duplicate-key", "JSON", "load", r"duplicate key 'thresholds'",
          _t(lambda s: s.replace('"thresholds": {', '"thresholds": {}, "thresholds": {', 1))),
        T("nested-100k", "JSON", "load", r"nested too deeply|invalid JSON",
          _t(lambda s: "[" * 100_000 + "]" * 100_000)),
        T("nested-5000-in-provenance", "JSON", "load", r"nested too deeply",
          _t(lambda s: _set_corpus(s, "[" * 5000 + "]" * 5000))),
        T("nested-500-in-provenance", "JSON", "load", r"provenance\.corpus must be a string",
          _t(lambda s: _set_corpus(s, "[" * 500 + "]" * 500))),
        T("huge-50MB", "size", "load", r"larger than", _t(_huge)),
        T("valid", "control", "ok", "", _t(lambda s: s)),
        T("valid-with-allocation", "control", "ok", "",
          _j(lambda d: d.__setitem__("allocations",
                                     {"greedy": {"0.50": {_first(d): 0.25}}}))),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


def _set_corpus(text: str, literal: str) -> str:
    """The table text with ``provenance.corpus`` replaced by the JSON ``literal``."""
    i = text.index('"corpus": ') + len('"corpus": ')
    j = text.index('"', i + 1) + 1
    return text[:i] + literal + text[j:]


def _replace_second(text: str, literal: str) -> str:
    """The table text with the second number of its first threshold list set to ``literal``."""
    i = text.index('"thresholds": {')
    j = text.index("[0.0, ", i) + len("[0.0, ")
    k = text.index(",", j)
    return text[:j] + literal + text[k:]


def _replace_last(text: str, literal: str) -> str:
    """The table text with the last number of its first threshold list set to ``literal``."""
    i = text.index('"thresholds": {')
    k = text.index("]", i)
    j = text.rindex(", ", i, k) + 2
    return text[:j] + literal + text[k:]


def summary(cases: list[Case] | list[TableCase]) -> dict[str, int]:
    """Cases per group, in first-seen order."""
    out: dict[str, int] = {}
    for c in cases:
        out[c.group] = out.get(c.group, 0) + 1
    return out


__all__ = ["Bases", "Case", "Gguf", "TableCase", "gguf_cases", "make_bases", "mini_spec",
           "parse", "table_cases", "valid_table", "wide_spec"]


def observe(path: Path, forward: bool = True) -> tuple[str, str]:
    """Where sparsify refuses the GGUF file at ``path``: (stage, one-line message), or
    ("ok", "") if it opens, loads, tokenizes and (with ``forward``) runs a forward pass.

    Anything but a :class:`SparsifyError` propagates: that is a crash."""
    import torch

    from sparsify.errors import SparsifyError
    from sparsify.gguf_file import GGUFFile
    from sparsify.loader import load

    try:
        GGUFFile.open(path).close()
    except SparsifyError as e:
        return "open", str(e)
    try:
        loaded = load(path)
    except SparsifyError as e:
        return "load", str(e)
    try:
        try:
            ids = loaded.tokenizer.encode("hello world")
        except SparsifyError as e:
            return "tokenizer", str(e)
        if forward:
            try:
                with torch.inference_mode():
                    loaded.model().forward(torch.tensor([ids]))
            except SparsifyError as e:
                return "weights", str(e)
    finally:
        loaded.gguf.close()
    return "ok", ""


def observe_table(path: Path, loaded) -> tuple[str, str]:
    """Where sparsify refuses the table at ``path`` for model ``loaded``: ("load" | "check",
    one-line message), or ("ok", "") if it loads and fits the model. Anything but a
    :class:`SparsifyError` propagates."""
    from sparsify.errors import SparsifyError
    from sparsify.table import ThresholdTable

    try:
        table = ThresholdTable.load(path)
    except SparsifyError as e:
        return "load", str(e)
    try:
        table.check(loaded)
        table.thresholds_at(0.5)
    except SparsifyError as e:
        return "check", str(e)
    return "ok", ""


@dataclass
class TableBases:
    """A valid table's text for the mini model, and tables of two models it must refuse."""

    text: str
    parsed: dict
    others: dict[str, str]


def make_table_bases(workdir: Path, rng: np.random.Generator,
                     levels: tuple[float, ...] | None = None) -> tuple[TableBases, Any]:
    """Valid tables (on ``levels``, default profile's grid) for the mini model, for its F16
    twin and for a twin with other weights; returns the bases and the mini model, loaded."""
    from sparsify.loader import load
    from sparsify.synthetic import write_synthetic_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    mini = workdir / "base-mini.gguf"
    if not mini.exists():
        write_synthetic_gguf(mini, mini_spec(), threads=1)
    loaded = load(mini)
    others = {}
    for key, spec in (("f16", mini_spec(dtype="f16")), ("other", mini_spec(seed=7))):
        p = write_synthetic_gguf(workdir / f"table-{key}.gguf", spec, threads=1)
        other = load(p)
        others[key] = valid_table(other, rng, levels).to_json()
        other.gguf.close()
    text = valid_table(loaded, rng, levels).to_json()
    return TableBases(text, json.loads(text), others), loaded


# ---- memory ---------------------------------------------------------------------------------

def write_amplifier(bases: Bases, path: Path, n: int) -> Path:
    """A valid model plus one key holding ``n`` two-character strings: the most memory per file
    byte a valid header can ask for (a Python str object per 10 bytes)."""
    g = bases.mini.copy()
    g.set("vendor.strings", ARR, Raw(struct.pack("<IQ", STR, n)
                                     + (struct.pack("<Q", 2) + b"ab") * n))
    path.write_bytes(g.to_bytes())
    return path


_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from sparsify.cli import main

def info(path):
    try:
        main(["info", path])
    except SystemExit as e:
        return int(e.code or 0)
    return 0

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

warm = info(sys.argv[2])  # imports and first-call costs
base = rss()
out = {"warm": warm, "base": base, "runs": []}
for path in sys.argv[3:]:
    code = info(path)
    out["runs"].append([path, code, rss()])
print("RESULT " + json.dumps(out))
"""


def peak_memory_of_info(warmup: Path, paths: list[Path], limit: int = 3 << 29) -> dict:
    """Run ``sparsify info`` on ``warmup``, then on each of ``paths``, in one subprocess under
    an address-space limit (default 1.5 GiB). Returns {"warm": exit code of the warm-up,
    "base": peak RSS bytes after it, "runs": [[path, exit code, peak RSS bytes after], ...]}.
    """
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CHILD, str(limit), str(warmup),
                        *map(str, paths)], capture_output=True, text=True, timeout=300,
                       check=False)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"memory probe failed: {r.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])
