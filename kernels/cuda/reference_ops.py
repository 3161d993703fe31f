"""Plain torch references for the decode kernels (``decode_ops.h``, the gated GEMV input).

They run on the CPU in float64 from float32 inputs and follow the formulas of the headers
line by line, so the tests can hold the CUDA kernels to them. The formulas are those of a llama
/ gemma decoder block (llama.cpp's ggml_rms_norm, RoPE through cos/sin tables, grouped-query
attention with an optional sliding window).
"""

from __future__ import annotations

import math

import torch


def gated_input(x: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """float32 ``act(x) * up`` as the kernel computes it (and torch's F.silu / F.gelu do)."""
    x, up = x.float(), up.float()
    if act == "silu":
        return x / (1.0 + torch.exp(-x)) * up
    if act == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner)) * up
    raise ValueError(f"unknown activation {act!r}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * w`` over the last axis, in float64."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def add_rms_norm(h: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float,
                 post_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new h, normed x) for sparsify_add_rms_norm, float64 (d,)."""
    h = h.double()
    if r is not None:
        h = h + (r.double() if post_w is None else rms_norm(r, post_w, eps))
    return h, rms_norm(h, w, eps)


def attention_decode(qkv, kc, vc, pos: int, cos, sin, perm, *, n_head: int, scale: float,
                     eps: float = 0.0, window: int = 0, q_norm=None, k_norm=None, stored=None):
    """(out (n_head*dv,), kc, vc) for sparsify_attention_decode, float64, caches copied.

    Only positions ``pos - window < t <= pos`` (all ``t <= pos`` when window is 0) are read, so
    whatever the caches hold elsewhere (NaN in the tests) cannot reach the result. With float16
    caches the new key and value are rounded to float16 as stored (from float32, as the kernel
    forms them) and used rounded at ``pos`` too. ``stored``: the (n_head_kv, dk) key and
    (n_head_kv, dv) value to take at ``pos`` instead (a test's way to follow a kernel's own
    rounding where float32 and float64 sums fall on either side of a float16 tie).
    """
    hkv, _, dk = kc.shape
    dv = vc.shape[2]
    qkv = qkv.double()
    q = qkv[:n_head * dk].view(n_head, dk)
    k = qkv[n_head * dk:(n_head + hkv) * dk].view(hkv, dk)
    v = qkv[(n_head + hkv) * dk:].view(hkv, dv)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, s, perm = cos[pos].double(), sin[pos].double(), perm.long()
    q = q * c + q[:, perm] * s
    k = k * c + k[:, perm] * s
    if stored is not None:
        k, v = stored[0].double(), stored[1].double()
    elif kc.dtype == torch.float16:
        k, v = k.float().half().double(), v.float().half().double()
    kc, vc = kc.double().clone(), vc.double().clone()
    kc[:, pos], vc[:, pos] = k, v
    t0 = max(0, pos - window + 1) if window > 0 else 0
    keys, vals = kc[:, t0:pos + 1], vc[:, t0:pos + 1]  # (hkv, T, d)
    rep = n_head // hkv
    keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
    att = torch.softmax((keys @ q[:, :, None])[..., 0] * scale, dim=-1)  # (n_head, T)
    out = (att[:, None, :] @ vals)[:, 0]  # (n_head, dv)
    return out.reshape(-1), kc, vc


__all__ = ["add_rms_norm", "attention_decode", "gated_input", "rms_norm"]
