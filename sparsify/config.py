"""Model configuration, built from a GGUF file's own metadata.

Only what the file cannot say comes from here, and each such value cites the llama.cpp source
that hard-codes it (``src/llama-model.cpp``, ``llm_build_gemma3_iswa``/``load_hparams``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import SparsifyError

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# The projections sparsity applies to, per block (DESIGN.md), with the input they read.
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROJECTION_INPUT = {
    "attn_q": "attn_in",
    "attn_k": "attn_in",
    "attn_v": "attn_in",
    "attn_output": "attn_out",
    "ffn_gate": "ffn_in",
    "ffn_up": "ffn_in",
    "ffn_down": "ffn_mid",
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer as llama.cpp runs it."""

    arch: str
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # per-head width of q and k
    head_dim_v: int  # per-head width of v
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # rotate halves (NEOX) rather than adjacent pairs (llama.cpp rope type)
    rope_scale: float  # linear position scaling (1 = none)
    attn_scale: float
    embed_scale: float  # multiply token embeddings (gemma: sqrt(d_model))
    activation: str  # "silu" or "gelu_tanh"
    qk_norm: bool
    post_norms: bool  # gemma's post-attention and post-FFN norms
    sliding_window: int  # 0: none
    swa_layers: tuple[bool, ...]  # per layer: sliding-window attention
    rope_base_swa: float  # rope base on sliding-window layers
    final_logit_softcap: float  # 0: none
    tied_output: bool

    def block_tensor(self, i: int, proj: str) -> str:
        return f"blk.{i}.{proj}"

    @property
    def projection_names(self) -> list[str]:
        """GGUF names of every sparsifiable projection, block by block."""
        return [f"blk.{i}.{p}" for i in range(self.n_layer) for p in PROJECTIONS]


def _get(meta: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...] = int,
         default: Any = None) -> Any:
    """``meta[key]`` checked to be an integer (``kind=int``) or a number (``kind=float``);
    ``default`` when the key is absent and a default is given, else SparsifyError."""
    if key not in meta:
        if default is not None:
            return default
        raise SparsifyError(f"missing key {key}", path)
    v = meta[key]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise SparsifyError(f"key {key} should be an integer, got {v!r:.40}", path)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise SparsifyError(f"key {key} should be a number, got {v!r:.40}", path)
    return v


