"""The GGUF header reader against gguf-py's reader, and its refusals of broken files."""

from __future__ import annotations

import numpy as np
import pytest

from sparsify.errors import SparsifyError
from sparsify.gguf_file import GGUFFile

gguf = pytest.importorskip("gguf")


def _write_small(path, rng) -> dict[str, np.ndarray]:
    """A small GGUF with every metadata value type and a few tensors of several types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_int32("test.i32", -3)
    w.add_float32("test.f32", 0.5)
    w.add_uint64("test.u64", 1 << 40)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.strs", ["a", "bc", ""])
    w.add_array("test.ints", [1, 2, 3])
    tensors = {
        "a.weight": rng.standard_normal((3, 64)).astype(np.float32),
        "b.weight": rng.standard_normal((5, 32)).astype(np.float16),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_reads_what_gguf_py_reads(tmp_path, rng):
    path = tmp_path / "small.gguf"
    tensors = _write_small(path, rng)
    ref = gguf.GGUFReader(str(path))
    with GGUFFile.open(path) as g:
        assert g.metadata["test.u32"] == 7 and g.metadata["test.i32"] == -3
        assert g.metadata["test.f32"] == 0.5 and g.metadata["test.u64"] == 1 << 40
        assert g.metadata["test.bool"] is True and g.metadata["test.str"] == "héllo"
        assert g.metadata["test.strs"] == ["a", "bc", ""]
        assert g.metadata["test.ints"].tolist() == [1, 2, 3]
        assert set(g.tensors) == {t.name for t in ref.tensors}
        for t in ref.tensors:
            info = g.tensors[t.name]
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert info.qtype == int(t.tensor_type)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(g.dequantize(name), arr.astype(np.float32))


def test_real_model_header_matches_gguf_py(model_path):
    path = model_path("smollm2-135m")
    ref = gguf.GGUFReader(str(path))
    with GGUFFile.open(path) as g:
        assert len(g.tensors) == len(ref.tensors)
        for t in ref.tensors:
            info = g.tensors[t.name]
            assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes,
                                                               int(t.tensor_type))
        assert g.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()
        assert g.metadata["llama.block_count"] == 30


@pytest.mark.parametrize("cut", [0, 3, 10, 23, 100, 400, 1000])
def test_truncated_header_is_one_clear_error(tmp_path, rng, cut):
    path = tmp_path / "small.gguf"
    _write_small(path, rng)
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(SparsifyError) as e:
        GGUFFile.open(bad)
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    assert "truncated" in msg or "bad magic" in msg


def test_truncated_data_is_refused(tmp_path, rng):
    path = tmp_path / "small.gguf"
    _write_small(path, rng)
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-64])
    with pytest.raises(SparsifyError, match="truncated GGUF file: tensor"):
        GGUFFile.open(bad)


def test_foreign_file_and_version(tmp_path, rng):
    foreign = tmp_path / "x.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SparsifyError, match="not a GGUF file"):
        GGUFFile.open(foreign)
    path = tmp_path / "small.gguf"
    _write_small(path, rng)
    data = bytearray(path.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(SparsifyError, match="unsupported GGUF version 9"):
        GGUFFile.open(path)


def test_absurd_counts_are_refused_before_allocating(tmp_path):
    header = b"GGUF" + (3).to_bytes(4, "little") + (1 << 62).to_bytes(8, "little")
    path = tmp_path / "bomb.gguf"
    path.write_bytes(header + (0).to_bytes(8, "little") + bytes(64))
    with pytest.raises(SparsifyError, match="tensor count"):
        GGUFFile.open(path)
