"""Dequantization of GGUF tensor data (ggml block formats) to float32.

A GGUF tensor of numpy shape ``(..., cols)`` is stored row after row; each row of ``cols``
elements is a run of ``cols // block_size`` blocks of ``type_size`` bytes, blocks running along
the last (contiguous) axis. The block layouts follow the C structs of ggml (``ggml-common.h``)
and the reference decoders ``dequantize_row_*`` of ``ggml-quants.c``; each kernel below names
the struct it reads. Every product and sum is done in float32 in the same order as those
decoders, so the results are bit-identical to ggml's reference path.

Entry points: :func:`nbytes` (size check), :func:`dequantize` (a whole tensor) and
:func:`dequantize_rows` (selected rows of a matrix, for embedding lookups). Kernels are numba,
compiled on first use of a type and cached on disk, parallel over blocks.
"""

from __future__ import annotations

import mmap
import operator
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "GGML_TYPES",
    "SUPPORTED_TYPES",
    "GGMLType",
    "dequantize",
    "dequantize_rows",
    "ggml_type",
    "nbytes",
    "type_name",
]

QK_K = 256  # super-block size of the K-quants (ggml-common.h)


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


# ids from `enum ggml_type` in ggml.h (gaps are ids that ggml retired); sizes are
# sizeof(block_*) from ggml-common.h.
GGML_TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 18),
        GGMLType(3, "Q4_1", 32, 20),
        GGMLType(6, "Q5_0", 32, 22),
        GGMLType(7, "Q5_1", 32, 24),
        GGMLType(8, "Q8_0", 32, 34),
        # ggml-common.h: block_q8_1 holds two halves (36 bytes); gguf-py still says 40, the
        # size of an older float layout. Q8_1 only appears as a matmul operand, never in files.
        GGMLType(9, "Q8_1", 32, 36),
        GGMLType(10, "Q2_K", QK_K, 84),
        GGMLType(11, "Q3_K", QK_K, 110),
        GGMLType(12, "Q4_K", QK_K, 144),
        GGMLType(13, "Q5_K", QK_K, 176),
        GGMLType(14, "Q6_K", QK_K, 210),
        GGMLType(15, "Q8_K", QK_K, 292),
        GGMLType(16, "IQ2_XXS", QK_K, 66),
        GGMLType(17, "IQ2_XS", QK_K, 74),
        GGMLType(18, "IQ3_XXS", QK_K, 98),
        GGMLType(19, "IQ1_S", QK_K, 50),
        GGMLType(20, "IQ4_NL", 32, 18),
        GGMLType(21, "IQ3_S", QK_K, 110),
        GGMLType(22, "IQ2_S", QK_K, 82),
        GGMLType(23, "IQ4_XS", QK_K, 136),
        GGMLType(24, "I8", 1, 1),
        GGMLType(25, "I16", 1, 2),
        GGMLType(26, "I32", 1, 4),
        GGMLType(27, "I64", 1, 8),
        GGMLType(28, "F64", 1, 8),
        GGMLType(29, "IQ1_M", QK_K, 56),
        GGMLType(30, "BF16", 1, 2),
        GGMLType(34, "TQ1_0", QK_K, 54),
        GGMLType(35, "TQ2_0", QK_K, 66),
        GGMLType(39, "MXFP4", 32, 17),
    )
}

# Names of the types dequantize() accepts; the kernels are bound further down.
SUPPORTED_TYPES: frozenset[str] = frozenset(
    ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)

# float32 value of every float16 bit pattern: blocks store their scales as IEEE half, and a table
# lookup inside the kernels is exact and cheaper than decoding the bits (256 KiB, stays in L2).
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
_F16_TO_F32 = _F16_TO_F32.astype(np.float32)