def _check(ok: bool, key: str, v: Any, want: str, path: str) -> None:
    if not ok:
        raise SparsifyError(f"key {key} has an impossible value {v!r:.40} ({want})", path)


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], path: str) -> ModelConfig:
    """Build the config from GGUF metadata and the tensor table (for shapes and tied output)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise SparsifyError("missing key general.architecture", path)
    if not isinstance(arch, str):
        raise SparsifyError(f"key general.architecture should be a string, got {arch!r:.40}",
                            path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SparsifyError(f"unsupported architecture {arch!r} (supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)})", path)
    a = arch
    n_layer = _get(meta, f"{a}.block_count", path)
    d_model = _get(meta, f"{a}.embedding_length", path)
    d_ff = _get(meta, f"{a}.feed_forward_length", path)
    n_head = _get(meta, f"{a}.attention.head_count", path)
    n_head_kv = meta.get(f"{a}.attention.head_count_kv", n_head)
    for key, v in (("block_count", n_layer), ("embedding_length", d_model),
                   ("feed_forward_length", d_ff), ("attention.head_count", n_head),
                   ("attention.head_count_kv", n_head_kv)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 20:
            raise SparsifyError(f"key {a}.{key} has an impossible value {v!r:.40}", path)
    if n_head % n_head_kv:
        raise SparsifyError(f"head_count {n_head} is not a multiple of head_count_kv "
                            f"{n_head_kv}", path)
    if d_model < n_head and f"{a}.attention.key_length" not in meta:
        raise SparsifyError(f"embedding_length {d_model} cannot split into {n_head} heads "
                            f"(head_count)", path)
    head_dim = _get(meta, f"{a}.attention.key_length", path, int, d_model // n_head)
    head_dim_v = _get(meta, f"{a}.attention.value_length", path, int, head_dim)
    for key, v in (("attention.key_length", head_dim), ("attention.value_length", head_dim_v)):
        _check(0 < v < 1 << 20, f"{a}.{key}", v, "a head width", path)
    if "token_embd.weight" not in tensors:
        raise SparsifyError("missing tensor token_embd.weight", path)
    vocab_size = int(tensors["token_embd.weight"].shape[0])
    # Values that would make every activation NaN or break the rotation are refused here,
    # not discovered as NaN thresholds after a long profiling pass.
    key = f"{a}.attention.layer_norm_rms_epsilon"
    eps = float(_get(meta, key, path, float))
    _check(math.isfinite(eps) and eps >= 0, key, eps, "finite, >= 0", path)
    key = f"{a}.rope.freq_base"
    rope_base = float(_get(meta, key, path, float, 10000.0))
    _check(math.isfinite(rope_base) and rope_base > 0, key, rope_base, "finite, > 0", path)
    key = f"{a}.rope.dimension_count"
    rope_dim = _get(meta, key, path, int, head_dim)
    _check(0 < rope_dim <= head_dim and rope_dim % 2 == 0, key, rope_dim,
           f"even, at most the head width {head_dim}", path)
    scaling_type = meta.get(f"{a}.rope.scaling.type", "none")
    if not isinstance(scaling_type, str):
        raise SparsifyError(f"key {a}.rope.scaling.type should be a string, got "
                            f"{scaling_type!r:.40}", path)
    rope_scale = 1.0
    if scaling_type == "linear":
        key = f"{a}.rope.scaling.factor"
        rope_scale = float(_get(meta, key, path, float, 1.0)) or 1.0
        _check(math.isfinite(rope_scale) and rope_scale > 0, key, rope_scale, "finite, > 0",
               path)
    elif scaling_type != "none":
        raise SparsifyError(f"unsupported rope scaling {scaling_type!r:.40}", path)
    key = f"{a}.context_length"
    context_length = _get(meta, key, path, int, 2048)
    _check(context_length > 0, key, context_length, "> 0", path)
    tied = "output.weight" not in tensors

    if arch == "llama":
        return ModelConfig(
            arch=arch, n_layer=n_layer, d_model=d_model, d_ff=d_ff, n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            vocab_size=vocab_size, context_length=context_length, norm_eps=eps,
            rope_base=rope_base, rope_dim=rope_dim,
            rope_neox=False,  # llama.cpp: LLM_ARCH_LLAMA -> LLAMA_ROPE_TYPE_NORM
            rope_scale=rope_scale, attn_scale=1.0 / math.sqrt(head_dim), embed_scale=1.0,
            activation="silu", qk_norm=False, post_norms=False, sliding_window=0,
            swa_layers=(False,) * n_layer, rope_base_swa=rope_base, final_logit_softcap=0.0,
            tied_output=tied,
        )

    # gemma3 (llama-model.cpp, LLM_ARCH_GEMMA3):
    # - every 6th layer is global, the others use a sliding window: set_swa_pattern(6), i.e.
    #   layer il is local when il % 6 < 5;
    # - local layers use rope base 10000 (rope_freq_base_train_swa), global ones the file's;
    # - attention scale 1/sqrt(key_length) (the 27B variant differs; not supported here);
    # - embeddings scaled by sqrt(n_embd); rope type NEOX; GELU (tanh) gated FFN.
    key = f"{a}.attention.sliding_window"
    window = _get(meta, key, path, int, 0)
    _check(window >= 0, key, window, ">= 0", path)
    swa = tuple(il % 6 < 5 for il in range(n_layer)) if window > 0 else (False,) * n_layer
    key = f"{a}.final_logit_softcapping"
    softcap = float(_get(meta, key, path, float, 0.0))
    _check(math.isfinite(softcap) and softcap >= 0, key, softcap, "finite, >= 0", path)
    return ModelConfig(
        arch=arch, n_layer=n_layer, d_model=d_model, d_ff=d_ff, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v, vocab_size=vocab_size,
        context_length=context_length, norm_eps=eps, rope_base=rope_base, rope_dim=rope_dim,
        rope_neox=True, rope_scale=rope_scale, attn_scale=1.0 / math.sqrt(head_dim),
        embed_scale=math.sqrt(d_model), activation="gelu_tanh", qk_norm=True, post_norms=True,
        sliding_window=window, swa_layers=swa, rope_base_swa=10000.0,
        final_logit_softcap=softcap, tied_output=tied,
    )
