"""Decode attention on the GPU against the number of cached keys: one block per head, or split-KV.

    python scripts/bench_attention_cuda.py run OUT.json [--heads 32 --kv-heads 8 --dim 128]
    python scripts/bench_attention_cuda.py plot OUT.json -o OUT.png

``run`` times ``sparsify_attention_decode_split`` at Llama-3-8B's attention shape (32 query and
8 key/value heads of 128, float32 cache) for positions from 64 to 16383 keys, once with
``splits = 1`` (every head on one 1024-thread block), once split per query head
(``attention_splits(n_head)``: as many ranges per head as fill the multiprocessors) and once
split per key/value head with the group's query heads in one block (``group_heads``, ranges
from ``attention_splits(n_head_kv)``; the engine's choice); then the three again over float16
caches holding the same values rounded (``kv_cache="f16"``). Each timing is a CUDA-graph replay
of 32 launches, one per layer, each over its own cache and q/k/v rows, so the caches together
exceed L2 as they do in a decode step, divided by 32. It first checks every setting against the
first of its cache type at every position (the same output within float32 rounding), and the
float16 results against the float32 ones (within the rounding of the cache). The record holds
the device, versions, shapes, and the bytes of cache each launch reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

POSITIONS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16383]
LAYERS = 32
REPLAYS = 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(out: Path, n_head: int, n_head_kv: int, dim: int, positions: list[int],
        grouped_pairs: tuple[int, ...] = ()) -> dict:
    import torch
    from sparsify_kernels import cuda as kc

    dev = torch.device("cuda")
    L = max(positions) + 1
    g = torch.Generator().manual_seed(0)
    gd = torch.Generator(dev).manual_seed(0)
    width = n_head * dim + 2 * n_head_kv * dim
    # 22 partial q/k/v rows, as the decode step's deferred reduction leaves them.
    qkv = [(torch.randn(22, width, generator=g) / math.sqrt(22)).to(dev) for _ in range(LAYERS)]
    caches = {"float32": [(torch.randn(n_head_kv, L, dim, generator=gd, device=dev),
                           torch.randn(n_head_kv, L, dim, generator=gd, device=dev))
                          for _ in range(LAYERS)]}
    caches["float16"] = [(k.half(), v.half()) for k, v in caches["float32"]]
    half = dim // 2
    ang = torch.rand(L, half, generator=g) * 6.3
    cos = torch.cat([torch.cos(ang), torch.cos(ang)], 1).to(dev)
    sin = torch.cat([-torch.sin(ang), torch.sin(ang)], 1).to(dev)
    perm = torch.cat([torch.arange(half, dim), torch.arange(half)]).to(torch.int32).to(dev)
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    outs = torch.zeros(LAYERS, n_head * dim, device=dev)
    best = kc.attention_splits(n_head, dev)
    settings = {"one block per head": 1, "split-KV": best}
    grouped, envs = set(), {}
    if n_head // n_head_kv <= kc.MAX_GROUP_HEADS:
        per_group = kc.attention_splits(n_head_kv, dev)
        settings["split-KV, heads grouped"] = per_group
        grouped.add("split-KV, heads grouped")
        for pairs in grouped_pairs:  # A/B: another count of query-key pairs per block
            name = f"split-KV, heads grouped, {pairs} pairs a block"
            settings[name] = per_group
            grouped.add(name)
            envs[name] = {"SPARSIFY_ATTN_SPLIT_KEYS": str(pairs)}
    for name in list(settings):  # the same launches over float16 caches
        settings[name + ", f16 cache"] = settings[name]
        if name in grouped:
            grouped.add(name + ", f16 cache")
        if name in envs:
            envs[name + ", f16 cache"] = envs[name]
    work = kc.attention_workspace(n_head, dim, max(settings.values()), dev)

    def cache_of(name: str) -> str:
        return "float16" if name.endswith("f16 cache") else "float32"

    def step(splits: int, group: bool, cache: str) -> None:
        for i in range(LAYERS):
            kd, vd = caches[cache][i]
            kc.attention_decode(qkv[i], kd, vd, pos, cos, sin, perm, outs[i],
                                n_head=n_head, scale=1.0 / math.sqrt(dim), prefetch_cache=True,
                                splits=splits, workspace=work if splits > 1 else None,
                                group_heads=group)

    graphs = {}
    for name, splits in settings.items():
        os.environ.update(envs.get(name, {}))  # read by the launches, so fixed in the capture
        step(splits, name in grouped, cache_of(name))
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            step(splits, name in grouped, cache_of(name))
        graphs[name] = gr
        for k in envs.get(name, {}):
            del os.environ[k]
    rows = []
    for p in positions:
        pos.fill_(p)
        res = {}
        for name, gr in graphs.items():
            gr.replay()
            torch.cuda.synchronize()
            res[name] = outs.clone()
        err = 0.0
        for cache in ("float32", "float16"):
            names = [n for n in res if cache_of(n) == cache]
            base = res[names[0]]
            for name in names[1:]:
                e = float((res[name] - base).abs().max() / base.abs().max())
                if not e < 1e-5:
                    raise SystemExit(f"{name} differs from {names[0]} at pos {p}: {e:.2e}")
                err = max(err, e)
        f32, f16 = (next(o for n, o in res.items() if cache_of(n) == c)
                    for c in ("float32", "float16"))
        err16 = float((f16 - f32).abs().max() / f32.abs().max())
        if not err16 < 1e-2:
            raise SystemExit(f"the float16 cache's result is {err16:.2e} from float32's at {p}")
        row = {"pos": p, "keys": p + 1, "max_rel_diff": err, "f16_vs_f32_rel_diff": err16,
               "cache_bytes_per_launch": 2 * n_head_kv * (p + 1) * dim * 4,
               "f16_cache_bytes_per_launch": 2 * n_head_kv * (p + 1) * dim * 2}
        for name, gr in graphs.items():
            times = []
            for _ in range(5):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(REPLAYS):
                    gr.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / (REPLAYS * LAYERS))
            times.sort()
            row[name] = {"us_median": times[len(times) // 2], "us_min": times[0],
                         "us_max": times[-1]}
        rows.append(row)
        log(f"pos {p:6d}: " + ", ".join(f"{n} {row[n]['us_median']:.2f} us" for n in settings))
    props = torch.cuda.get_device_properties(dev)
    nvcc = kc.find_nvcc()
    rec = {
        "kind": "attention_decode", "device": torch.cuda.get_device_name(dev),
        "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvcc": kc.nvcc_version(nvcc).splitlines()[-1] if nvcc else None,
        "shape": {"n_head": n_head, "n_head_kv": n_head_kv, "head_dim": dim,
                  "cache": "float32 (settings ending 'f16 cache': float16)", "qkv_rows": 22,
                  "layers_per_graph": LAYERS},
        "settings": settings, "grouped": sorted(grouped), "environment": envs,
        "split_pairs": os.environ.get("SPARSIFY_ATTN_SPLIT_KEYS") or 256,
        "method": (f"CUDA graph of {LAYERS} launches over {LAYERS} caches, {REPLAYS} replays "
                   "x 5, median per launch; cache-row L2 prefetch on, as in the decode step"),
        "rows": rows,
    }
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out)
    return rec


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = [r["keys"] for r in rec["rows"]]
    colors = {}
    for name, splits in rec["settings"].items():
        per = "key/value head" if name in rec.get("grouped", ()) else "head"
        label = f"{name} ({splits} per {per})" if splits > 1 else name
        base = name.removesuffix(", f16 cache")  # the same launches over float16: dashed
        line, = ax.plot(keys, [r[name]["us_median"] for r in rec["rows"]], marker="o",
                        label=label, color=colors.get(base),
                        linestyle="--" if base != name else "-")
        colors.setdefault(base, line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("visible keys")
    ax.set_ylabel("µs per attention launch (one layer)")
    s = rec["shape"]
    ax.set_title(f"decode attention, {s['n_head']}/{s['n_head_kv']} heads of {s['head_dim']}, "
                 f"{rec['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--heads", type=int, default=32)
    r.add_argument("--kv-heads", type=int, default=8)
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--positions", default=",".join(map(str, POSITIONS)))
    r.add_argument("--grouped-pairs", type=int, action="append", default=[],
                   help="A/B: also time grouped split-KV with this many query-key pairs a block "
                        "(SPARSIFY_ATTN_SPLIT_KEYS; the kernel's own is 256)")
    p = sub.add_parser("plot")
    p.add_argument("record", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.out, a.heads, a.kv_heads, a.dim, [int(x) for x in a.positions.split(",") if x],
            tuple(a.grouped_pairs))
    else:
        plot(json.loads(a.record.read_text()), a.output)


if __name__ == "__main__":
    main()
