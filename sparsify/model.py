"""The model definition: one forward pass for every supported architecture, in torch.

Prefill, perplexity, profiling and decode all run this code. Every linear projection inside a
block goes through :meth:`Model.proj`, which hands ``(name, x, weight)`` to the model's
``projector``: the one place where profiling, masking and sparse kernels attach. Names are the
GGUF tensor names without ``.weight`` (``blk.3.ffn_down``).

Semantics follow llama.cpp (``src/llama-model.cpp``: ``llm_build_llama``,
``llm_build_gemma3_iswa``); the config carries every per-architecture switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig

Projector = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_projector(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T; x (..., K), w (N, K) output-major -> (..., N)."""
    return x @ w.T


class Weights:
    """Dequantized float tensors by GGUF name (``.weight`` dropped), loaded on first use.

    ``keep`` decides what stays after use: everything (the default), or only non-block tensors
    (``streaming=True``, for block-by-block passes over models larger than memory: the caller
    drops a block's tensors with :meth:`release_block`).
    """

    def __init__(self, gguf, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, streaming: bool = False) -> None:
        self.gguf = gguf
        self.device = torch.device(device)
        self.dtype = dtype
        self.streaming = streaming
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            arr = self.gguf.dequantize(name + ".weight")
            t = torch.from_numpy(arr).to(device=self.device, dtype=self.dtype)
            self._cache[name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name + ".weight" in self.gguf.tensors

    def rows(self, name: str, ids: np.ndarray) -> torch.Tensor:
        """Rows of a 2-D tensor (embedding lookup) without dequantizing all of it."""
        if name in self._cache:
            return self._cache[name][torch.from_numpy(ids).to(self.device)]
        arr = self.gguf.dequantize_rows(name + ".weight", ids)
        return torch.from_numpy(arr).to(device=self.device, dtype=self.dtype)

    def release_block(self, i: int) -> None:
        prefix = f"blk.{i}."
        for k in [k for k in self._cache if k.startswith(prefix)]:
            del self._cache[k]

    def load_all(self) -> None:
        for info in self.gguf:
            self[info.name.removesuffix(".weight")]


@dataclass
class KVCache:
    """Per-layer keys and values, (B, n_head_kv, max_len, head_dim), filled up to ``length``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, max_len: int, batch: int = 1,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVCache:
        shape_k = (batch, cfg.n_head_kv, max_len, cfg.head_dim)
        shape_v = (batch, cfg.n_head_kv, max_len, cfg.head_dim_v)
        return cls([torch.zeros(shape_k, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape_v, device=device, dtype=dtype) for _ in range(cfg.n_layer)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.cpp's ggml_rms_norm followed by a multiply by the (already shifted) weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, dim: int, neox: bool,
         scale: float) -> torch.Tensor:
    """Rotary embedding as ggml_rope_ext applies it.

    x (B, H, T, D); pos (T,) int64. Only the first ``dim`` features rotate. NORM rotates adjacent
    pairs (x[2i], x[2i+1]); NEOX rotates (x[i], x[i + dim/2]).
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    ang = (pos.to(torch.float64)[:, None] / scale) * inv_freq[None, :]  # (T, dim/2)
    cos = torch.cos(ang).to(x.dtype)
    sin = torch.sin(ang).to(x.dtype)
    xr, rest = x[..., :dim], x[..., dim:]
    if neox:
        a, b = xr[..., : dim // 2], xr[..., dim // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def attention_mask(q_pos: torch.Tensor, k_len: int, window: int) -> torch.Tensor:
    """Boolean (T, k_len) mask, True where a query may attend: causal, within ``window``.

    llama.cpp's standard sliding window masks key p0 for query p1 when p1 - p0 >= window.
    """
    k_pos = torch.arange(k_len, device=q_pos.device)
    diff = q_pos[:, None] - k_pos[None, :]
    ok = diff >= 0
    if window > 0:
        ok &= diff < window
    return ok


class Model:
    """A decoder-only transformer over dequantized GGUF weights.

    All activations are float32 (B, T, d_model). ``projector`` computes every block projection;
    swap it to profile, mask or use other kernels.
    """

    def __init__(self, cfg: ModelConfig, weights: Weights,
                 projector: Projector = dense_projector) -> None:
        self.cfg = cfg
        self.w = weights
        self.projector = projector

    @property
    def device(self) -> torch.device:
        return self.w.device

    def proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.projector(name, x, self.w[name])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 -> (B, T, d_model)."""
        flat = ids.reshape(-1).cpu().numpy()
        uniq, inv = np.unique(flat, return_inverse=True)
        rows = self.w.rows("token_embd", uniq)[torch.from_numpy(inv).to(self.device)]
        h = rows.reshape(*ids.shape, -1)
        if self.cfg.embed_scale != 1.0:
            h = h * self.cfg.embed_scale
        return h

    def block(self, i: int, h: torch.Tensor, pos: torch.Tensor,
              cache: KVCache | None = None) -> torch.Tensor:
        """One transformer block. h (B, T, D); pos (T,) absolute positions of h's tokens.

        With a cache, keys and values are written at ``pos`` and attention reads the cache up to
        ``pos[-1] + 1``; without one, the T tokens attend among themselves (pos must then start
        at 0).
        """
        cfg, w = self.cfg, self.w
        p = f"blk.{i}."
        B, T, _ = h.shape
        x = rms_norm(h, w[p + "attn_norm"], cfg.norm_eps)
        q = self.proj(p + "attn_q", x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = self.proj(p + "attn_k", x).view(B, T, cfg.n_head_kv, cfg.head_dim).transpose(1, 2)
        v = self.proj(p + "attn_v", x).view(B, T, cfg.n_head_kv, cfg.head_dim_v).transpose(1, 2)
        if cfg.qk_norm:
            q = rms_norm(q, w[p + "attn_q_norm"], cfg.norm_eps)
            k = rms_norm(k, w[p + "attn_k_norm"], cfg.norm_eps)
        swa = cfg.swa_layers[i]
        base = cfg.rope_base_swa if swa else cfg.rope_base
        # llama.cpp applies linear rope scaling on global layers only for gemma3 (freq_scale).
        scale = 1.0 if swa else cfg.rope_scale
        q = rope(q, pos, base, cfg.rope_dim, cfg.rope_neox, scale)
        k = rope(k, pos, base, cfg.rope_dim, cfg.rope_neox, scale)
        if cache is not None:
            end = int(pos[-1]) + 1
            cache.k[i][:, :, pos] = k.to(cache.k[i].dtype)
            cache.v[i][:, :, pos] = v.to(cache.v[i].dtype)
            # A float16 cache stores rounded keys and values (at pos too) and attention reads
            # them back into float32, as llama.cpp's default cache and sparsify's GPU engine do.
            k, v = cache.k[i][:, :, :end].to(q.dtype), cache.v[i][:, :, :end].to(q.dtype)
        a = self._attend(q, k, v, pos, cfg.sliding_window if swa else 0)
        a = a.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim_v)  # (B, T, H*Dv)
        o = self.proj(p + "attn_output", a)
        if cfg.post_norms:
            o = rms_norm(o, w[p + "post_attention_norm"], cfg.norm_eps)
        h = h + o
        x = rms_norm(h, w[p + "ffn_norm"], cfg.norm_eps)
        g = self.proj(p + "ffn_gate", x)
        u = self.proj(p + "ffn_up", x)
        act = F.silu(g) if cfg.activation == "silu" else F.gelu(g, approximate="tanh")
        f = self.proj(p + "ffn_down", act * u)
        if cfg.post_norms:
            f = rms_norm(f, w[p + "post_ffw_norm"], cfg.norm_eps)
        return h + f

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                window: int) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, Dv); grouped-query by repetition."""
        rep = self.cfg.n_head // self.cfg.n_head_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = attention_mask(pos, k.shape[2], window)
        scores = (q @ k.transpose(-1, -2)) * self.cfg.attn_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: (B, T, D) -> logits (B, T, vocab)."""
        x = rms_norm(h, self.w["output_norm"], self.cfg.norm_eps)
        out = self.w["token_embd" if self.cfg.tied_output else "output"]
        logits = x @ out.T
        if self.cfg.final_logit_softcap:
            c = self.cfg.final_logit_softcap
            logits = torch.tanh(logits / c) * c
        return logits

    def forward(self, ids: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """ids (B, T) int64 at positions start.. -> logits (B, T, vocab) (or (B, 1, vocab))."""
        if ids.dim() == 1:
            ids = ids[None]
        T = ids.shape[1]
        pos = torch.arange(start, start + T, device=self.device)
        if cache is None and start:
            raise ValueError("a forward pass that starts past position 0 needs a KV cache")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {start + T}")
        h = self.embed(ids)
        for i in range(self.cfg.n_layer):
            h = self.block(i, h, pos, cache)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.head(h)


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position in nats, from logits (..., V)."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


__all__ = ["KVCache", "Model", "Weights", "dense_projector", "kl_div", "rms_norm", "rope"]