def ggml_type(qtype: int) -> GGMLType:
    """The :class:`GGMLType` for a ggml type id; ``ValueError`` for an id ggml does not define."""
    try:
        key = operator.index(qtype)
    except TypeError:
        raise TypeError(f"tensor type id must be an integer, got {type(qtype).__name__}") from None
    t = GGML_TYPES.get(key)
    if t is None:
        raise ValueError(f"unknown tensor type id {key}")
    return t


def type_name(qtype: int) -> str:
    """ggml's name of a type id, e.g. ``type_name(12) == "Q4_K"``."""
    return ggml_type(qtype).name


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"tensor shape must be a tuple of integers, got {shape!r}") from None
    if not dims:
        raise ValueError("tensor shape must have at least one dimension")
    if any(d < 0 for d in dims):
        raise ValueError(f"tensor shape {dims} has a negative dimension")
    return dims


def nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ggml type ``qtype`` and numpy ``shape`` occupies in a GGUF file.

    Works for every type ggml defines (so a file can be listed even when its types cannot be
    dequantized). Raises ``ValueError`` for an unknown id or when the last (contiguous) dimension
    is not a multiple of the type's block size.
    """
    t = ggml_type(qtype)
    dims = _check_shape(shape)
    if dims[-1] % t.block_size:
        raise ValueError(
            f"last dimension {dims[-1]} of a {t.name} tensor of shape {dims} is not a multiple "
            f"of its block size {t.block_size}"
        )
    n_rows = 1
    for d in dims[:-1]:
        n_rows *= d
    return n_rows * (dims[-1] // t.block_size) * t.type_size


# --------------------------------------------------------------------------------------------
# Kernels. Each takes the raw bytes (uint8, 1-D, a whole number of blocks), the output (float32,
# 1-D, block_size elements per block) and the half->float table, and is parallel over blocks.
# Bytes are widened to int32 before any arithmetic; every float is explicitly float32 so numba
# never promotes to float64 (which could change the last bit relative to ggml's float code).
# --------------------------------------------------------------------------------------------

_jit = numba.njit(cache=True, parallel=True, nogil=True)
_F32 = np.float32
_I32 = np.int32


@numba.njit(cache=True, inline="always")
def _half(raw, p, h16):
    """The float16 at byte offset p (little endian), as float32."""
    return h16[_I32(raw[p]) | (_I32(raw[p + 1]) << 8)]


@_jit
def _deq_q4_0(raw, out, h16):
    # block_q4_0 { ggml_half d; uint8_t qs[16]; }: element j is the low nibble of qs[j],
    # element j + 16 the high nibble; value (q - 8) * d.
    for b in numba.prange(out.size // 32):
        p = b * 18
        o = b * 32
        d = _half(raw, p, h16)
        for j in range(16):
            x = _I32(raw[p + 2 + j])
            out[o + j] = _F32((x & 15) - 8) * d
            out[o + j + 16] = _F32((x >> 4) - 8) * d


@_jit
def _deq_q4_1(raw, out, h16):
    # block_q4_1 { ggml_half d, m; uint8_t qs[16]; }: value q * d + m, nibbles as in Q4_0.
    for b in numba.prange(out.size // 32):
        p = b * 20
        o = b * 32
        d = _half(raw, p, h16)
        m = _half(raw, p + 2, h16)
        for j in range(16):
            x = _I32(raw[p + 4 + j])
            out[o + j] = _F32(x & 15) * d + m
            out[o + j + 16] = _F32(x >> 4) * d + m


@_jit
def _deq_q5_0(raw, out, h16):
    # block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }: qh is a little-endian
    # uint32 whose bit j is the fifth bit of element j; value (q - 16) * d.
    for b in numba.prange(out.size // 32):
        p = b * 22
        o = b * 32
        d = _half(raw, p, h16)
        qh = (_I32(raw[p + 2]) | (_I32(raw[p + 3]) << 8)
              | (_I32(raw[p + 4]) << 16) | (_I32(raw[p + 5]) << 24))
        for j in range(16):
            x = _I32(raw[p + 6 + j])
            h0 = ((qh >> j) & 1) << 4
            h1 = ((qh >> (j + 16)) & 1) << 4
            out[o + j] = _F32(((x & 15) | h0) - 16) * d
            out[o + j + 16] = _F32(((x >> 4) | h1) - 16) * d


@_jit
def _deq_q5_1(raw, out, h16):
    # block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }: value q * d + m.
    for b in numba.prange(out.size // 32):
        p = b * 24
        o = b * 32
        d = _half(raw, p, h16)
        m = _half(raw, p + 2, h16)
        qh = (_I32(raw[p + 4]) | (_I32(raw[p + 5]) << 8)
              | (_I32(raw[p + 6]) << 16) | (_I32(raw[p + 7]) << 24))
        for j in range(16):
            x = _I32(raw[p + 8 + j])
            h0 = ((qh >> j) & 1) << 4
            h1 = ((qh >> (j + 16)) & 1) << 4
            out[o + j] = _F32((x & 15) | h0) * d + m
            out[o + j + 16] = _F32((x >> 4) | h1) * d + m


@_jit
def _deq_q8_0(raw, out, h16):
    # block_q8_0 { ggml_half d; int8_t qs[32]; }: value q * d.
    for b in numba.prange(out.size // 32):
        p = b * 34
        o = b * 32
        d = _half(raw, p, h16)
        for j in range(32):
            q = (_I32(raw[p + 2 + j]) ^ 128) - 128  # reinterpret the byte as int8
            out[o + j] = _F32(q) * d


@_jit
def _deq_q2_k(raw, out, h16):
    # block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d, dmin; }: 16 groups of 16;
    # scales[g] holds the group's 4-bit scale (low nibble) and 4-bit min (high nibble).
    # Each 128-element half uses 32 qs bytes; bit pair 2k of those bytes holds elements
    # 32k..32k+31 of the half. Value d * sc * q - dmin * mn.
    for b in numba.prange(out.size // QK_K):
        p = b * 84
        o = b * QK_K
        d = _half(raw, p + 80, h16)
        dmin = _half(raw, p + 82, h16)
        for n in range(2):
            for k in range(4):
                shift = 2 * k
                for h in range(2):
                    sc = _I32(raw[p + n * 8 + k * 2 + h])
                    dl = d * _F32(sc & 15)
                    ml = dmin * _F32(sc >> 4)
                    qb = p + 16 + n * 32 + h * 16
                    ob = o + n * 128 + k * 32 + h * 16
                    for j in range(16):
                        q = (_I32(raw[qb + j]) >> shift) & 3
                        out[ob + j] = dl * _F32(q) - ml


@_jit
def _deq_q3_k(raw, out, h16):
    # block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }:
    # low two bits as in Q2_K; the third bit of element 32k + j (k = 0..7 over the block) is bit
    # k of hmask[j], and a *clear* bit subtracts 4. 16 signed 6-bit scales (offset 32): low
    # nibbles in scales[0..7] (group g < 8 low nibble, g >= 8 high nibble of scales[g - 8]), top
    # two bits of group g in scales[8 + g % 4] at bit 2 * (g // 4). Value d * (s - 32) * q.
    for b in numba.prange(out.size // QK_K):
        p = b * 110
        o = b * QK_K
        d = _half(raw, p + 108, h16)
        sp = p + 96
        for n in range(2):
            for k in range(4):
                shift = 2 * k
                mask = 1 << (n * 4 + k)
                for h in range(2):
                    g = n * 8 + k * 2 + h
                    if g < 8:
                        lo = _I32(raw[sp + g]) & 15
                    else:
                        lo = _I32(raw[sp + g - 8]) >> 4
                    hi = (_I32(raw[sp + 8 + (g & 3)]) >> (2 * (g >> 2))) & 3
                    dl = d * _F32((lo | (hi << 4)) - 32)
                    qb = p + 32 + n * 32 + h * 16
                    hb = p + h * 16
                    ob = o + n * 128 + k * 32 + h * 16
                    for j in range(16):
                        q = (_I32(raw[qb + j]) >> shift) & 3
                        if (_I32(raw[hb + j]) & mask) == 0:
                            q -= 4
                        out[ob + j] = dl * _F32(q)


@numba.njit(cache=True, inline="always")
def _scale_min_k4(raw, sp, g):
    """6-bit (scale, min) of group g (0..7) from the 12 packed bytes at sp (Q4_K, Q5_K):
    groups 0-3 sit in the low six bits of bytes g and g + 4; groups 4-7 keep their low nibbles
    in byte g + 4 and their top two bits in the spare top bits of bytes g - 4 and g."""
    if g < 4:
        sc = _I32(raw[sp + g]) & 63
        mn = _I32(raw[sp + g + 4]) & 63
    else:
        sc = (_I32(raw[sp + g + 4]) & 15) | ((_I32(raw[sp + g - 4]) >> 6) << 4)
        mn = (_I32(raw[sp + g + 4]) >> 4) | ((_I32(raw[sp + g]) >> 6) << 4)
    return sc, mn


@_jit
def _deq_q4_k(raw, out, h16):
    # block_q4_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }: 8 groups of 32;
    # each 64-element chunk c reads qs[32c..32c+31], low nibbles -> group 2c, high -> 2c + 1.
    # Value (d * sc) * q - (dmin * mn).
    for b in numba.prange(out.size // QK_K):
        p = b * 144
        o = b * QK_K
        d = _half(raw, p, h16)
        dmin = _half(raw, p + 2, h16)
        for c in range(4):
            sc1, mn1 = _scale_min_k4(raw, p + 4, 2 * c)
            sc2, mn2 = _scale_min_k4(raw, p + 4, 2 * c + 1)
            d1 = d * _F32(sc1)
            m1 = dmin * _F32(mn1)
            d2 = d * _F32(sc2)
            m2 = dmin * _F32(mn2)
            qb = p + 16 + 32 * c
            ob = o + 64 * c
            for j in range(32):
                x = _I32(raw[qb + j])
                out[ob + j] = d1 * _F32(x & 15) - m1
                out[ob + 32 + j] = d2 * _F32(x >> 4) - m2


@_jit
def _deq_q5_k(raw, out, h16):
    # block_q5_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }:
    # as Q4_K plus a fifth bit: bit 2c of qh[j] for element j of group 2c, bit 2c + 1 for
    # group 2c + 1.
    for b in numba.prange(out.size // QK_K):
        p = b * 176
        o = b * QK_K
        d = _half(raw, p, h16)
        dmin = _half(raw, p + 2, h16)
        for c in range(4):
            sc1, mn1 = _scale_min_k4(raw, p + 4, 2 * c)
            sc2, mn2 = _scale_min_k4(raw, p + 4, 2 * c + 1)
            d1 = d * _F32(sc1)
            m1 = dmin * _F32(mn1)
            d2 = d * _F32(sc2)
            m2 = dmin * _F32(mn2)
            qb = p + 48 + 32 * c
            ob = o + 64 * c
            for j in range(32):
                x = _I32(raw[qb + j])
                hbits = _I32(raw[p + 16 + j]) >> (2 * c)
                out[ob + j] = d1 * _F32((x & 15) | ((hbits & 1) << 4)) - m1
                out[ob + 32 + j] = d2 * _F32((x >> 4) | ((hbits & 2) << 3)) - m2


@_jit
def _deq_q6_k(raw, out, h16):
    # block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }: each
    # 128-element half n uses ql[64n..64n+63] and qh[32n..32n+31]; for j < 32 the four
    # elements j, j+32, j+64, j+96 take the low nibble of ql[j], of ql[j+32], the high nibble of
    # ql[j], of ql[j+32], and bit pairs 0, 2, 4, 6 of qh[j] on top. Groups of 16 share a signed
    # scale. Value (d * s) * (q - 32).
    for b in numba.prange(out.size // QK_K):
        p = b * 210
        o = b * QK_K
        d = _half(raw, p + 208, h16)
        for n in range(2):
            lb = p + 64 * n
            hb = p + 128 + 32 * n
            sb = p + 192 + 8 * n
            ob = o + 128 * n
            for j in range(32):
                g = sb + (j >> 4)
                s0 = d * _F32((_I32(raw[g]) ^ 128) - 128)
                s1 = d * _F32((_I32(raw[g + 2]) ^ 128) - 128)
                s2 = d * _F32((_I32(raw[g + 4]) ^ 128) - 128)
                s3 = d * _F32((_I32(raw[g + 6]) ^ 128) - 128)
                a = _I32(raw[lb + j])
                c = _I32(raw[lb + j + 32])
                h = _I32(raw[hb + j])
                out[ob + j] = s0 * _F32(((a & 15) | ((h & 3) << 4)) - 32)
                out[ob + j + 32] = s1 * _F32(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                out[ob + j + 64] = s2 * _F32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                out[ob + j + 96] = s3 * _F32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


@_jit
def _deq_f16(raw, out, h16):
    # IEEE half, little endian; the table makes the conversion exact and parallel.
    for i in numba.prange(out.size):
        out[i] = _half(raw, 2 * i, h16)


@_jit
def _deq_bf16(raw, out, h16):
    # bfloat16 is the top half of a float32: shift the 16 bits into place. ``out`` is the
    # float32 output viewed as uint32 by the caller.
    for i in numba.prange(out.size):
        out[i] = np.uint32((_I32(raw[2 * i]) << 16) | (_I32(raw[2 * i + 1]) << 24))


def _deq_f32(raw: np.ndarray, out: np.ndarray, h16: np.ndarray) -> None:
    # Already float32 (little endian, as GGUF is): a plain copy.
    out.view(np.uint8)[:] = raw


_KERNELS = {
    0: _deq_f32,
    1: _deq_f16,
    2: _deq_q4_0,
    3: _deq_q4_1,
    6: _deq_q5_0,
    7: _deq_q5_1,
    8: _deq_q8_0,
    10: _deq_q2_k,
    11: _deq_q3_k,
    12: _deq_q4_k,
    13: _deq_q5_k,
    14: _deq_q6_k,
    30: _deq_bf16,
}
assert {GGML_TYPES[i].name for i in _KERNELS} == SUPPORTED_TYPES


def _supported(qtype: int) -> GGMLType:
    t = ggml_type(qtype)
    if t.id not in _KERNELS:
        raise ValueError(f"unsupported tensor type {t.name} (id {t.id})")
    return t


def _as_bytes(raw: np.ndarray) -> np.ndarray:
    """raw as a read-only 1-D uint8 array without copying when it is already contiguous.

    Read-only on purpose: memory-mapped tensors are read-only, and handing numba one flavour of
    array keeps one compiled specialization per kernel."""
    if not isinstance(raw, np.ndarray):
        raise TypeError(f"raw tensor data must be a numpy uint8 array, got {type(raw).__name__}")
    if raw.dtype != np.uint8:
        raise TypeError(f"raw tensor data must be uint8, got {raw.dtype}")
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.ndarray)
    flat.flags.writeable = False
    return flat


# Outputs at least this large are placed in their own anonymous mapping instead of numpy's heap.
_MAP_OUTPUT_BYTES = 32 << 20


def _new_output(dims: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``dims``.

    Large outputs get a plain anonymous mapping: numpy asks the kernel for transparent huge pages
    on big allocations, and a process's first touch of hundreds of MiB of those costs about
    1 s/GiB here (measured on the 2-core box: a fresh 168M-element Q8_0 table took 0.7-0.8 s
    that way, 0.3-0.4 s with 4 KiB pages), while later ones are fast. Loading a model touches
    each output once, so the small-page mapping wins."""
    n = 1
    for d in dims:
        n *= d
    if 4 * n < _MAP_OUTPUT_BYTES:
        return np.empty(dims, dtype=np.float32)
    buf = mmap.mmap(-1, 4 * n)  # anonymous, private, zero-filled on first touch
    return np.frombuffer(buf, dtype=np.float32).reshape(dims)  # keeps buf alive via .base


