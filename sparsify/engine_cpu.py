"""CPU decode engine: the model's decode step on numba kernels, one token at a time.

Weights are repacked once at load into the kernels' input-major layout (fp32, or int8 with
float32 scales per group of output channels); every block projection runs through
``sparsify_kernels.cpu`` with its threshold compared inside the kernel, the output head through
the dense twin in the same format. The glue between projections (norms, RoPE, attention over the
KV cache, the gated activation) is a handful of small numba functions writing into buffers
allocated once, so the per-token loop allocates nothing but the token's embedding row.

This is a second implementation of :class:`sparsify.model.Model`'s decode path; tests hold it to
the torch model token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit
from sparsify_kernels import cpu as K
from sparsify_kernels.quant import DEFAULT_GROUP, quantize_int8

from .config import PROJECTIONS, ModelConfig

FORMATS = ("fp32", "int8")


# --------------------------------------------------------------------------------------------
# glue kernels (float32, into caller buffers)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def rms_norm_into(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w, over the last axis of a (R, D) array."""
    for r in range(x.shape[0]):
        s = 0.0
        for j in range(x.shape[1]):
            s += np.float64(x[r, j]) * x[r, j]
        inv = np.float32(1.0 / math.sqrt(s / x.shape[1] + eps))
        for j in range(x.shape[1]):
            out[r, j] = x[r, j] * inv * w[j]


@njit(cache=True)
def rope_into(x, cos, sin, neox):
    """Rotate each row of x (H, D) in place by angles of one position (cos/sin (rope_dim/2,))."""
    half = cos.shape[0]
    for h in range(x.shape[0]):
        for i in range(half):
            if neox:
                a, b = x[h, i], x[h, i + half]
            else:
                a, b = x[h, 2 * i], x[h, 2 * i + 1]
            ra = a * cos[i] - b * sin[i]
            rb = a * sin[i] + b * cos[i]
            if neox:
                x[h, i], x[h, i + half] = ra, rb
            else:
                x[h, 2 * i], x[h, 2 * i + 1] = ra, rb


# Reassociation lets LLVM vectorize the q.k and p.v reductions (strict float order kept them
# scalar: ~1.3 ms of a 7.2 ms smollm2-135m step at 150 cached positions); no nnan/ninf, the
# running max starts at -inf.
_ATTN_FAST = {"contract", "reassoc"}


# From this many visible keys on, attention runs its heads in parallel: below it a parallel
# region's start costs more than a head's work.
PARALLEL_KEYS = 256


@njit(cache=True, fastmath=_ATTN_FAST)
def _attend_head(q, kc, vc, h, g, lo, pos, scale, scores, out):
    """Query head h (kv head g) over keys lo..pos into out[h]; scores (L,) its scratch row."""
    m = -np.inf
    for j in range(lo, pos + 1):
        s = np.float32(0.0)
        for d in range(q.shape[1]):
            s += q[h, d] * kc[g, j, d]
        s *= scale
        scores[j] = s
        m = max(m, s)
    tot = np.float32(0.0)
    for j in range(lo, pos + 1):
        e = np.float32(math.exp(scores[j] - m))
        scores[j] = e
        tot += e
    for d in range(out.shape[1]):
        out[h, d] = 0.0
    for j in range(lo, pos + 1):
        p = scores[j] / tot
        for d in range(out.shape[1]):
            out[h, d] += p * vc[g, j, d]


