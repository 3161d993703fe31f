"""GPU decode engine: the model's decode step on the CUDA sparse GEMV kernels, one graph per token.

Weights are repacked once at load, tensor by tensor straight from the GGUF file, into the
kernels' input-major layout on the GPU (fp16, bf16, or int8 with float32 scales per group of
``INT8_GROUP`` output channels). The whole batch-1 decode step -- embedding lookup by a
device-side token id, norms, RoPE from cos/sin tables indexed by a device-side position, the KV
write at that position, attention over the static cache under a position mask, every block
projection through ``sparse_gemv`` with its threshold read from device memory, the output head
through the same kernel at threshold -1 (dense), the greedy argmax, and the advance of token and
position -- is captured once in a ``torch.cuda.CUDAGraph`` and replayed per token. Nothing inside
the step talks to the host, so greedy decoding replays the graph back to back and synchronises
once at the end. Changing the sparsity writes the threshold vector; the graph stays valid.

The glue between projections computes :mod:`sparsify.model`'s formulas (the same RMS norm,
RoPE, grouped-query attention, activations, soft-capping), rearranged into fewer kernels, so this
engine is the model definition with the projections swapped and a static KV cache; the tests
hold it to the torch model. On CUDA the step is *fused* by default: per block, two residual-add
+ RMS-norm kernels, one attention kernel (q/k norm, RoPE, cache write, attention), q/k/v in one
GEMV launch, gate/up in one, and the down projection reading act(gate) * up directly -- seven
launches instead of about twenty (``fused=False``, or ``SPARSIFY_CUDA_FUSED=0`` in the
environment, keeps the torch glue). Where a block has no post-norms (llama), the two norms fold
into the GEMVs as well: q/k/v and gate/up read the residual stream and RMS-norm it inside the
kernel, attn_output and ffn_down add their result into it, so a block is five launches
(``fold_norms=False``, or ``SPARSIFY_CUDA_FOLD_NORMS=0``, keeps the norm kernels). The
q/k/v and gate/up launches also leave their K-splits unreduced, one row of partial sums per
split, which the attention kernel and the ffn_down GEMV add while they read their input, so
neither launch has a reduction tail (``defer=False``, or ``SPARSIFY_CUDA_DEFER=0``, keeps the
reduction in the GEMVs; ``"qkv"`` or ``"ffn"`` defers one of the two; it is kept anyway where a
launch has more splits than ``MAX_QKV_PARTS`` / ``MAX_FFN_PARTS``). The attention kernel knows
attn_output's input before that GEMV starts, and can prefetch into L2 the weight rows the GEMV
will keep (``prefetch=True``, or ``SPARSIFY_CUDA_PREFETCH=1``; off by default: it measured
slower, kernels/cuda/NOTES.md); before it waits for the q/k/v GEMV it prefetches the cache rows
it will read (``prefetch_cache=False``, or ``SPARSIFY_CUDA_PREFETCH_CACHE=0``, turns that off).
From 512 visible keys on, attention splits each head's keys over several blocks (as many as fill
the device, ranges of 256 keys at least; ``attn_splits=1``, or ``SPARSIFY_CUDA_ATTN_SPLITS=1``,
keeps one block per head). From 4096 keys on (``attn_group_from``; 8192 over a float16 cache)
each block serves all the query heads of one key/value head instead, so that a cache row is
read once per group rather than once per query head (``attn_group=False``, or
``SPARSIFY_CUDA_ATTN_GROUP=0``, keeps the split per query head there too). The KV cache holds
float32 by default; ``kv_cache="f16"`` (or ``SPARSIFY_CUDA_KV_CACHE=f16``) stores keys and
values in float16, llama.cpp's default cache type: half the memory, and half the bytes attention
reads at long contexts, with every product and sum still in float32.
``device="cpu"`` runs the torch glue eagerly with a masked matmul in place of the kernel, for
testing the glue without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import SparsifyError

FORMATS = ("fp16", "bf16", "int8")
KV_CACHES = {"f32": torch.float32, "f16": torch.float16}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
# Visible keys from which attention runs split (below, one block per head is as fast), and
# from which each block serves a key/value head's group of query heads (below, the split per
# query head is faster): kernels/cuda/NOTES.md, H18, H21 and H22; over a float16 cache the split
# per query head keeps up to about 8192 keys (H25).
ATTN_LONG_KEYS = 512
ATTN_GROUP_KEYS = 4096
ATTN_GROUP_KEYS_F16 = 8192
INT8_GROUP = 128  # outputs per int8 scale: fixed by the CUDA kernel (SPARSIFY_GEMV_INT8_GROUP)
# GGUF float types: host view dtype, torch dtype of the same bits.
_FLOAT_FILE_TYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                     "BF16": (np.int16, torch.bfloat16)}
_NORMS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm",
          "post_ffw_norm")


def quantize_int8_groups(wt: torch.Tensor, group: int = INT8_GROUP,
                         rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of an input-major float32 (K, N) tensor, on its own device.

    Returns ``(q, scales)``: q int8 (K, N) in [-127, 127], scales float32 (K, ceil(N / group))
    with scale = max|w| / 127 over each group of consecutive outputs of one row (0 for an all-zero
    group); the same rule as ``sparsify_kernels.quant.quantize_int8``. Works ``rows`` rows at a
    time so the temporaries stay small for large matrices.
    """
    k, n = wt.shape
    ng = -(-n // group)
    pad = ng * group - n
    q = torch.empty((k, n), dtype=torch.int8, device=wt.device)
    s = torch.empty((k, ng), dtype=torch.float32, device=wt.device)
    for r0 in range(0, k, rows):
        blk = F.pad(wt[r0:r0 + rows].float(), (0, pad)).view(-1, ng, group)  # (r, groups, G)
        sc = blk.abs().amax(dim=2) / 127.0
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        qb = torch.round(blk / safe[:, :, None]).clamp_(-127, 127).to(torch.int8)
        q[r0:r0 + rows] = qb.view(-1, ng * group)[:, :n]
        s[r0:r0 + rows] = sc
    return q, s


@dataclass
class _Proj:
    """One projection in kernel layout on the device."""

    name: str
    index: int  # slot in the engine's threshold vector (-1: the head)
    k: int
    n: int
    w: torch.Tensor  # (K, N) input-major, fp16 / bf16 / int8
    scales: torch.Tensor | None  # int8: float32 (K, ceil(N / INT8_GROUP))
    norms: torch.Tensor | None  # float32 (K,): ‖W[:, i]‖ of the float32 source weights
    threshold: torch.Tensor  # float32 (1,) device view read by the kernel
    nbytes: int  # weight bytes (int8: with scales)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.k


class CUDAEngine:
    """Batch-1 greedy decode on the CUDA sparse GEMV kernels, the step captured in a CUDA graph.

    ``loaded`` is a :class:`sparsify.loader.Loaded`; ``fmt`` the weight format of every
    projection and the head ("fp16", "bf16", "int8"); ``max_len`` the KV cache length;
    ``kv_cache`` its element type ("f32" or "f16").
    :meth:`set_thresholds` makes projections sparse (names absent from the dict run dense, at
    threshold -1); :meth:`step` feeds one token and returns the logits (a reused float32 (V,)
    device buffer); :meth:`decode_greedy` continues greedily with no host synchronisation.
    """

    def __init__(self, loaded, fmt: str = "fp16", max_len: int = 2048,
                 device: str | torch.device = "cuda", use_graph: bool = True,
                 fused: bool | None = None, fold_norms: bool | None = None,
                 defer: bool | str | None = None, prefetch: bool | None = None,
                 prefetch_cache: bool | None = None, attn_splits: int | None = None,
                 attn_group: bool | None = None, attn_group_from: int | None = None,
                 kv_cache: str | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")
        if kv_cache is None:
            kv_cache = os.environ.get("SPARSIFY_CUDA_KV_CACHE", "") or "f32"
        if kv_cache not in KV_CACHES:
            raise ValueError(f"unknown KV cache type {kv_cache!r} "
                             f"(choose from {', '.join(KV_CACHES)})")
        self.kv_cache = kv_cache
        self.cache_dtype = KV_CACHES[kv_cache]  # torch dtype of kc and vc
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDAEngine on cuda: no CUDA device is available to torch")
        cfg: ModelConfig = loaded.cfg
        self.cfg, self.fmt, self.max_len = cfg, fmt, max_len
        self.gguf = loaded.gguf
        self.use_graph = use_graph and self.device.type == "cuda"
        names = cfg.projection_names
        # One float32 per projection, read by the kernels at run time; -1 keeps every channel.
        self.thr = torch.full((len(names),), -1.0, dtype=torch.float32, device=self.device)
        self.projs: dict[str, _Proj] = {}
        for j, name in enumerate(names):
            self.projs[name] = self._pack(name, j)
        head_name = "token_embd" if cfg.tied_output else "output"
        self._head_thr = torch.full((1,), -1.0, dtype=torch.float32, device=self.device)
        self.head = self._pack(head_name, -1)
        self.norms: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layer):
            for n in _NORMS:
                name = f"blk.{i}.{n}"
                if name + ".weight" in self.gguf.tensors:
                    self.norms[name] = self._tensor(name)
        self.norms["output_norm"] = self._tensor("output_norm")
        # float32 like the torch model's embedding rows; one row is read per token.
        self.emb = self._tensor("token_embd")
        self._alloc()
        self.weight_aware = False
        # One CUDA graph per attention mode (see _capture), captured on first use.
        self._graphs: list[torch.cuda.CUDAGraph | None] = [None, None, None]
        self._counting = False
        # Diagnostic (bench only): GEMVs replaced by fixed zero outputs, to time the glue alone.
        self._skip_gemv: dict[int, torch.Tensor] | None = None
        self.ws = None
        if fused is None:
            fused = os.environ.get("SPARSIFY_CUDA_FUSED", "1") != "0"
        self.fused = False
        if self.device.type == "cuda":
            from sparsify_kernels import cuda as kc

            self._kc = kc
            need = max(kc.workspace_bytes(p.k, p.n) for p in [*self.projs.values(), self.head])
            for i in range(cfg.n_layer):
                for grp in self._groups(i):
                    need = max(need, kc.group_workspace_bytes(grp[0].k, [p.n for p in grp]))
            self.ws = torch.zeros(need, dtype=torch.uint8, device=self.device)
            self.fused = bool(fused) and kc.attention_supported(
                cfg.head_dim, cfg.head_dim_v, max_len, self.device,
                cache_dtype=self.cache_dtype)
        if fold_norms is None:
            fold_norms = os.environ.get("SPARSIFY_CUDA_FOLD_NORMS", "1") != "0"
        # Gemma's post-norms need the RMS of a projection's whole output before the residual
        # add, which no single block of the GEMV has: those blocks keep the norm kernels.
        self.fold_norms = bool(fold_norms) and self.fused and not cfg.post_norms
        if defer is None:
            defer = os.environ.get("SPARSIFY_CUDA_DEFER", "1")
        which = {"1": ("qkv", "ffn"), "0": (), "qkv": ("qkv",), "ffn": ("ffn",),
                 True: ("qkv", "ffn"), False: ()}.get(defer)
        if which is None:
            raise ValueError(f"defer must be True, False, 'qkv' or 'ffn', got {defer!r}")
        self._plan_deferred(which if self.fused else ())
        if prefetch is None:
            prefetch = os.environ.get("SPARSIFY_CUDA_PREFETCH", "0") == "1"
        self.prefetch = bool(prefetch) and self.fused
        if prefetch_cache is None:
            prefetch_cache = os.environ.get("SPARSIFY_CUDA_PREFETCH_CACHE", "1") != "0"
        self.prefetch_cache = bool(prefetch_cache) and self.fused
        # Split-KV attention: from attn_switch visible keys on each query head's keys spread
        # over attn_splits blocks; from attn_group_from on (attn_group), one block per key/value
        # head and range serves the group's query heads, over attn_group_splits blocks per group.
        if attn_splits is None:
            env = os.environ.get("SPARSIFY_CUDA_ATTN_SPLITS", "")
            attn_splits = int(env) if env else (
                self._kc.attention_splits(cfg.n_head, self.device) if self.fused else 1)
        if attn_splits < 1:
            raise ValueError(f"attn_splits must be positive, got {attn_splits}")
        self.attn_splits = int(attn_splits) if self.fused else 1
        if attn_group is None:
            attn_group = os.environ.get("SPARSIFY_CUDA_ATTN_GROUP", "1") != "0"
        self.attn_group = bool(attn_group) and self.attn_splits > 1  # fused only
        self.attn_group_splits = 1
        if self.attn_group:
            self.attn_group_splits = self._kc.attention_splits(cfg.n_head_kv, self.device)
            self.attn_group = (
                cfg.n_head // cfg.n_head_kv <= self._kc.MAX_GROUP_HEADS
                and self.attn_group_splits > 1
                and self._kc.attention_supported(
                    cfg.head_dim, cfg.head_dim_v, max_len, self.device, n_head=cfg.n_head,
                    n_head_kv=cfg.n_head_kv, splits=self.attn_group_splits, group_heads=True,
                    cache_dtype=self.cache_dtype))
        self.attn_group_from = int(attn_group_from or (
            ATTN_GROUP_KEYS_F16 if self.kv_cache == "f16" else ATTN_GROUP_KEYS))
        # Visible keys from which the split graph replays: where the launch has two ranges by
        # the kernel's own rule (decode_ops.h), and not below ATTN_LONG_KEYS.
        self.attn_switch = ATTN_LONG_KEYS
        if self.attn_splits > 1:
            keys = self._kc.attention_split_keys(self.attn_splits, self.device)
            self.attn_switch = max(ATTN_LONG_KEYS, 2 * keys)
        self._attn_mode = 0  # the attention of the step being run or captured (see _run)
        splits = max(self.attn_splits, self.attn_group_splits if self.attn_group else 1)
        self.attn_ws = (self._kc.attention_workspace(cfg.n_head, cfg.head_dim_v, splits,
                                                     self.device)
                        if splits > 1 else None)

    # -- setup ------------------------------------------------------------------------------

    # Deferred split-K reduction: the q/k/v and gate/up launches leave one row of partial sums
    # per K-split, added by their consumer (the attention kernel; the ffn_down GEMV while it
    # forms act(gate) * up), when there are at most this many rows.
    MAX_QKV_PARTS = 24
    MAX_FFN_PARTS = 8

    def _plan_deferred(self, which: tuple[str, ...]) -> None:
        """Partial-output buffers for the q/k/v and/or gate/up launches named in ``which``
        (``defer_qkv`` / ``defer_ffn`` say which are deferred)."""
        self.defer_qkv = self.defer_ffn = False
        if not which:
            return
        c, kc = self.cfg, self._kc
        x = self.h if self.fold_norms else self.xn
        parts = {}
        for kind, n_max in (("qkv", self.MAX_QKV_PARTS), ("ffn", self.MAX_FFN_PARTS)):
            if kind not in which:
                continue
            seen = set()
            for i in range(c.n_layer):
                projs = self._groups(i)[0 if kind == "qkv" else 1]
                norm = self.norms[f"blk.{i}." + ("attn_norm" if kind == "qkv" else "ffn_norm")]
                seen.add(kc.group_splits([p.w for p in projs], x,
                                         norm=norm if self.fold_norms else None))
            if len(seen) == 1 and 1 < next(iter(seen)) <= n_max:
                parts[kind] = next(iter(seen))
        nq, nk = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        f, dev = torch.float32, self.device
        if "qkv" in parts:
            self.defer_qkv = True
            self.qkv_parts = torch.zeros((parts["qkv"], self.qkv.numel()), dtype=f, device=dev)
            qp = self.qkv_parts
            self.qkv_part_views = [qp[:, :nq], qp[:, nq:nq + nk], qp[:, nq + nk:]]
        if "ffn" in parts:
            self.defer_ffn = True
            self.gu_parts = torch.zeros((parts["ffn"], 2 * c.d_ff), dtype=f, device=dev)
            self.gu_part_views = [self.gu_parts[:, :c.d_ff], self.gu_parts[:, c.d_ff:]]

    def _tensor(self, name: str) -> torch.Tensor:
        """A GGUF tensor as float32 on the device (numpy order: (out, in) for weights).

        Float files (F16/BF16/F32) travel in their own 2 or 4 bytes and widen on the device
        (exact); quantized ones are dequantized on the host, one tensor at a time.
        """
        info = self.gguf.info(name + ".weight")
        kind = _FLOAT_FILE_TYPES.get(info.type_name)
        if kind is None:
            arr = self.gguf.dequantize(name + ".weight")
            return torch.from_numpy(arr).to(self.device)
        np_dtype, t_dtype = kind
        host = np.array(self.gguf.raw(name + ".weight").view(np_dtype)).reshape(info.shape)
        return torch.from_numpy(host).to(self.device).view(t_dtype).float()

    def _pack(self, name: str, index: int) -> _Proj:
        w = self._tensor(name)  # (N, K) float32, output-major
        n, k = w.shape
        norms = torch.linalg.vector_norm(w, dim=0) if index >= 0 else None  # (K,)
        wt = w.t()  # (K, N) view: input-major
        if self.fmt == "int8":
            q, scales = quantize_int8_groups(wt)
            nbytes = q.numel() + scales.numel() * 4
        else:
            q = wt.to(_DTYPES[self.fmt]).contiguous()
            scales, nbytes = None, q.numel() * q.element_size()
        del w, wt
        thr = self.thr[index:index + 1] if index >= 0 else self._head_thr
        return _Proj(name, index, k, n, q, scales, norms, thr, nbytes)

    def _alloc(self) -> None:
        c, dev, L = self.cfg, self.device, self.max_len
        f = torch.float32
        nq, nk = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.tok = torch.zeros(1, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.history = torch.zeros(L + 1, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(c.vocab_size, dtype=f, device=dev)
        self.kept = torch.zeros(len(self.projs), dtype=torch.int64, device=dev)
        self.kc = [torch.zeros((c.n_head_kv, L, c.head_dim), dtype=self.cache_dtype, device=dev)
                   for _ in range(c.n_layer)]
        self.vc = [torch.zeros((c.n_head_kv, L, c.head_dim_v), dtype=self.cache_dtype,
                               device=dev)
                   for _ in range(c.n_layer)]
        self.kpos = torch.arange(L, device=dev)
        self.ninf = torch.full((L,), float("-inf"), dtype=f, device=dev)
        self.zero = torch.zeros(L, dtype=f, device=dev)
        # C, S (L, head_dim) per (base, linear scale) for _rope, from angles computed as
        # model.rope does (float64, then cast) so both see the same float32 cos and sin.
        D, rd, half = c.head_dim, c.rope_dim, c.rope_dim // 2
        perm = torch.arange(D)
        pairs = torch.arange(half)
        lo, hi = (pairs, pairs + half) if c.rope_neox else (2 * pairs, 2 * pairs + 1)
        perm[lo], perm[hi] = hi, lo
        self.rope_perm = perm.to(dev)
        self.rope_perm32 = perm.to(device=dev, dtype=torch.int32)  # the attention kernel's
        self.qkv = torch.zeros(c.n_head * c.head_dim + c.n_head_kv * (c.head_dim + c.head_dim_v),
                               dtype=f, device=dev)
        self.gu = torch.zeros(2 * c.d_ff, dtype=f, device=dev)
        # Fused step: the residual stream, the normed block input, the attention result and the
        # two projections added back into the stream.
        self.h = torch.zeros(c.d_model, dtype=f, device=dev)
        self.xn = torch.zeros(c.d_model, dtype=f, device=dev)
        self.att = torch.zeros(c.n_head * c.head_dim_v, dtype=f, device=dev)
        self.obuf = torch.zeros(c.d_model, dtype=f, device=dev)
        self.fbuf = torch.zeros(c.d_model, dtype=f, device=dev)
        self.qkv_views = [self.qkv[:nq], self.qkv[nq:nq + nk], self.qkv[nq + nk:]]
        self.gu_views = [self.gu[:c.d_ff], self.gu[c.d_ff:]]
        self.rope_tables: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(c.n_layer):
            key = self._rope_key(i)
            if key not in self.rope_tables:
                base, scale = key
                inv = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
                ang = (torch.arange(L, dtype=torch.float64)[:, None] / scale) * inv[None, :]
                cos, sin = torch.cos(ang).to(f), torch.sin(ang).to(f)  # (L, half)
                cc, ss = torch.ones(L, D, dtype=f), torch.zeros(L, D, dtype=f)
                cc[:, lo], cc[:, hi] = cos, cos
                ss[:, lo], ss[:, hi] = -sin, sin
                self.rope_tables[key] = (cc.to(dev), ss.to(dev))
        self.n_pos = 0

    def _rope_key(self, i: int) -> tuple[float, float]:
        c = self.cfg
        swa = c.swa_layers[i]
        # model.block: local layers use the SWA base and no linear scaling.
        return (c.rope_base_swa if swa else c.rope_base, 1.0 if swa else c.rope_scale)

    # -- thresholds ---------------------------------------------------------------------------

    def set_thresholds(self, thresholds: dict[str, float] | None,
                       weight_aware: bool = False) -> None:
        """Install per-tensor thresholds (None: all dense); ``weight_aware`` scores |x|·‖W[:, i]‖.

        A device copy into the threshold vector: a captured graph follows it. Switching the
        criterion changes the kernels' arguments, so the graph is captured again on next use.
        """
        vals = [-1.0] * len(self.projs)
        if thresholds is not None:
            unknown = sorted(set(thresholds) - set(self.projs))
            if unknown:
                raise ValueError(f"thresholds for tensors the model lacks: {unknown[:3]}")
            for name, t in thresholds.items():
                vals[self.projs[name].index] = float(t)
        self.thr.copy_(torch.tensor(vals, dtype=torch.float32))
        if bool(weight_aware) != self.weight_aware:
            self.weight_aware = bool(weight_aware)
            self._graphs = [None, None, None]

    # -- the step -----------------------------------------------------------------------------

    def _groups(self, i: int) -> list[list[_Proj]]:
        """Projections of block i that share an input: q/k/v and gate/up."""
        P, pre = self.projs, f"blk.{i}."
        return [[P[pre + n] for n in ("attn_q", "attn_k", "attn_v")],
                [P[pre + n] for n in ("ffn_gate", "ffn_up")]]

    def _gemv_group(self, projs: list[_Proj], x: torch.Tensor, outs: list[torch.Tensor],
                    norm: torch.Tensor | None = None) -> None:
        """The projections of one input in one launch, each into its ``outs`` buffer; with
        ``norm`` the input is rms_norm(x) * norm, formed inside the kernel."""
        if self._skip_gemv is not None:
            return
        wa = self.weight_aware
        self._kc.sparse_gemv_group([p.w for p in projs], x, [p.threshold for p in projs], outs,
                                   factors=[p.norms if wa else None for p in projs],
                                   scales=[p.scales for p in projs], norm=norm,
                                   eps=self.cfg.norm_eps, workspace=self.ws)

    def _gemv(self, p: _Proj, x: torch.Tensor, out: torch.Tensor | None = None,
              up: torch.Tensor | None = None, act: str | None = None,
              accumulate: bool = False) -> torch.Tensor:
        """y = W^T (x ⊙ keep) for x (K,) float32 -> (N,) float32 (into ``out`` when given).

        With ``up`` the input is act(x) * up, formed inside the kernel (CUDA only); with
        ``accumulate`` the result is added into ``out``.
        """
        if self._skip_gemv is not None:
            return out if out is not None else self._skip_gemv[p.n]
        factor = p.norms if (self.weight_aware and p.index >= 0) else None
        if self._counting and p.index >= 0:
            score = x.abs() if factor is None else x.abs() * factor
            self.kept[p.index] += (~(score <= p.threshold)).sum()
        if self.device.type == "cuda":
            return self._kc.sparse_gemv(p.w, x, p.threshold, factor=factor, scales=p.scales,
                                        out=out, workspace=self.ws, up=up, act=act,
                                        accumulate=accumulate)
        # CPU stand-in for the kernel (tests of the glue): mask, then a float32 matmul.
        score = x.abs() if factor is None else x.abs() * factor
        xm = x * ~(score <= p.threshold)
        w = p.w.float()
        if p.scales is not None:
            w = w * p.scales.repeat_interleave(INT8_GROUP, dim=1)[:, :p.n]
        y = xm @ w
        if out is None:
            return y
        return out.add_(y) if accumulate else out.copy_(y)

    def _rope(self, x: torch.Tensor, c: torch.Tensor, sn: torch.Tensor) -> torch.Tensor:
        """model.rope for one position in three kernels: x (H, D) -> x*C + x[:, perm]*S.

        ``perm`` swaps each rotated pair (adjacent for NORM, halves for NEOX) and S carries the
        sign, so a*cos - b*sin and a*sin + b*cos come out of one multiply-add; features past
        rope_dim have C = 1, S = 0, perm = identity.
        """
        return torch.addcmul(x * c, x.index_select(1, self.rope_perm), sn)

    def _decode(self) -> None:
        """One token at self.pos from self.tok: logits, argmax into self.tok, pos + 1.

        Only device tensors and fixed shapes: safe to capture in a CUDA graph. The glue is
        written for few kernels per block (each costs a few microseconds of launch and
        dependency wait, which at batch 1 is comparable to a small GEMV): q, k and v land in one
        buffer so one RoPE covers q and k; the mask is an additive bias folded into the scores'
        batched matmul; norms use the fused ``F.rms_norm`` (same formula as model.rms_norm).
        The fused CUDA step (:meth:`_decode_fused`) replaces all of this glue.
        """
        if self.fused and not self._counting:
            self._decode_fused()
            return
        c = self.cfg
        pos = self.pos
        eps, D = c.norm_eps, c.d_model
        nq, nk = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        h = self.emb.index_select(0, self.tok).view(-1)  # (D,)
        if c.embed_scale != 1.0:
            h = h * c.embed_scale
        # Additive masks over the static cache (L,): 0 where a key is visible, -inf elsewhere.
        diff = pos - self.kpos  # query position minus key position
        ninf, zero = self.ninf, self.zero
        biases = {0: torch.where(diff >= 0, zero, ninf).view(1, 1, -1)}
        if c.sliding_window > 0:
            ok = (diff >= 0) & (diff < c.sliding_window)
            biases[c.sliding_window] = torch.where(ok, zero, ninf).view(1, 1, -1)
        ropes = {key: (cs.index_select(0, pos), sn.index_select(0, pos))  # (1, head_dim) each
                 for key, (cs, sn) in self.rope_tables.items()}
        rep = c.n_head // c.n_head_kv
        qkv, gu = self.qkv, self.gu
        P = self.projs
        for i in range(c.n_layer):
            pre = f"blk.{i}."
            x = F.rms_norm(h, (D,), self.norms[pre + "attn_norm"], eps)
            self._gemv(P[pre + "attn_q"], x, qkv[:nq])
            self._gemv(P[pre + "attn_k"], x, qkv[nq:nq + nk])
            self._gemv(P[pre + "attn_v"], x, qkv[nq + nk:])
            cos, sin = ropes[self._rope_key(i)]
            if c.qk_norm:
                q = F.rms_norm(qkv[:nq].view(c.n_head, c.head_dim), (c.head_dim,),
                               self.norms[pre + "attn_q_norm"], eps)
                k = F.rms_norm(qkv[nq:nq + nk].view(c.n_head_kv, c.head_dim), (c.head_dim,),
                               self.norms[pre + "attn_k_norm"], eps)
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            else:
                qk = self._rope(qkv[:nq + nk].view(c.n_head + c.n_head_kv, c.head_dim), cos, sin)
                q, k = qk[:c.n_head], qk[c.n_head:]
            v = qkv[nq + nk:].view(c.n_head_kv, 1, c.head_dim_v)
            kc, vc = self.kc[i], self.vc[i]
            kc.index_copy_(1, pos, k.reshape(c.n_head_kv, 1, c.head_dim).to(kc.dtype))
            vc.index_copy_(1, pos, v.to(vc.dtype))
            if kc.dtype != torch.float32:  # float16 rows, float32 products as in the kernel
                kc, vc = kc.float(), vc.float()
            # Grouped-query: head h reads kv head h // rep, as repeat_interleave in the model.
            qg = q.reshape(c.n_head_kv, rep, c.head_dim)
            bias = biases[c.sliding_window if c.swa_layers[i] else 0]
            # bias + scale * (q k^T): the model's (q k^T) * scale, then masked_fill(-inf).
            scores = torch.baddbmm(bias, qg, kc.transpose(1, 2), alpha=c.attn_scale)
            a = (torch.softmax(scores, dim=-1) @ vc).reshape(-1)  # (H * Dv,)
            o = self._gemv(P[pre + "attn_output"], a)
            if c.post_norms:
                o = F.rms_norm(o, (D,), self.norms[pre + "post_attention_norm"], eps)
            h = h + o
            x = F.rms_norm(h, (D,), self.norms[pre + "ffn_norm"], eps)
            self._gemv(P[pre + "ffn_gate"], x, gu[:c.d_ff])
            self._gemv(P[pre + "ffn_up"], x, gu[c.d_ff:])
            g = gu[:c.d_ff]
            act = F.silu(g) if c.activation == "silu" else F.gelu(g, approximate="tanh")
            f = self._gemv(P[pre + "ffn_down"], act * gu[c.d_ff:])
            if c.post_norms:
                f = F.rms_norm(f, (D,), self.norms[pre + "post_ffw_norm"], eps)
            h = h + f
        x = F.rms_norm(h, (D,), self.norms["output_norm"], eps)
        logits = self._gemv(self.head, x, None if c.final_logit_softcap else self.logits)
        if c.final_logit_softcap:
            cap = c.final_logit_softcap
            torch.mul(torch.tanh(logits / cap), cap, out=self.logits)
        nxt = torch.argmax(self.logits).view(1)
        self.history.index_copy_(0, pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def _decode_fused(self) -> None:
        """_decode in seven launches per block, five with ``fold_norms``, on the decode kernels.

        Per block: h += (previous f, post-normed on gemma), x = rms_norm(h); q/k/v GEMVs in one
        launch; attention (q/k norm, RoPE at pos, cache write, softmax over visible keys);
        attn_output GEMV; h += o (post-normed), x = rms_norm(h); gate/up in one launch; ffn_down
        on act(gate) * up formed inside the GEMV. With ``fold_norms`` (blocks without
        post-norms) the norms ride on the GEMVs: q/k/v and gate/up read h and norm it in the
        kernel, attn_output and ffn_down add into h; five launches per block. Counting passes use
        _decode's torch glue, which materializes every projection input.
        """
        c, K, P = self.cfg, self._kc, self.projs
        eps, h, xn = c.norm_eps, self.h, self.xn
        torch.index_select(self.emb, 0, self.tok, out=h.view(1, -1))
        if c.embed_scale != 1.0:
            h.mul_(c.embed_scale)
        r, post = None, None
        fold = self.fold_norms
        # Deferred reductions: q/k/v and gate/up write their split rows, attention and ffn_down
        # add them.
        qkv, qkv_outs = ((self.qkv_parts, self.qkv_part_views) if self.defer_qkv
                         else (self.qkv, self.qkv_views))
        gu_outs = self.gu_part_views if self.defer_ffn else self.gu_views
        for i in range(c.n_layer):
            pre = f"blk.{i}."
            qkv_projs, gu_projs = self._groups(i)
            if fold:  # q/k/v norm the stream themselves
                self._gemv_group(qkv_projs, h, qkv_outs, norm=self.norms[pre + "attn_norm"])
            else:
                K.add_rms_norm(h, r, self.norms[pre + "attn_norm"], eps, xn, post)
                self._gemv_group(qkv_projs, xn, qkv_outs)
            cos, sin = self.rope_tables[self._rope_key(i)]
            qn = self.norms[pre + "attn_q_norm"] if c.qk_norm else None
            kn = self.norms[pre + "attn_k_norm"] if c.qk_norm else None
            o = P[pre + "attn_output"]
            mode = self._attn_mode
            hints = {"prefetch_cache": self.prefetch_cache,
                     "splits": (1, self.attn_splits, self.attn_group_splits)[mode],
                     "workspace": self.attn_ws if mode else None, "group_heads": mode == 2}
            if self.prefetch and self._skip_gemv is None:
                hints.update(next_w=o.w, next_threshold=o.threshold, next_scales=o.scales,
                             next_factor=o.norms if self.weight_aware else None)
            K.attention_decode(qkv, self.kc[i], self.vc[i], self.pos, cos, sin,
                               self.rope_perm32, self.att, n_head=c.n_head, scale=c.attn_scale,
                               eps=eps, window=c.sliding_window if c.swa_layers[i] else 0,
                               q_norm=qn, k_norm=kn, **hints)
            if fold:  # attn_output adds into the stream, gate/up norm it
                self._gemv(o, self.att, h, accumulate=True)
                self._gemv_group(gu_projs, h, gu_outs, norm=self.norms[pre + "ffn_norm"])
                self._gemv(P[pre + "ffn_down"], gu_outs[0], h, up=gu_outs[1],
                           act=c.activation, accumulate=True)
                continue
            self._gemv(o, self.att, self.obuf)
            K.add_rms_norm(h, self.obuf, self.norms[pre + "ffn_norm"], eps, xn,
                           self.norms[pre + "post_attention_norm"] if c.post_norms else None)
            self._gemv_group(gu_projs, xn, gu_outs)
            self._gemv(P[pre + "ffn_down"], gu_outs[0], self.fbuf, up=gu_outs[1],
                       act=c.activation)
            r = self.fbuf
            post = self.norms[pre + "post_ffw_norm"] if c.post_norms else None
        K.add_rms_norm(h, r, self.norms["output_norm"], eps, xn, post)
        logits = self._gemv(self.head, xn, None if c.final_logit_softcap else self.logits)
        if c.final_logit_softcap:
            cap = c.final_logit_softcap
            torch.mul(torch.tanh(logits / cap), cap, out=self.logits)
        nxt = torch.argmax(self.logits).view(1)
        self.history.index_copy_(0, self.pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def _capture(self, mode: int = 0) -> None:
        """Capture _decode in a CUDA graph (after a warm-up on a side stream, as torch asks)
        into ``_graphs[mode]``, with the attention of ``mode``: 0 one block per head; 1 split-KV
        per query head, replayed from ``attn_switch`` visible keys on; 2 split-KV per key/value
        head, from ``attn_group_from`` keys on."""
        self._attn_mode = mode
        tok, pos = self.tok.clone(), self.pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # builds the kernel library, settles cuBLAS workspaces
                self._decode()
                self.tok.copy_(tok)
                self.pos.copy_(pos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._decode()
        self._graphs[mode] = g

    def _run(self) -> None:
        if self.n_pos >= self.max_len:
            raise ValueError(f"the engine's KV cache holds {self.max_len} positions")
        # Below attn_switch keys the split launch would run one range anyway, or gain nothing,
        # and its idle blocks still cost a little: those positions replay the unsplit graph.
        keys = self.n_pos + 1
        mode = (2 if self.attn_group and keys >= self.attn_group_from
                else 1 if self.attn_splits > 1 and keys >= self.attn_switch else 0)
        self._attn_mode = mode
        if self.use_graph and not self._counting:
            if self._graphs[mode] is None:
                self._capture(mode)
            self._graphs[mode].replay()
        else:
            self._decode()
        self.n_pos += 1

    def reset(self) -> None:
        """Empty the KV cache (position 0) and the kept-row counters."""
        self.pos.zero_()
        self.kept.zero_()
        self.n_pos = 0

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position; returns the logits (reused (V,) float32 buffer)."""
        self.tok.fill_(int(token))
        self._run()
        return self.logits

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Reset, then feed the prompt token by token (decode-style); returns the last logits."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.reset()
        for t in ids:
            self.step(t)
        return self.logits

    def save_state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The position and next token, for :meth:`restore_state` (the KV cache before the
        position is left as is by later steps, so restoring replays the same decode)."""
        return self.tok.clone(), self.pos.clone(), self.n_pos

    def restore_state(self, state: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        tok, pos, n_pos = state
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.n_pos = n_pos

    def decode_greedy(self, n: int) -> None:
        """n greedy steps from the last argmax, back to back on the device (no synchronisation).

        The tokens land in ``history`` (read them with :meth:`generated`).
        """
        for _ in range(n):
            self._run()

    def generated(self, start: int, n: int) -> list[int]:
        """Greedy picks made at positions start .. start + n - 1 (synchronises)."""
        return self.history[start:start + n].tolist()

    def generate(self, prompt_ids: list[int], n: int, stop_ids=frozenset()) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (n tokens at most, stopping at ``stop_ids``)."""
        self.prefill(prompt_ids)
        start = len(prompt_ids) - 1
        if not stop_ids:
            self.decode_greedy(n - 1)
            return self.generated(start, n)
        out: list[int] = []
        while len(out) < n:
            tok = int(self.history[start + len(out)])
            out.append(tok)
            if tok in stop_ids or len(out) == n:
                break
            self._run()
        return out

    def glue_ms(self, ids: list[int], steps: int = 64) -> float:
        """Milliseconds per decode step with every GEMV left out (diagnostic, not decoding).

        The same step is captured with each projection replaced by a fixed zero vector (the
        q/k/v and gate/up buffers keep their last values), so what is timed is everything that
        is not a GEMV: norms, RoPE, attention, activations, residual adds, argmax. The KV cache
        and position are reset afterwards.
        """
        self.prefill(ids)
        self.obuf.zero_()  # the fused step adds these back into the stream: keep them zero
        self.fbuf.zero_()
        ns = {p.n for p in [*self.projs.values(), self.head]}
        self._skip_gemv = {n: torch.zeros(n, dtype=torch.float32, device=self.device) for n in ns}
        saved = self._graphs[0]
        try:
            self._capture(0)
            graph = self._graphs[0]
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / steps
        finally:
            self._skip_gemv = None
            self._graphs[0] = saved
            self.reset()
        return ms

    # -- accounting ---------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Weight bytes of the block projections (what sparsity can skip)."""
        return sum(p.nbytes for p in self.projs.values())

    @property
    def weight_bytes(self) -> int:
        return self.block_bytes + self.head.nbytes

    def count_bytes(self, prompt_ids: list[int], n: int, state=None
                    ) -> tuple[float, dict[str, float]]:
        """Weight bytes read per decode token over n greedy tokens after ``prompt_ids`` (or
        from ``state``, :meth:`save_state` after that prompt), and the realized sparsity per
        tensor, from an eager pass that counts kept channels with the kernels' own compare
        (not timed)."""
        self._counting = True
        try:
            if state is None:
                self.prefill(prompt_ids)
            else:
                self.restore_state(state)
            self.kept.zero_()
            self.decode_greedy(n)
            kept = self.kept.cpu().numpy()
        finally:
            self._counting = False
        row_bytes = np.array([p.row_bytes for p in self.projs.values()], dtype=np.float64)
        total = float((kept * row_bytes).sum()) / n + self.head.nbytes
        ks = np.array([p.k for p in self.projs.values()], dtype=np.float64)
        realized = {name: 1.0 - kept[p.index] / (ks[p.index] * n)
                    for name, p in self.projs.items()}
        return total, realized


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def rounded_model(engine: CUDAEngine, loaded, device: str | torch.device = "cpu"):
    """The torch model over ``engine``'s own weights (fp16/bf16/int8-rounded projections and
    head, back in float32) on ``device``: it and the engine then differ only in summation order
    and in entries that sit at a threshold. A tied head keeps the float32 embedding."""
    from .model import Model, Weights

    w = Weights(loaded.gguf, device=device)
    for p in [*engine.projs.values(), engine.head]:
        if p.name == "token_embd":
            continue
        wt = p.w.float()
        if p.scales is not None:
            wt = wt * p.scales.repeat_interleave(INT8_GROUP, dim=1)[:, :p.n]
        w._cache[p.name] = wt.t().contiguous().to(device)
    return Model(loaded.cfg, w)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / float(np.median(times))


def device_info(device: torch.device) -> dict:
    """What the record says about the GPU: torch's name, CUDA, driver (from nvidia-smi)."""
    props = torch.cuda.get_device_properties(device)
    info = {"device": torch.cuda.get_device_name(device),
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda}
    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        out = subprocess.run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        info["driver"] = out
    except (OSError, subprocess.SubprocessError):
        info["driver"] = "unknown (nvidia-smi not available)"
    return info


def _time_greedy(engine: CUDAEngine, ids: list[int], tokens: int, repeats: int,
                 state=None) -> list[float]:
    """tokens/s of greedy decode (prefill excluded), one device synchronisation per run; from
    ``state`` (:meth:`CUDAEngine.save_state` after prefilling ``ids``) instead of a prefill
    per run when given."""
    rates = []
    for _ in range(repeats):
        if state is None:
            engine.prefill(ids)
        else:
            engine.restore_state(state)
        torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        engine.decode_greedy(tokens)
        torch.cuda.synchronize(engine.device)
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def bench_cuda(loaded, table, levels: list[float], fmt: str, tokens: int, repeats: int,
               context: int | None = None, kv_cache: str | None = None) -> dict:
    """Decode tokens/s per sparsity level on the GPU, with bytes, GB/s and the bandwidth bound.

    The bound is (copy bandwidth measured in this run) / (weight bytes read per token): the
    tokens/s of a decoder that does nothing but stream its weights once per token. With
    ``context`` the prompt is that many tokens of built-in text, prefilled once per level; the
    repeats then decode from the same saved position. ``kv_cache``: the engine's cache type
    (None: its default).
    """
    from .bench import BENCH_PROMPT, bench_prompt_ids, is_synthetic, summarize, versions

    if fmt not in FORMATS:
        raise SparsifyError(f"--format {fmt} is not available on cuda "
                            f"(choose {', '.join(FORMATS)})")
    if not torch.cuda.is_available():
        raise SparsifyError("--device cuda: no CUDA device is available to torch")
    dev = torch.device("cuda", torch.cuda.current_device())
    ids = bench_prompt_ids(loaded.tokenizer, context)
    print(f"packing weights ({fmt}) on {torch.cuda.get_device_name(dev)} ...", file=sys.stderr)
    t0 = time.perf_counter()
    engine = CUDAEngine(loaded, fmt=fmt, max_len=len(ids) + tokens + 16, device=dev,
                        kv_cache=kv_cache)
    torch.cuda.synchronize(dev)
    pack_s = time.perf_counter() - t0
    copy_bw = copy_bandwidth(dev)
    weight_aware = table is not None and table.criterion == "weight-aware"
    dense_bytes = engine.weight_bytes
    rows = []
    for s in levels:
        thresholds = None if s == 0 or table is None else table.thresholds_at(s)
        engine.set_thresholds(thresholds, weight_aware and thresholds is not None)
        _time_greedy(engine, ids[:8], min(tokens, 8), 1)  # capture and warm up at this level
        state = None
        if context:
            print(f"level {s:g}: prefilling {len(ids)} tokens ...", file=sys.stderr)
            engine.prefill(ids)
            state = engine.save_state()
        print(f"level {s:g}: {repeats} x {tokens} tokens ...", file=sys.stderr)
        rates = _time_greedy(engine, ids, tokens, repeats, state)
        bpt, realized = engine.count_bytes(ids, tokens, state)
        ts = summarize(rates)
        bound = copy_bw / bpt
        rows.append({
            "sparsity": s, "tok_s": ts, "bytes_per_token": bpt,
            "gb_s": bpt * ts["median"] / 1e9,
            "realized_block_sparsity": 1 - (bpt - engine.head.nbytes) / engine.block_bytes,
            "ideal_speedup": dense_bytes / bpt,
            "bandwidth_bound_tok_s": bound, "pct_of_bound": 100 * ts["median"] / bound,
            "realized_min": float(min(realized.values())),
            "realized_max": float(max(realized.values())),
        })
    glue = engine.glue_ms(ids, min(tokens, 64)) if not context else None
    if glue is not None:
        print(f"glue alone (GEMVs left out): {glue:.3f} ms/step", file=sys.stderr)
    base = rows[0]["tok_s"]["median"] if levels and levels[0] == 0 else None
    for r in rows:
        r["speedup"] = r["tok_s"]["median"] / base if base else None
    info = device_info(dev)
    vers = versions()
    vers.update(cuda=info["cuda"], driver=info["driver"])
    return {
        "kind": "decode", "device": info["device"], "device_type": "cuda",
        "compute_capability": info["compute_capability"], "threads": None, "batch": 1,
        "versions": vers, "model": loaded.path.name, "architecture": loaded.cfg.arch,
        "synthetic": is_synthetic(loaded), "format": fmt, "tokens": tokens, "repeats": repeats,
        "prompt": BENCH_PROMPT if not context else None, "context": len(ids),
        "cuda_graph": True, "attn_splits": engine.attn_splits,
        "attn_group": engine.attn_group, "attn_group_splits": engine.attn_group_splits,
        "attn_group_from": engine.attn_group_from, "kv_cache": engine.kv_cache,
        "table": None if table is None else {"criterion": table.criterion},
        "weight_bytes_dense": dense_bytes, "head_bytes": engine.head.nbytes,
        "copy_bandwidth_GBps": copy_bw / 1e9, "pack_seconds": pack_s,
        "glue_ms_per_step": glue, "fused": engine.fused, "fold_norms": engine.fold_norms,
        "deferred_reduction": {"qkv": engine.defer_qkv, "ffn": engine.defer_ffn},
        "prefetch_attn_output": engine.prefetch, "prefetch_cache": engine.prefetch_cache,
        "dims": {"n_layer": loaded.cfg.n_layer, "d_model": loaded.cfg.d_model,
                 "d_ff": loaded.cfg.d_ff, "n_head": loaded.cfg.n_head,
                 "n_head_kv": loaded.cfg.n_head_kv, "vocab_size": loaded.cfg.vocab_size},
        "levels": rows,
    }


__all__ = ["FORMATS", "CUDAEngine", "bench_cuda", "copy_bandwidth", "quantize_int8_groups",
           "rounded_model"]
