"""Synthetic GGUF files: random weights at real shapes (llama architecture, F16 or F32).

For measurements that need a model's size and layout but not its knowledge: memory bounds of
profiling, kernel and decode speed at Llama-3-8B shapes. ``general.name`` always starts with
"synthetic", so results made from such files can say so.

This is the only module of ours that uses the ``gguf`` package's writer (the reader is
``gguf_file``). The file is written tensor by tensor and, inside a tensor, in chunks of
:data:`CHUNK` values generated in parallel threads, so memory stays at a few chunks whatever the
model size; the file appears under its name only when complete (temp file + ``os.replace``).

Weights are uniform on [-a, a] with a = sqrt(3 / fan_in) (variance 1 / fan_in, so activations
keep their scale through the blocks); embeddings have variance 1, norm weights are 1. Uniform
rather than Gaussian values because drawing and casting them is several times faster, which
matters at 8 billion values. Values depend only on the seed and the tensor's position in the
file, never on the number of threads.

The tokenizer is a byte-level GPT-2 vocabulary (256 byte tokens), a few merges of common
English pairs, BOS/EOS, then ``<dummy_N>`` tokens up to the vocabulary size.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# Values per generated chunk (16 MiB of float32): large enough for numpy to run at full speed,
# small enough that a few chunks per thread stay far below any model's size.
CHUNK = 1 << 22

# First-level byte-pair merges of frequent English pairs ("Ġ" is the GPT-2 byte alphabet's space).
_MERGES = ("Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "r e", "a t", "e n", "Ġ s", "o r", "e s",
           "Ġ o", "a n", "Ġ w", "e d", "Ġ c", "i s", "i t", "a l")
_BOS, _EOS = "<|begin_of_text|>", "<|end_of_text|>"
# llama.cpp token types (llama-vocab.h: LLAMA_TOKEN_TYPE_*).
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5


def _min_vocab() -> int:
    return 256 + len(_MERGES) + 2  # bytes, merged pairs, BOS and EOS


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and format of a synthetic llama-architecture model."""

    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    dtype: str = "f16"  # weight matrices: "f16" or "f32"; norm weights are always F32
    context_length: int = 8192
    rope_base: float = 500000.0
    norm_eps: float = 1e-5
    tied_output: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_layer", "d_model", "d_ff", "n_head", "n_head_kv", "vocab_size",
                    "context_length"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if self.dtype not in ("f16", "f32"):
            raise ValueError(f"dtype must be 'f16' or 'f32', got {self.dtype!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_head} heads of "
                             f"even width")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv "
                             f"{self.n_head_kv}")
        if self.vocab_size < _min_vocab():
            raise ValueError(f"vocab_size must be at least {_min_vocab()} for the byte-level "
                             f"vocabulary, got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor in file order, numpy-order shapes ((out, in) for weights)."""
        d, hd, v = self.d_model, self.head_dim, self.vocab_size
        out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (v, d)),
                                                   ("output_norm.weight", (d,))]
        if not self.tied_output:
            out.append(("output.weight", (v, d)))
        for i in range(self.n_layer):
            p = f"blk.{i}."
            out += [(p + "attn_norm.weight", (d,)),
                    (p + "attn_q.weight", (self.n_head * hd, d)),
                    (p + "attn_k.weight", (self.n_head_kv * hd, d)),
                    (p + "attn_v.weight", (self.n_head_kv * hd, d)),
                    (p + "attn_output.weight", (d, self.n_head * hd)),
                    (p + "ffn_norm.weight", (d,)),
                    (p + "ffn_gate.weight", (self.d_ff, d)),
                    (p + "ffn_up.weight", (self.d_ff, d)),
                    (p + "ffn_down.weight", (d, self.d_ff))]
        return out

    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensor_shapes())

    def data_bytes(self) -> int:
        """Bytes of tensor data, padding excluded (norm weights are F32)."""
        w = 2 if self.dtype == "f16" else 4
        return sum(math.prod(s) * (4 if len(s) == 1 else w) for _, s in self.tensor_shapes())


PRESETS: dict[str, SyntheticSpec] = {
    # Llama-3-8B's shapes (config.json of meta-llama/Meta-Llama-3-8B), F16: about 16 GB.
    "llama3-8b": SyntheticSpec(n_layer=32, d_model=4096, d_ff=14336, n_head=32, n_head_kv=8,
                               vocab_size=128256),
    # Small and odd-sized (FFN 200, 3 KV heads), for tests: about 0.3 MB.
    "tiny": SyntheticSpec(n_layer=2, d_model=48, d_ff=200, n_head=6, n_head_kv=3,
                          vocab_size=320, dtype="f32", context_length=1024),
}