@njit(cache=True)
def attend_into(q, kc, vc, pos, window, scale, scores, out):
    """One query position over the cache. q (H, Dk); kc (Hkv, L, Dk); vc (Hkv, L, Dv);
    keys 0..pos are valid (those within ``window`` of pos when window > 0); out (H, Dv);
    scores (H, L) scratch. Grouped-query: head h reads kv head h // (H / Hkv)."""
    n_head = q.shape[0]
    rep = n_head // kc.shape[0]
    lo = 0
    if window > 0:
        lo = max(0, pos - window + 1)
    for h in range(n_head):
        _attend_head(q, kc, vc, h, h // rep, lo, pos, scale, scores[h], out)


@njit(cache=True, parallel=True)
def attend_parallel_into(q, kc, vc, pos, window, scale, scores, out):
    """attend_into with the heads spread over numba's threads (the same arithmetic per head,
    so the same result bit for bit)."""
    n_head = q.shape[0]
    rep = n_head // kc.shape[0]
    lo = 0
    if window > 0:
        lo = max(0, pos - window + 1)
    for h in numba.prange(n_head):
        _attend_head(q, kc, vc, h, h // rep, lo, pos, scale, scores[h], out)


@njit(cache=True)
def gated_act_into(g, u, gelu, out):
    """out = act(g) * u with act = silu, or gelu (tanh form) when ``gelu``."""
    c = math.sqrt(2.0 / math.pi)
    for i in range(g.shape[0]):
        x = g[i]
        if gelu:
            a = 0.5 * x * (1.0 + math.tanh(c * (x + 0.044715 * x * x * x)))
        else:
            a = x / (1.0 + math.exp(-x))
        out[i] = a * u[i]


@njit(cache=True)
def add_into(a, b):
    for i in range(a.shape[0]):
        a[i] += b[i]


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Proj:
    """One projection in kernel layout, with its threshold and optional channel factors."""

    name: str
    k: int
    n: int
    wt: np.ndarray | None = None  # fp32 (K, N)
    q: np.ndarray | None = None  # int8 (K, N)
    scales: np.ndarray | None = None  # float32 (K, ceil(N/G))
    threshold: float = -1.0  # < 0: dense (every |x| > t)
    channel_scale: np.ndarray | None = None
    nbytes: int = 0


class CPUEngine:
    """Batch-1 decode on the CPU kernels.

    ``thresholds`` (tensor name -> threshold) makes projections sparse; names not in it, and
    every projection when it is None, run dense (through the sparse kernel with threshold -1,
    which keeps every finite channel: the same loop and bytes as the dense twin). ``fmt`` is
    "fp32" or "int8". ``channel_scales`` (weight-aware tables) gives ‖W[:, i]‖ per tensor.
    """

    def __init__(self, model, fmt: str = "int8", max_len: int = 2048,
                 group: int = DEFAULT_GROUP) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")
        cfg: ModelConfig = model.cfg
        self.cfg, self.fmt, self.group, self.max_len = cfg, fmt, group, max_len
        self.gguf = model.w.gguf
        w = model.w
        self.projs: dict[str, _Proj] = {}
        for i in range(cfg.n_layer):
            for p in PROJECTIONS:
                name = f"blk.{i}.{p}"
                self.projs[name] = self._pack(name, w[name].numpy())
                w._cache.pop(name, None)  # the torch copy is no longer needed
        head_name = "token_embd" if cfg.tied_output else "output"
        self.head = self._pack(head_name, w[head_name].numpy())
        w._cache.pop(head_name, None)
        self.norms = {}
        for i in range(cfg.n_layer):
            for n in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm",
                      "post_attention_norm", "post_ffw_norm"):
                name = f"blk.{i}.{n}"
                if name in w:
                    self.norms[name] = np.ascontiguousarray(w[name].numpy(), dtype=np.float32)
        self.norms["output_norm"] = np.ascontiguousarray(w["output_norm"].numpy())
        self._alloc()

    # -- setup ------------------------------------------------------------------------------

    def _pack(self, name: str, w_out_major: np.ndarray) -> _Proj:
        n, k = w_out_major.shape
        wt = np.ascontiguousarray(w_out_major.T, dtype=np.float32)  # (K, N) input-major
        if self.fmt == "fp32":
            return _Proj(name, k, n, wt=wt, nbytes=wt.nbytes)
        q, s = quantize_int8(wt, self.group)
        return _Proj(name, k, n, q=q, scales=s, nbytes=q.nbytes + s.nbytes)

    def _alloc(self) -> None:
        c = self.cfg
        f = np.float32
        self.h = np.zeros(c.d_model, f)
        self.x = np.zeros((1, c.d_model), f)
        self.q = np.zeros((c.n_head, c.head_dim), f)
        self.k = np.zeros((c.n_head_kv, c.head_dim), f)
        self.v = np.zeros((c.n_head_kv, c.head_dim_v), f)
        self.att = np.zeros((c.n_head, c.head_dim_v), f)
        self.o = np.zeros((1, c.d_model), f)
        self.o2 = np.zeros((1, c.d_model), f)
        self.g = np.zeros(c.d_ff, f)
        self.u = np.zeros(c.d_ff, f)
        self.mid = np.zeros(c.d_ff, f)
        self.logits = np.zeros(c.vocab_size, f)
        self.scores = np.zeros((c.n_head, self.max_len), f)
        self.rows = np.zeros(max(c.d_model, c.d_ff, c.n_head * c.head_dim_v), np.int32)
        self.kc = [np.zeros((c.n_head_kv, self.max_len, c.head_dim), f) for _ in range(c.n_layer)]
        self.vc = [np.zeros((c.n_head_kv, self.max_len, c.head_dim_v), f)
                   for _ in range(c.n_layer)]
        self._partials: dict[int, np.ndarray] = {}
        self._partial_threads = 0
        self.rope_tables = {}
        for base in {c.rope_base, c.rope_base_swa}:
            inv = base ** (-np.arange(0, c.rope_dim, 2, dtype=np.float64) / c.rope_dim)
            ang = np.arange(self.max_len, dtype=np.float64)[:, None] * inv[None, :]
            self.rope_tables[base] = (np.cos(ang).astype(f), np.sin(ang).astype(f))
        self._plan = self._layer_plan()
        # Views made once: each reshape is a new array object for numba to unbox.
        self._views = (self.h.reshape(1, -1), self.x[0], self.q.reshape(-1), self.k.reshape(-1),
                       self.v.reshape(-1), self.att.reshape(-1), self.o[0], self.o2[0])
        self.reset()

    def set_thresholds(self, thresholds: dict[str, float] | None,
                       channel_scales: dict[str, np.ndarray] | None = None) -> None:
        """Install per-tensor thresholds (None: all dense)."""
        for name, p in self.projs.items():
            t = None if thresholds is None else thresholds.get(name)
            p.threshold = -1.0 if t is None else float(t)
            cs = None if channel_scales is None else channel_scales.get(name)
            p.channel_scale = None if cs is None else np.ascontiguousarray(cs, dtype=np.float32)

    def reset(self) -> None:
        """Empty the KV cache and the byte counters."""
        self.pos = 0
        self.rows_read = 0
        self.bytes_read = 0

    @property
    def weight_bytes(self) -> int:
        return sum(p.nbytes for p in self.projs.values()) + self.head.nbytes

    # -- decode -----------------------------------------------------------------------------

    def _partial(self, n: int) -> np.ndarray:
        """The split-K scratch (C, n) for outputs of width n, C = numba's thread count as
        ``step`` last read it (the buffers are remade when it changes, e.g. in a pinned
        benchmark)."""
        buf = self._partials.get(n)
        if buf is None:
            buf = self._partials[n] = np.zeros((self._partial_threads, n), np.float32)
        return buf

    def _proj(self, p: _Proj, x: np.ndarray, out: np.ndarray) -> None:
        """Run one projection, counting the weight bytes it read."""
        partial = self._partial(p.n)
        if self.fmt == "fp32":
            m = K.sparse_fp32_parallel(p.wt, x, p.threshold, p.channel_scale, out,
                                       self.rows, partial)
        else:
            m = K.sparse_int8_parallel(p.q, p.scales, self.group, x, p.threshold,
                                       p.channel_scale, out, self.rows, partial)
        self.rows_read += m
        self.bytes_read += m * p.nbytes // p.k

    def _layer_plan(self) -> list[tuple]:
        """Per block, everything ``step`` looks up: projections, norm weights, RoPE table and
        attention window, resolved once (string keys and dict lookups cost ~1 us each, and a
        step makes hundreds of them)."""
        c = self.cfg
        plan = []
        for i in range(c.n_layer):
            pre = f"blk.{i}."
            swa = c.swa_layers[i]
            cos, sin = self.rope_tables[c.rope_base_swa if swa else c.rope_base]
            plan.append((
                tuple(self.projs[pre + p] for p in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_gate", "ffn_up", "ffn_down")),
                tuple(self.norms.get(pre + n) for n in ("attn_norm", "attn_q_norm",
                                                        "attn_k_norm", "post_attention_norm",
                                                        "ffn_norm", "post_ffw_norm")),
                cos, sin, c.sliding_window if swa else 0, self.kc[i], self.vc[i]))
        return plan

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; returns the logits (a reused buffer, (V,))."""
        c = self.cfg
        pos = self.pos
        if pos >= self.max_len:
            raise ValueError(f"the engine's KV cache holds {self.max_len} positions")
        h2, xin, qf, kf, vf, attf, o0, o20 = self._views
        nc = numba.get_num_threads()
        if nc != self._partial_threads:
            self._partials = {}
            self._partial_threads = nc
        emb = self.gguf.dequantize_rows("token_embd.weight", np.array([token]))
        np.multiply(emb[0], np.float32(c.embed_scale), out=self.h)
        x1, q, k, v = self.x, self.q, self.k, self.v
        eps, neox, scale = c.norm_eps, c.rope_neox, np.float32(c.attn_scale)
        gelu = c.activation == "gelu_tanh"
        proj = self._proj
        for (pq, pk, pv, po, pg, pu, pd), (n_attn, n_q, n_k, n_post_attn, n_ffn, n_post_ffw), \
                cos, sin, window, kc, vc in self._plan:
            rms_norm_into(h2, n_attn, eps, x1)
            proj(pq, xin, qf)
            proj(pk, xin, kf)
            proj(pv, xin, vf)
            if c.qk_norm:
                rms_norm_into(q, n_q, eps, q)
                rms_norm_into(k, n_k, eps, k)
            rope_into(q, cos[pos], sin[pos], neox)
            rope_into(k, cos[pos], sin[pos], neox)
            kc[:, pos] = k
            vc[:, pos] = v
            keys = pos + 1 if window <= 0 else min(pos + 1, window)
            attend = attend_parallel_into if keys >= PARALLEL_KEYS else attend_into
            attend(q, kc, vc, pos, window, scale, self.scores, self.att)
            proj(po, attf, o0)
            if c.post_norms:
                rms_norm_into(self.o, n_post_attn, eps, self.o)
            add_into(self.h, o0)
            rms_norm_into(h2, n_ffn, eps, x1)
            proj(pg, xin, self.g)
            proj(pu, xin, self.u)
            gated_act_into(self.g, self.u, gelu, self.mid)
            proj(pd, self.mid, o20)
            if c.post_norms:
                rms_norm_into(self.o2, n_post_ffw, eps, self.o2)
            add_into(self.h, o20)
        rms_norm_into(h2, self.norms["output_norm"], eps, x1)
        hd = self.head
        # The head (K = d_model, N = vocabulary) runs output-tiled: split-K would stream two
        # vocabulary-wide partial sums through the cache once per eight rows.
        if self.fmt == "fp32":
            K.dense_fp32_tiled(hd.wt, xin, self.logits)
        else:
            K.dense_int8_tiled(hd.q, hd.scales, self.group, xin, self.logits)
        self.bytes_read += hd.nbytes
        if c.final_logit_softcap:
            cap = c.final_logit_softcap
            np.tanh(self.logits / cap, out=self.logits)
            self.logits *= cap
        self.pos += 1
        return self.logits

    @property
    def block_bytes(self) -> int:
        """Weight bytes of the block projections (what sparsity can skip)."""
        return sum(p.nbytes for p in self.projs.values())

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Feed the prompt token by token (decode-style); returns the last logits."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.reset()
        for t in ids:
            logits = self.step(t)
        return logits

    def generate(self, prompt_ids: list[int], n: int, stop_ids=frozenset()) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (n tokens at most)."""
        logits = self.prefill(prompt_ids)
        out: list[int] = []
        while len(out) < n:
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok in stop_ids or len(out) == n:
                break
            logits = self.step(tok)
        return out
