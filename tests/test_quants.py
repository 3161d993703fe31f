"""Dequantization against gguf-py's decoder (the oracle), on random blocks and real tensors.

Every comparison is bitwise: our kernels do the same float32 products and sums, in the same
order, as ggml's reference decoders, and gguf-py is bit-exact against those, so there is no
rounding difference to tolerate.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from sparsify import quants

gguf = pytest.importorskip("gguf")  # the oracle
GGMLQuantizationType = gguf.GGMLQuantizationType
GGML_QUANT_SIZES = gguf.GGML_QUANT_SIZES

# Byte offsets of the float16 fields (scales, mins) inside one block, from ggml-common.h.
HALF_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
TYPES = sorted(quants.SUPPORTED_TYPES, key=lambda n: GGMLQuantizationType[n].value)


def finite_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random float16 bit patterns with every sign and exponent (zeros and subnormals
    included) except the all-ones exponent, i.e. finite values only."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(0xBFFF)  # clear the top exponent bit: inf/nan -> finite
    return bits


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Valid raw bytes (uint8, 1-D) of a `name` tensor of numpy `shape`: random quants and
    packed scales (every bit pattern is meaningful there), finite float16/bfloat16/float32."""
    qid = GGMLQuantizationType[name].value
    size = quants.nbytes(qid, shape)
    if name == "F32":
        return rng.standard_normal(size // 4).astype(np.float32).view(np.uint8)
    if name == "F16":
        return finite_halves(rng, size // 2).view(np.uint8)
    if name == "BF16":
        bits = rng.integers(0, 1 << 16, size=size // 2, dtype=np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)  # finite: no all-ones exponent
        return bits.view(np.uint8)
    t = quants.GGML_TYPES[qid]
    blocks = rng.integers(0, 256, size=(size // t.type_size, t.type_size), dtype=np.uint8)
    for off in HALF_FIELDS[name]:
        halves = finite_halves(rng, blocks.shape[0])
        blocks[:, off : off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def oracle(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's decoding of raw bytes, as float32 of `shape`."""
    rows = raw.reshape(-1, quants.nbytes(GGMLQuantizationType[name].value, shape[-1:]))
    out = gguf.quants.dequantize(rows.copy(), GGMLQuantizationType[name])
    return np.asarray(out, dtype=np.float32).reshape(shape)


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # Bitwise, so -0.0 vs 0.0 or a last-ulp difference fails; NaN payloads must agree too.
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    if diff.any():
        i = np.flatnonzero(diff.reshape(-1))[0]
        raise AssertionError(
            f"{diff.sum()} of {diff.size} elements differ; first at flat index {i}: "
            f"{ours.reshape(-1)[i]!r} vs {ref.reshape(-1)[i]!r}"
        )


def shapes_for(name: str) -> list[tuple[int, ...]]:
    """One block; a few rows of an odd number of blocks; a 3-D stack (numpy order)."""
    bs = quants.GGML_TYPES[GGMLQuantizationType[name].value].block_size
    if bs == 1:
        return [(1,), (7, 97), (3, 5, 33)]
    return [(bs,), (5, 7 * bs), (2, 3, 3 * bs)]


@pytest.mark.parametrize("name", TYPES)
def test_matches_gguf_on_random_blocks(name: str, rng: np.random.Generator) -> None:
    qid = GGMLQuantizationType[name].value
    for shape in shapes_for(name):
        raw = random_tensor(rng, name, shape)
        out = quants.dequantize(raw, qid, shape)
        assert out.flags.c_contiguous and out.flags.writeable
        assert_bits_equal(out, oracle(raw, name, shape))


@pytest.mark.parametrize("name", [n for n in TYPES if n in HALF_FIELDS])
def test_arbitrary_bytes_match_gguf(name: str, rng: np.random.Generator) -> None:
    # Any bytes at all, inf/nan scales included: a corrupt file decodes like ggml would.
    qid = GGMLQuantizationType[name].value
    shape = shapes_for(name)[1]
    raw = rng.integers(0, 256, size=quants.nbytes(qid, shape), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = oracle(raw, name, shape)
    np.testing.assert_array_equal(quants.dequantize(raw, qid, shape), ref)  # nan == nan here


def test_known_values() -> None:
    """Hand-built blocks checked against values worked out from ggml-common.h, so a layout
    misreading shared with the oracle would still be caught."""
    # Q8_0: d = 0.5, qs = -16..15 -> q / 2.
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), q.view(np.uint8)])
    np.testing.assert_array_equal(quants.dequantize(raw, 8, (32,)), q.astype(np.float32) / 2)

    # Q4_0: d = 2; qs[j] = j (low nibble -> element j) | (15 - j) << 4 (high -> element j + 16).
    j = np.arange(16, dtype=np.uint8)
    raw = np.concatenate([np.float16(2).reshape(1).view(np.uint8), j | ((15 - j) << 4)])
    want = np.concatenate([j.astype(np.float32) - 8, 15 - j.astype(np.float32) - 8]) * 2
    np.testing.assert_array_equal(quants.dequantize(raw, 2, (32,)), want)

    # Q5_0: d = 1, qs = 0, qh = bit 3 and bit 20 set -> elements 3 and 20 are 16 - 16 = 0,
    # all others 0 - 16.
    qh = np.array([(1 << 3) | (1 << 20)], dtype="<u4").view(np.uint8)
    raw = np.concatenate([np.float16(1).reshape(1).view(np.uint8), qh, np.zeros(16, np.uint8)])
    want = np.full(32, -16, dtype=np.float32)
    want[[3, 20]] = 0
    np.testing.assert_array_equal(quants.dequantize(raw, 6, (32,)), want)

    # Q4_K: d = 1, dmin = 1, group 5 gets scale 0b100011 = 35 and min 0b010010 = 18 (its top
    # bits live in bytes 1 and 5 of the packed scales); quants all 3; other groups 0 -> 0.
    scales = np.zeros(12, np.uint8)
    scales[9] = (18 & 15) << 4 | (35 & 15)  # byte g + 4 (g = 5): low nibbles of min | scale
    scales[1] = (35 >> 4) << 6  # top bits of the scale in byte g - 4
    scales[5] = (18 >> 4) << 6  # top bits of the min in byte g
    one = np.float16(1).reshape(1).view(np.uint8)
    raw = np.concatenate([one, one, scales, np.full(128, 0x33, np.uint8)])
    want = np.zeros(256, np.float32)
    want[160:192] = 35 * 3 - 18  # group 5 = high nibbles of qs[64:96]
    np.testing.assert_array_equal(quants.dequantize(raw, 12, (256,)), want)


@pytest.mark.parametrize("name", TYPES)
def test_rows_equal_slicing(name: str, rng: np.random.Generator) -> None:
    qid = GGMLQuantizationType[name].value
    shape = (11, shapes_for(name)[1][1])
    raw = random_tensor(rng, name, shape)
    full = quants.dequantize(raw, qid, shape)
    for rows in (np.array([3]), np.array([10, 0, 3, 3]), rng.integers(0, 11, size=(2, 3)),
                 np.array([], dtype=np.int64), np.arange(11, dtype=np.uint16)):
        got = quants.dequantize_rows(raw, qid, shape, rows)
        assert got.shape == rows.shape + (shape[1],)
        assert_bits_equal(got, full[rows])


def test_large_output_is_an_ordinary_array(rng: np.random.Generator) -> None:
    # Outputs above the mapping threshold live in their own mapping; they must still behave
    # like any float32 array (writable, contiguous, right values).
    n = quants._MAP_OUTPUT_BYTES // 4 + 1024
    raw = random_tensor(rng, "Q8_0", (n,))
    out = quants.dequantize(raw, 8, (n // 1024, 1024))
    assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.float32
    assert_bits_equal(out[-3:], oracle(raw, "Q8_0", (n // 1024, 1024))[-3:])
    out[0, 0] = 1.0


def test_out_argument(rng: np.random.Generator) -> None:
    raw = random_tensor(rng, "Q6_K", (3, 512))
    dst = np.full((3, 512), np.nan, np.float32)
    assert quants.dequantize(raw, 14, (3, 512), out=dst) is dst
    assert_bits_equal(dst, oracle(raw, "Q6_K", (3, 512)))
    for bad in (np.empty((3, 512), np.float64), np.empty((512, 3), np.float32),
                np.empty((3, 1024), np.float32)[:, ::2], np.empty(1536, np.float32)):
        with pytest.raises(TypeError, match="out must be"):
            quants.dequantize(raw, 14, (3, 512), out=bad)


def test_type_table_matches_gguf_constants() -> None:
    for qid, t in quants.GGML_TYPES.items():
        gt = GGMLQuantizationType(qid)
        assert gt.name == t.name
        if t.name == "Q8_1":
            # ggml-common.h: two halves + 32 int8 = 36 bytes; gguf-py keeps an old 40.
            assert t.block_size == 32 and t.type_size == 36
            continue
        assert GGML_QUANT_SIZES[gt] == (t.block_size, t.type_size), t.name
    assert quants.type_name(12) == "Q4_K"


def test_nbytes() -> None:
    assert quants.nbytes(0, (3, 5)) == 60
    assert quants.nbytes(8, (262144, 640)) == 262144 * 20 * 34
    assert quants.nbytes(14, (2, 3, 512)) == 6 * 2 * 210
    assert quants.nbytes(16, (4, 256)) == 4 * 66  # known but not decodable: size still known
    assert quants.nbytes(np.int32(12), (np.int64(1), 256)) == 144
    with pytest.raises(ValueError, match="not a multiple of its block size 256"):
        quants.nbytes(12, (4, 640))
    with pytest.raises(ValueError, match="not a multiple of its block size 32"):
        quants.nbytes(2, (33,))
    with pytest.raises(ValueError, match="at least one dimension"):
        quants.nbytes(0, ())
    with pytest.raises(ValueError, match="negative"):
        quants.nbytes(0, (-1, 4))
    with pytest.raises(ValueError, match="unknown tensor type id 4"):  # retired Q4_2
        quants.nbytes(4, (32,))
    with pytest.raises(TypeError, match="shape"):
        quants.nbytes(0, (2.0, 4))


def test_unsupported_and_unknown_types() -> None:
    raw = np.zeros(66, np.uint8)
    with pytest.raises(ValueError, match=r"^unsupported tensor type IQ2_XXS \(id 16\)$"):
        quants.dequantize(raw, 16, (256,))
    with pytest.raises(ValueError, match=r"^unsupported tensor type IQ2_XXS \(id 16\)$"):
        quants.dequantize_rows(raw, 16, (1, 256), np.array([0]))
    with pytest.raises(ValueError, match=r"^unknown tensor type id 99$"):
        quants.dequantize(raw, 99, (256,))
    with pytest.raises(TypeError, match="integer"):
        quants.dequantize(raw, "Q4_K", (256,))


def test_size_and_argument_errors(rng: np.random.Generator) -> None:
    raw = random_tensor(rng, "Q4_K", (2, 256))
    msg = r"^Q4_K tensor of shape \(2, 256\) needs 288 bytes, got 287$"
    with pytest.raises(ValueError, match=msg):
        quants.dequantize(raw[:-1], 12, (2, 256))
    with pytest.raises(ValueError, match="needs 288 bytes, got 432"):
        quants.dequantize(np.zeros(432, np.uint8), 12, (2, 256))
    with pytest.raises(ValueError, match="block size"):
        quants.dequantize(raw, 12, (4, 128))
    with pytest.raises(TypeError, match="uint8"):
        quants.dequantize(raw.view(np.int8), 12, (2, 256))
    with pytest.raises(TypeError, match="numpy uint8 array"):
        quants.dequantize(raw.tobytes(), 12, (2, 256))
    with pytest.raises(ValueError, match="2-D"):
        quants.dequantize_rows(raw, 12, (1, 2, 256), np.array([0]))
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        quants.dequantize_rows(raw, 12, (2, 256), np.array([0, 2]))
    with pytest.raises(ValueError, match="out of range"):
        quants.dequantize_rows(raw, 12, (2, 256), np.array([-1]))
    with pytest.raises(TypeError, match="integers"):
        quants.dequantize_rows(raw, 12, (2, 256), np.array([0.0]))
    # A non-contiguous view of the right bytes decodes like its contiguous copy.
    doubled = np.repeat(raw, 2)[::2]
    want = quants.dequantize(raw, 12, (2, 256))
    assert_bits_equal(quants.dequantize(doubled, 12, (2, 256)), want)


# ---- real models ------------------------------------------------------------------------------


def tensor_offsets(path: Path) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """name -> (absolute data offset, numpy shape, ggml type) from a GGUF v2/v3 header.

    gguf.GGUFReader builds every metadata field (slow on gemma's 262144-token vocabulary), so
    this walks the header only to find tensors; it is checked against GGUFReader on SmolLM2."""
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    def take_str() -> str:
        nonlocal pos
        n = take("Q")[0]
        pos += n
        return bytes(data[pos - n : pos]).decode()

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype in scalar:
            pos += scalar[vtype]
        elif vtype == 8:  # string: u64 length, bytes
            n = take("Q")[0]  # (not `pos += take(...)`: that would drop take's own advance)
            pos += n
        elif vtype == 9:  # array
            etype, count = take("IQ")
            if etype in scalar:
                pos += scalar[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            raise ValueError(f"bad GGUF value type {vtype}")

    magic, version, n_tensors, n_kv = take("4sIQQ")
    assert magic == b"GGUF" and version in (2, 3)
    alignment = 32
    for _ in range(n_kv):
        key = take_str()
        vtype = take("I")[0]
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = take_str()
        n_dims = take("I")[0]
        dims = take("Q" * n_dims)
        qtype, offset = take("IQ")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    start = -(-pos // alignment) * alignment
    return {n: (start + off, shape, qt) for n, shape, qt, off in infos}


def check_real(path: Path, name: str, offsets: dict, rows: slice | None = None) -> str:
    """Decode tensor `name` (or a run of its rows) from the file and compare with the oracle."""
    off, shape, qtype = offsets[name]
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    raw = mm[off : off + quants.nbytes(qtype, shape)]
    tname = quants.type_name(qtype)
    if rows is not None:
        row_bytes = quants.nbytes(qtype, shape[-1:])
        raw = raw[rows.start * row_bytes : rows.stop * row_bytes]
        shape = (rows.stop - rows.start, shape[-1])
    assert_bits_equal(quants.dequantize(raw, qtype, shape), oracle(np.asarray(raw), tname, shape))
    return tname


def test_real_smollm2(model_path, rng: np.random.Generator) -> None:
    smollm2 = Path(model_path("smollm2-135m"))
    offsets = tensor_offsets(smollm2)
    reader = gguf.GGUFReader(smollm2)
    assert {t.name: (int(t.data_offset), int(t.tensor_type)) for t in reader.tensors} == {
        n: (off, qt) for n, (off, _, qt) in offsets.items()
    }
    seen = {check_real(smollm2, "blk.0.ffn_down.weight", offsets),
            check_real(smollm2, "blk.29.attn_q.weight", offsets),
            check_real(smollm2, "blk.0.attn_norm.weight", offsets),
            check_real(smollm2, "token_embd.weight", offsets)}
    assert seen == {"Q4_1", "Q8_0", "F32"}
    # Embedding lookup: rows taken straight from the mapped table.
    off, shape, qtype = offsets["token_embd.weight"]
    raw = np.memmap(smollm2, dtype=np.uint8, mode="r")[off : off + quants.nbytes(qtype, shape)]
    ids = rng.integers(0, shape[0], size=17)
    row_bytes = quants.nbytes(qtype, shape[-1:])
    picked = np.asarray(raw).reshape(shape[0], row_bytes)[ids]
    assert_bits_equal(quants.dequantize_rows(raw, qtype, shape, ids),
                      oracle(picked.reshape(-1), "Q8_0", (17, shape[1])))


def test_real_gemma3(model_path) -> None:
    gemma3 = Path(model_path("gemma3-270m"))
    offsets = tensor_offsets(gemma3)
    seen = {check_real(gemma3, "blk.0.attn_k.weight", offsets),
            check_real(gemma3, "blk.0.attn_output.weight", offsets),
            check_real(gemma3, "blk.0.ffn_down.weight", offsets),
            check_real(gemma3, "output_norm.weight", offsets),
            # the 262144-row Q8_0 table: a run of rows keeps the oracle fast
            check_real(gemma3, "token_embd.weight", offsets, rows=slice(131000, 133048))}
    assert seen == {"Q5_0", "Q4_K", "Q6_K", "F32", "Q8_0"}
