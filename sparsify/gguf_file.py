"""GGUF reading: the one module that knows the file format.

A GGUF file (llama.cpp's ``gguf`` format, versions 2 and 3, little-endian) is::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv   x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to ``general.alignment`` (default 32), then the tensor data

Strings are a u64 byte length and UTF-8 bytes. Dims run fastest-first (ggml's ``ne``); we hand
out shapes in numpy order, slowest-first, so a weight ``[n_in, n_out]`` in ggml order is
``(n_out, n_in)`` here: one row per output channel, blocks of quantized values along the row.

Everything read from the file is bounds-checked before use: a count or length that cannot fit
in the bytes that remain is refused before anything is allocated, so a hostile header cannot
make the reader allocate more than the file's size. Tensor data is memory-mapped, never read
eagerly.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import quants
from .errors import SparsifyError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Value type ids (gguf.h: enum gguf_type).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12

# Fixed-size scalar types: struct format and numpy dtype (little-endian).
_SCALARS: dict[int, tuple[str, str]] = {
    _UINT8: ("<B", "<u1"),
    _INT8: ("<b", "<i1"),
    _UINT16: ("<H", "<u2"),
    _INT16: ("<h", "<i2"),
    _UINT32: ("<I", "<u4"),
    _INT32: ("<i", "<i4"),
    _FLOAT32: ("<f", "<f4"),
    _BOOL: ("<?", "<u1"),
    _UINT64: ("<Q", "<u8"),
    _INT64: ("<q", "<i8"),
    _FLOAT64: ("<d", "<f8"),
}

# No real model needs more dims than this; ggml itself stops at 4.
_MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file.

    ``shape`` is in numpy order (slowest dim first); ``offset`` is absolute in the file.
    """

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return quants.type_name(self.qtype)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every failure is a SparsifyError."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def fail(self, what: str) -> SparsifyError:
        return SparsifyError(what, self.path)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated GGUF file: {what} at byte {self.pos} runs past the end "
                            f"({self.size} bytes)")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALARS[vtype][0]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(_UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps such bytes; so do we, visibly, rather than refusing the file.
            return raw.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        # Each string needs at least its 8-byte length: refuse absurd counts before allocating.
        self.need(count * 8, what)
        out: list[str] = []
        unpack = struct.Struct("<Q").unpack_from
        buf, pos, size = self.buf, self.pos, self.size
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            out.append(buf[pos:pos + n].decode("utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        self.need(count * itemsize, what)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * itemsize
        return arr

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(vtype, what)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"element count of {what}")
            if etype == _STRING:
                return self.strings(count, what)
            if etype in _SCALARS:
                arr = self.array(count, _SCALARS[etype][1], what)
                return arr.astype(bool) if etype == _BOOL else arr
            if etype == _ARRAY:
                # llama.cpp's gguf.cpp refuses arrays of arrays, so no model it runs has one;
                # accepting them let 12 bytes of file become a ~130-byte empty array object.
                raise self.fail(f"{what}: arrays of arrays are not supported")
            raise self.fail(f"{what}: unknown array element type {etype}")
        raise self.fail(f"{what}: unknown value type {vtype}")


class GGUFFile:
    """An opened, validated GGUF file: metadata, tensor table, memory-mapped data.

    Use :meth:`open`; the object keeps the file mapped until :meth:`close` (also a context
    manager). ``metadata`` maps the file's keys to Python values: numbers, bools, str, numpy
    arrays for arrays of numbers and ``list[str]`` for arrays of strings.
    """

    def __init__(self, path: Path, mm: mmap.mmap | None, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], version: int, data_offset: int) -> None:
        self.path = path
        self._mm = mm
        self.metadata = metadata
        self.tensors = tensors
        self.version = version
        self.data_offset = data_offset

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open and validate ``path``; raises :class:`SparsifyError` for any problem with it."""
        path = Path(path)
        try:
            f = open(path, "rb")  # noqa: SIM115 — closed by the with block below
        except FileNotFoundError:
            raise SparsifyError("no such file", path) from None
        except IsADirectoryError:
            raise SparsifyError("is a directory, not a GGUF file", path) from None
        except OSError as e:
            raise SparsifyError(f"cannot open: {e.strerror}", path) from None
        with f:
            size = Path(path).stat().st_size
            if size < 24:
                head = f.read(4)
                if head != MAGIC[:len(head)] or not head:
                    raise SparsifyError("not a GGUF file (bad magic)", path)
                raise SparsifyError(f"truncated GGUF file: {size} bytes, too short for a header",
                                    path)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            # Parse over the map itself, not a memoryview: no export may outlive a failure,
            # or the map could not be closed.
            metadata, tensors, version, data_offset = _parse(mm, str(path))
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, metadata, tensors, version, data_offset)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # numpy views of the map are still alive; the OS unmaps when they die.
                pass
            self._mm = None

    def __enter__(self) -> GGUFFile:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise SparsifyError("missing key general.architecture", self.path)
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file, shape (nbytes,)."""
        info = self.info(name)
        if self._mm is None:
            raise SparsifyError("file is closed", self.path)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SparsifyError(f"missing tensor {name}", self.path) from None

    def dequantize(self, name: str) -> np.ndarray:
        """The whole tensor as float32 in numpy order (see module docstring).

        SparsifyError (naming the tensor) for a type that cannot be decoded, or for NaN or
        infinite values in the result.
        """
        info = self.info(name)
        try:
            out = quants.dequantize(self.raw(name), info.qtype, info.shape)
        except ValueError as e:
            raise SparsifyError(f"tensor {name}: {e}", self.path) from None
        _check_finite(out, name, self.path)
        return out

    def dequantize_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Selected rows of a 2-D tensor as float32, shape (len(rows), shape[1]).

        Errors as :meth:`dequantize`, for the selected rows.
        """
        info = self.info(name)
        if info.qtype not in quants.GGML_TYPES or (
                quants.type_name(info.qtype) not in quants.SUPPORTED_TYPES):
            raise SparsifyError(f"tensor {name}: unsupported tensor type {info.type_name} "
                                f"(id {info.qtype})", self.path)
        out = quants.dequantize_rows(self.raw(name), info.qtype, info.shape, rows)
        _check_finite(out, name, self.path)
        return out

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())


def _check_finite(arr: np.ndarray, name: str, path: Path) -> None:
    """SparsifyError if float32 ``arr`` (dequantized weights) holds NaN or infinity.

    One NaN weight turns every later activation into NaN, and profiling would then write
    thresholds computed from NaN; llama.cpp refuses such data the same way under
    ``--check-tensors`` (``ggml_validate_row_data``). The test is a float32 sum, one pass at
    memory speed: NaN and inf always reach it, and only then (or when finite values overflow
    the sum) are the values checked one by one.
    """
    flat = arr.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        total = flat.sum(dtype=np.float32)
    if flat.size == 0 or np.isfinite(total):
        return
    nan = np.isnan(flat)
    inf = np.isinf(flat)
    n_nan, n_inf = int(nan.sum()), int(inf.sum())
    if n_nan == 0 and n_inf == 0:
        return  # large finite values whose sum overflowed
    first = int(np.flatnonzero(nan | inf)[0])
    kinds = ", ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "inf")) if n)
    raise SparsifyError(f"tensor {name} holds non-finite weights ({kinds}; first at element "
                        f"{first}): the file is damaged", path)


def _parse(buf: mmap.mmap, path: str) -> tuple[dict[str, Any], dict[str, TensorInfo], int, int]:
    cur = _Cursor(buf, path)
    if buf[:4] != MAGIC:
        raise cur.fail("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        # A big-endian file's version reads byte-swapped here (3 -> 0x03000000); llama.cpp's
        # gguf.cpp tells the two apart the same way.
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Each key-value pair needs at least 8 + 4 bytes, each tensor info 8 + 4 + 4 + 8.
    if n_kv * 12 > cur.size - cur.pos:
        raise cur.fail(f"truncated or corrupt GGUF file: {n_kv} metadata entries cannot fit in "
                       f"{cur.size} bytes")
    if n_tensors * 24 > cur.size - cur.pos:
        raise cur.fail(f"truncated or corrupt GGUF file: {n_tensors} tensors (tensor count) "
                       f"cannot fit in {cur.size} bytes")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key}")
        vtype = cur.u32(f"value type of {key}")
        metadata[key] = cur.value(vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, (int, np.integer)) or isinstance(alignment, bool)
            or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20):
        raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")
    alignment = int(alignment)

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        if name in names:
            raise cur.fail(f"duplicate tensor name {name}")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimension {d} of {name}") for d in range(n_dims)]
        qtype = cur.u32(f"type of {name}")
        offset = cur.u64(f"offset of {name}")
        raw_infos.append((name, dims, qtype, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, dims, qtype, offset in raw_infos:
        if any(d == 0 for d in dims) or any(d > 1 << 40 for d in dims):
            raise cur.fail(f"tensor {name} has an impossible shape {dims}")
        shape = tuple(int(d) for d in reversed(dims))
        try:
            nbytes = quants.nbytes(qtype, shape)
        except ValueError as e:
            raise cur.fail(f"tensor {name}: {e}") from None
        if offset % alignment:
            raise cur.fail(f"tensor {name} data offset {offset} is not a multiple of the "
                           f"alignment {alignment}")
        start = data_offset + offset
        if start + nbytes > cur.size:
            raise cur.fail(f"truncated GGUF file: tensor {name} needs bytes {start}..."
                           f"{start + nbytes} but the file has {cur.size}")
        tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in itertools.pairwise(spans):
        if s1 < e0:
            raise cur.fail(f"tensors {n0} and {n1} overlap in the file")
    return metadata, tensors, version, data_offset


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Just the metadata of a GGUF file (validates the whole header)."""
    with GGUFFile.open(path) as g:
        return g.metadata