def preset(name: str, **changes) -> SyntheticSpec:
    """A preset spec, with any field replaced by keyword (``preset("tiny", n_layer=4)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (byte-level BPE's alphabet).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in byte order, to
    code points from U+0100 on, so every byte has a visible, unambiguous character.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(keep)
    out, extra = [], 0
    for b in range(256):
        if b in kept:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


def vocabulary(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the synthetic byte-level vocabulary."""
    tokens = _byte_alphabet()
    tokens += [m.replace(" ", "") for m in _MERGES]
    types = [_NORMAL] * len(tokens)
    tokens += [_BOS, _EOS]
    types += [_CONTROL, _CONTROL]
    n_dummy = vocab_size - len(tokens)
    tokens += [f"<dummy_{i}>" for i in range(n_dummy)]
    types += [_UNUSED] * n_dummy
    return tokens, types, list(_MERGES)


def _values(rng_key: tuple[int, ...], n: int, bound: float, dtype: np.dtype) -> np.ndarray:
    """n values uniform on [-bound, bound), drawn from the seed sequence ``rng_key``."""
    rng = np.random.default_rng(np.random.SeedSequence(rng_key))
    x = rng.random(n, dtype=np.float32)
    x -= 0.5
    x *= 2.0 * bound
    return x.astype(dtype, copy=False)


def _chunks(spec: SyntheticSpec, index: int, shape: tuple[int, ...], dtype: np.dtype,
            pool: ThreadPoolExecutor, depth: int) -> Iterator[np.ndarray]:
    """The tensor's values in file order, CHUNK at a time, at most ``depth`` chunks in flight."""
    n = math.prod(shape)
    if len(shape) == 1:  # norm weights
        yield np.ones(n, dtype=dtype)
        return
    bound = math.sqrt(3.0) if index == 0 else math.sqrt(3.0 / shape[1])  # embeddings: var 1
    starts = range(0, n, CHUNK)
    pending = []
    for k, start in enumerate(starts):
        m = min(CHUNK, n - start)
        pending.append(pool.submit(_values, (spec.seed, index, k), m, bound, dtype))
        if len(pending) >= depth:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


def write_synthetic_gguf(path: str | os.PathLike, spec: SyntheticSpec, threads: int | None = None,
                         progress: Callable[[int], None] | None = None) -> Path:
    """Write a synthetic llama GGUF file for ``spec`` at ``path``; returns the path.

    ``threads`` generate chunks in parallel (default: all CPUs); ``progress`` is called with
    the byte count of each chunk written. An existing file at ``path`` is replaced.
    """
    import gguf

    path = Path(path)
    threads = threads or os.cpu_count() or 1
    wdtype = np.dtype(np.float16 if spec.dtype == "f16" else np.float32)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(f"synthetic {spec.n_layer}x{spec.d_model} ffn {spec.d_ff}")
        w.add_block_count(spec.n_layer)
        w.add_context_length(spec.context_length)
        w.add_embedding_length(spec.d_model)
        w.add_feed_forward_length(spec.d_ff)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        w.add_rope_freq_base(spec.rope_base)
        w.add_layer_norm_rms_eps(spec.norm_eps)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_vocab_size(spec.vocab_size)
        w.add_file_type(int(ftype))
        tokens, types, merges = vocabulary(spec.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index(_BOS))
        w.add_eos_token_id(tokens.index(_EOS))
        w.add_add_bos_token(True)
        shapes = spec.tensor_shapes()
        for name, shape in shapes:
            dt = np.dtype(np.float32) if len(shape) == 1 else wdtype
            w.add_tensor_info(name, shape, dt, math.prod(shape) * dt.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        (fout,) = w.fout
        with ThreadPoolExecutor(threads) as pool:
            for index, (_, shape) in enumerate(shapes):
                dt = np.dtype(np.float32) if len(shape) == 1 else wdtype
                w.write_padding(fout, fout.tell())
                for chunk in _chunks(spec, index, shape, dt, pool, depth=2 * threads):
                    chunk.tofile(fout)
                    if progress is not None:
                        progress(chunk.nbytes)
        w.write_padding(fout, fout.tell())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