def dequantize(
    raw: np.ndarray, qtype: int, shape: tuple[int, ...], out: np.ndarray | None = None
) -> np.ndarray:
    """Decode a whole tensor to float32.

    Args:
        raw: the tensor's bytes as stored in the file, uint8 (any shape, typically a 1-D
            memory-mapped slice); exactly ``nbytes(qtype, shape)`` of them.
        qtype: ggml type id (``GGML_TYPES``); only ``SUPPORTED_TYPES`` decode.
        shape: numpy shape, last axis contiguous (the reverse of GGUF's ``ne`` order).
        out: optional destination, a writable C-contiguous float32 array of ``shape`` (e.g.
            the memory of a tensor the caller keeps), so no second copy is made.

    Returns:
        ``out``, or a new writable C-contiguous float32 array of ``shape``; bit-identical to
        ggml's reference dequantization.
    """
    t = _supported(qtype)
    dims = _check_shape(shape)
    need = nbytes(t.id, dims)
    flat = _as_bytes(raw)
    if flat.size != need:
        raise ValueError(
            f"{t.name} tensor of shape {dims} needs {need} bytes, got {flat.size}"
        )
    if out is None:
        out = _new_output(dims)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == dims
              and out.flags.c_contiguous and out.flags.writeable):
        raise TypeError(
            f"out must be a writable C-contiguous float32 array of shape {dims}, got "
            + (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__)
        )
    if out.size:
        flat_out = out.reshape(-1)
        if t.id == 30:
            flat_out = flat_out.view(np.uint32)  # the BF16 kernel writes bit patterns
        _KERNELS[t.id](flat, flat_out, _F16_TO_F32)
    return out


