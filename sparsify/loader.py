"""From a model argument to a ready model: resolve, open, validate, configure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, config_from_metadata
from .errors import SparsifyError
from .gguf_file import GGUFFile


@dataclass
class Loaded:
    """An opened model file with its config; the torch model and tokenizer are built on use."""

    path: Path
    gguf: GGUFFile
    cfg: ModelConfig
    _tokenizer: object | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
                # Tokenizer keys of the wrong type (numbers where strings belong, ...) fail
                # inside the vocabulary code in many ways; all of them are a bad file.
                raise SparsifyError(f"bad tokenizer metadata: {e}", self.path) from None
        return self._tokenizer

    def model(self, device: str = "cpu", streaming: bool = False, projector=None):
        """A :class:`sparsify.model.Model` over this file's weights (float32)."""
        from .model import Model, Weights, dense_projector

        weights = Weights(self.gguf, device=device, streaming=streaming)
        return Model(self.cfg, weights, projector or dense_projector)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its numpy-order shape."""
    d, hd, hv = cfg.d_model, cfg.head_dim, cfg.head_dim_v
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.vocab_size, d),
        "output_norm.weight": (d,),
    }
    if not cfg.tied_output:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (cfg.n_head * hd, d),
            p + "attn_k.weight": (cfg.n_head_kv * hd, d),
            p + "attn_v.weight": (cfg.n_head_kv * hv, d),
            p + "attn_output.weight": (d, cfg.n_head * hv),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate.weight": (cfg.d_ff, d),
            p + "ffn_up.weight": (cfg.d_ff, d),
            p + "ffn_down.weight": (d, cfg.d_ff),
        })
        if cfg.qk_norm:
            shapes[p + "attn_q_norm.weight"] = (hd,)
            shapes[p + "attn_k_norm.weight"] = (hd,)
        if cfg.post_norms:
            shapes[p + "post_attention_norm.weight"] = (d,)
            shapes[p + "post_ffw_norm.weight"] = (d,)
    return shapes


def load(spec: str | os.PathLike) -> Loaded:
    """Resolve a path or bundled name, open and validate the GGUF file, build its config."""
    from .bundled import resolve

    path = resolve(spec)
    g = GGUFFile.open(path)
    try:
        cfg = config_from_metadata(g.metadata, g.tensors, str(path))
        for name, shape in expected_shapes(cfg).items():
            info = g.tensors.get(name)
            if info is None:
                raise SparsifyError(f"missing tensor {name}", path)
            if info.shape != shape:
                raise SparsifyError(f"tensor {name} has shape {list(info.shape)}, expected "
                                    f"{list(shape)} from the metadata", path)
        tokens = g.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) > cfg.vocab_size:
            # Token ids past the embedding's rows would fail at lookup, mid-generation.
            raise SparsifyError(f"tokenizer.ggml.tokens has {len(tokens)} tokens but "
                                f"token_embd.weight only {cfg.vocab_size} rows", path)
    except BaseException:
        g.close()
        raise
    return Loaded(path, g, cfg)