def dequantize_rows(
    raw: np.ndarray, qtype: int, shape: tuple[int, ...], rows: np.ndarray
) -> np.ndarray:
    """Decode only the selected rows of a 2-D tensor (an embedding lookup).

    Args:
        raw: the whole tensor's bytes, as for :func:`dequantize`.
        qtype: ggml type id.
        shape: ``(n_rows, n_cols)``.
        rows: integer array of row indices in ``[0, n_rows)``, any shape, repeats allowed.

    Returns:
        float32 array of shape ``rows.shape + (n_cols,)``, equal to
        ``dequantize(raw, qtype, shape)[rows]`` while touching only the selected rows' bytes.
    """
    t = _supported(qtype)
    dims = _check_shape(shape)
    if len(dims) != 2:
        raise ValueError(f"dequantize_rows needs a 2-D tensor, got shape {dims}")
    need = nbytes(t.id, dims)
    flat = _as_bytes(raw)
    if flat.size != need:
        raise ValueError(
            f"{t.name} tensor of shape {dims} needs {need} bytes, got {flat.size}"
        )
    idx = np.asarray(rows)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"row indices must be integers, got {idx.dtype}")
    n_rows, n_cols = dims
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise ValueError(
            f"row index out of range [0, {n_rows}): min {idx.min()}, max {idx.max()}"
        )
    row_bytes = need // n_rows if n_rows else 0
    # (n_rows, row_bytes)[idx] gathers only the selected rows' bytes out of the mapping.
    picked = flat.reshape(n_rows, row_bytes)[idx.reshape(-1)]
    out = dequantize(picked, t.id, (idx.size, n_cols))
    return out.reshape(idx.shape + (n_cols,))
