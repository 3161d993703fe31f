"""Benchmark the CUDA sparse GEMV kernels against cuBLAS dense GEMV and the bandwidth ideal.

One run: build the kernels, check them against a float64 reference, measure device-to-device copy
bandwidth, then time each shape x dtype x sparsity (and optional launch variants) with CUDA-graph
replays over rotated weight copies (together several times the L2 size, so every call streams its
weights from DRAM). Writes a JSON record and a plot, then prints a table.

    python scripts/bench_kernels_cuda.py --out results/ [--variants]

ideal(s) = (1 - s) * weight bytes / copy bandwidth, with copy bandwidth counted as bytes read plus
bytes written by a large device-to-device copy; int8 weight bytes include the scales.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sparsify_kernels import cuda as kc

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (K inputs, N outputs)
SPARSITIES = [round(0.1 * i, 1) for i in range(10)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
# (variant, blocks_per_sm) pairs; see sparse_gemv.h. (0, 0) is what the public launchers run.
VARIANTS = [(0, 0), (1, 0), (2, 0), (3, 0), (8, 0), (9, 0), (10, 0), (11, 0), (12, 0), (13, 0),
            (14, 0), (15, 0), (16, 0), (17, 0), (18, 0)]
VARIANT_NAMES = {0: "default", 1: "unroll4", 2: "nopdl", 3: "cluster", 6: "waves2",
                 7: "waves4", 8: "unroll8", 9: "scfence", 10: "prev", 11: "pf32k",
                 12: "pf64k", 13: "unroll8pf", 14: "balance",
                 15: "balance_nopdl", 16: "balance_anyfit", 17: "bare_cluster",
                 18: "gbalance"}
TABLE_LEVELS = (0.0, 0.4, 0.5, 0.9)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def device_info(dev: torch.device) -> dict:
    """Device and software versions as the machine reports them."""
    props = torch.cuda.get_device_properties(dev)
    info = {
        "device": torch.cuda.get_device_name(dev),
        "capability": list(torch.cuda.get_device_capability(dev)),
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "cuda_torch": torch.version.cuda,
        "nvcc": kc.nvcc_version(kc.find_nvcc()).splitlines()[-1],
    }
    try:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
             "--format=csv,noheader", "-i", str(dev.index or 0)],
            check=True, capture_output=True, text=True).stdout.strip()
        name, driver, sm_clk, mem_clk = (s.strip() for s in q.split(","))
        info.update(nvidia_smi_name=name, driver=driver, max_sm_clock=sm_clk,
                    max_mem_clock=mem_clk)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        info["nvidia_smi_error"] = str(e)
    return info


def card_tag(name: str) -> str:
    """Short card name for file names: 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def quantiles(v: list[float]) -> tuple[float, float, float]:
    s = sorted(v)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), q(0.5), q(0.75)


def time_graph(graph: torch.cuda.CUDAGraph, calls: int, reps: int) -> dict:
    """Per-call time (us) of a graph holding `calls` launches: median and IQR over `reps`."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    q1, med, q3 = quantiles(samples)
    return {"median_us": med, "q1_us": q1, "q3_us": q3, "iqr_us": q3 - q1, "reps": reps}


def capture(fn, calls: int) -> torch.cuda.CUDAGraph:
    """Graph of fn(0), fn(1), ..., fn(calls - 1), warmed up on a side stream first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    torch.cuda.synchronize()
    return g


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    samples = []
    for i in range(reps + 3):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            samples.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    return 2 * nbytes / quantiles(samples)[1]


def threshold_for(x: torch.Tensor, s: float) -> float:
    """Threshold on |x| dropping round(s * K) channels."""
    drop = round(s * x.numel())
    return -1.0 if drop == 0 else float(torch.sort(x.abs()).values[drop - 1])


def weight_bytes(k: int, n: int, dtype: str) -> int:
    if dtype == "int8":
        return k * n + k * (-(-n // kc.INT8_GROUP)) * 4
    return 2 * k * n


def make_sparse_weights(k, n, dtype, copies, dev, gen):
    """`copies` distinct input-major weight tensors (and int8 scales) with random values."""
    if dtype == "int8":
        base = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=dev, generator=gen)
        scales = torch.rand(k, -(-n // kc.INT8_GROUP), device=dev, generator=gen) * 0.02 + 1e-3
    else:
        base = torch.randn(k, n, device=dev, generator=gen).to(DTYPES[dtype])
        scales = None
    ws = [base] + [base.clone() for _ in range(copies - 1)]
    ss = [None] * copies if scales is None else [scales] + [scales.clone()
                                                           for _ in range(copies - 1)]
    return ws, ss


def check_correct(w, scales, x, t, dev, variant: int = 0) -> float:
    """Relative L2 error of the kernel (launch ``variant``) against a float64 reference on the
    device."""
    y = kc.sparse_gemv(w, x, t, scales=scales, variant=variant)
    keep = ~(x.abs() <= t)
    wd = w.double()
    if scales is not None:
        wd = wd * scales.double().repeat_interleave(kc.INT8_GROUP, dim=1)[:, : w.shape[1]]
    ref = torch.where(keep, x.double(), torch.zeros((), dtype=torch.float64, device=dev)) @ wd
    return float((y.double() - ref).norm() / ref.norm())


def bench_shape(k, n, dtypes, variants, copy_bw, l2, dev, gen, reps, records, checks) -> None:
    target_bytes = 4 * (l2 or 50 << 20)  # rotate through several L2 sizes of weights
    x = torch.randn(k, device=dev, generator=gen)
    thr = torch.zeros(1, device=dev)
    out = torch.empty(n, device=dev)
    wsp = kc.make_workspace(k, n, dev)

    for dname in dtypes:
        wb = weight_bytes(k, n, dname)
        copies = max(2, math.ceil(target_bytes / wb))
        calls = copies * max(1, math.ceil(32 / copies))
        ws, ss = make_sparse_weights(k, n, dname, copies, dev, gen)

        err = check_correct(ws[0], ss[0], x, threshold_for(x, 0.5), dev)
        checks.append({"K": k, "N": n, "dtype": dname, "sparsity": 0.5, "rel_l2_err": err})
        if not err < 1e-5:
            raise SystemExit(f"correctness check failed: {dname} {k}x{n} rel err {err:.3g}")

        for variant, bps in variants:
            if variant in kc.SM90_VARIANTS and torch.cuda.get_device_capability(dev)[0] < 9:
                continue

            def call(i, variant=variant, bps=bps, ws=ws, ss=ss, copies=copies):
                j = i % copies
                kc.sparse_gemv(ws[j], x, thr, scales=ss[j], out=out, workspace=wsp,
                               variant=variant, blocks_per_sm=bps)

            try:
                g = capture(call, calls)
                # each variant against the reference too (the default was checked above)
                verr = 0.0 if variant == 0 else check_correct(
                    ws[0], ss[0], x, threshold_for(x, 0.5), dev, variant)
            except RuntimeError as e:  # keep the other variants' numbers if one cannot run
                log(f"  {k}->{n} {dname} variant {variant}: {e}")
                checks.append({"K": k, "N": n, "dtype": dname, "variant": variant,
                               "error": str(e)})
                torch.cuda.synchronize()
                continue
            if variant != 0:
                checks.append({"K": k, "N": n, "dtype": dname, "sparsity": 0.5,
                               "variant": variant, "rel_l2_err": verr})
                if not verr < 1e-5:
                    raise SystemExit(f"correctness check failed: {dname} {k}x{n} variant "
                                     f"{variant} rel err {verr:.3g}")
            for s in SPARSITIES:
                thr.fill_(threshold_for(x, s))
                r = time_graph(g, calls, reps)
                ideal = (1 - s) * wb / copy_bw * 1e6
                records.append({
                    "kind": "sparse", "K": k, "N": n, "dtype": dname, "sparsity": s,
                    "variant": VARIANT_NAMES[variant], "blocks_per_sm": bps,
                    **r, "ideal_us": ideal, "pct_ideal": 100 * ideal / r["median_us"],
                    "GBps": (1 - s) * wb / r["median_us"] * 1e-3,
                    "weight_bytes": wb, "copies": copies, "calls_per_graph": calls})
            del g
            torch.cuda.synchronize()
        log(f"  {k}->{n} {dname}: done ({copies} weight copies)")
        del ws, ss
        torch.cuda.empty_cache()

    # cuBLAS dense GEMV on the output-major (N, K) layout, same rotation
    for dname in ("fp16", "bf16"):
        if dname not in dtypes:
            continue
        wb = weight_bytes(k, n, dname)
        copies = max(2, math.ceil(target_bytes / wb))
        calls = copies * max(1, math.ceil(32 / copies))
        base = torch.randn(n, k, device=dev, generator=gen).to(DTYPES[dname])
        wd = [base] + [base.clone() for _ in range(copies - 1)]
        xh = x.to(DTYPES[dname]).reshape(1, k)
        g = capture(lambda i, wd=wd, xh=xh, c=copies: F.linear(xh, wd[i % c]), calls)
        r = time_graph(g, calls, reps)
        records.append({"kind": "cublas", "K": k, "N": n, "dtype": dname, "sparsity": 0.0,
                        **r, "ideal_us": wb / copy_bw * 1e6,
                        "pct_ideal": 100 * wb / copy_bw * 1e6 / r["median_us"],
                        "GBps": wb / r["median_us"] * 1e-3, "weight_bytes": wb,
                        "copies": copies, "calls_per_graph": calls})
        del g, wd, base
        torch.cuda.empty_cache()


def launch_floor(dev: torch.device, reps: int) -> dict:
    """Per-call time of a graph of trivial one-element kernels: the launch floor per node."""
    tiny = torch.zeros(1, device=dev)
    calls = 64
    g = capture(lambda i: tiny.add_(1.0), calls)
    return {"kind": "launch_floor", **time_graph(g, calls, reps)}


def find(records, **kw) -> dict | None:
    for r in records:
        if all(r.get(a) == b for a, b in kw.items()):
            return r
    return None


def evaluate(records) -> list[dict]:
    """The design targets (kernels/cuda/NOTES.md), each with its measured value and verdict."""
    out = []

    def sp(k, n, d, s):
        return find(records, kind="sparse", K=k, N=n, dtype=d, sparsity=s, variant="default",
                    blocks_per_sm=0)

    for d in ("fp16", "bf16"):
        for (k, n), need in (((4096, 14336), 80), ((14336, 4096), 80), ((4096, 4096), 65)):
            r = sp(k, n, d, 0.5)
            if r:
                out.append({"target": f"{d} {k}->{n} at 50%: >= {need}% of ideal",
                            "value": round(r["pct_ideal"], 1), "ok": r["pct_ideal"] >= need})
        for k, n in SHAPES:
            r0, c = sp(k, n, d, 0.0), find(records, kind="cublas", K=k, N=n, dtype=d)
            if r0 and c:
                ratio = r0["median_us"] / c["median_us"]
                out.append({"target": f"{d} {k}->{n} at 0%: <= 1.05x cuBLAS",
                            "value": round(ratio, 3), "ok": ratio <= 1.05})
    for d in DTYPES:
        for k, n in SHAPES:
            ts = [sp(k, n, d, s) for s in SPARSITIES]
            if all(ts):
                worst = max(b["median_us"] / a["median_us"] for a, b in itertools.pairwise(ts))
                out.append({"target": f"{d} {k}->{n}: time rises <= 5% per +0.1 sparsity",
                            "value": round(worst, 3), "ok": worst <= 1.05})
    r, c = sp(4096, 14336, "int8", 0.5), find(records, kind="cublas", K=4096, N=14336,
                                              dtype="fp16")
    if r and c:
        speed = c["median_us"] / r["median_us"]
        out.append({"target": "int8 4096->14336 at 50%: >= 3.2x faster than cuBLAS fp16",
                    "value": round(speed, 2), "ok": speed >= 3.2})
    return out


def plot(records, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4.2))
    colors = {"fp16": "C0", "bf16": "C1", "int8": "C2"}
    for ax, (k, n) in zip(axes, SHAPES):
        for d, c in colors.items():
            rs = [find(records, kind="sparse", K=k, N=n, dtype=d, sparsity=s,
                       variant="default", blocks_per_sm=0) for s in SPARSITIES]
            if not all(rs):
                continue
            ax.plot(SPARSITIES, [r["median_us"] for r in rs], "o-", color=c, label=f"{d} sparse")
            ax.plot(SPARSITIES, [r["ideal_us"] for r in rs], ":", color=c,
                    label=f"{d} ideal (1-s)")
            cb = find(records, kind="cublas", K=k, N=n, dtype=d)
            if cb:
                ax.axhline(cb["median_us"], color=c, ls="--", lw=1, label=f"cuBLAS {d} dense")
        ax.set_title(f"{k} -> {n}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("us per GEMV (median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"sparse GEMV, {meta['device']}, copy bandwidth "
                 f"{meta['copy_bandwidth_GBps']:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(records, copy_gbps: float) -> str:
    floor = find(records, kind="launch_floor")
    lines = [f"copy bandwidth {copy_gbps:.0f} GB/s; us = median per call (graph replays); "
             f"empty-kernel graph node {floor['median_us']:.2f} us" if floor else "",
             f"{'shape':>12} {'dtype':>5} {'cuBLAS us':>9} | "
             + " | ".join(f"{int(s * 100):>2}%: us  %ideal  GB/s" for s in TABLE_LEVELS)]
    for k, n in SHAPES:
        for d in DTYPES:
            rs = [find(records, kind="sparse", K=k, N=n, dtype=d, sparsity=s,
                       variant="default", blocks_per_sm=0) for s in TABLE_LEVELS]
            if not all(rs):
                continue
            cb = find(records, kind="cublas", K=k, N=n, dtype=d)
            cbs = f"{cb['median_us']:9.1f}" if cb else f"{'-':>9}"
            cells = " | ".join(f"{r['median_us']:7.1f} {r['pct_ideal']:5.0f}% {r['GBps']:5.0f}"
                               for r in rs)
            lines.append(f"{k:>5}->{n:<6} {d:>5} {cbs} | {cells}")
    return "\n".join(lines)


def variant_table(records) -> str:
    lines = ["variants (us at 0 / 50 / 90% sparsity)"]
    for k, n in SHAPES:
        for d in DTYPES:
            cells = []
            for v, bps in VARIANTS:
                rs = [find(records, kind="sparse", K=k, N=n, dtype=d, sparsity=s,
                           variant=VARIANT_NAMES[v], blocks_per_sm=bps) for s in (0.0, 0.5, 0.9)]
                if all(rs):
                    name = VARIANT_NAMES[v] + (f"/bps{bps}" if bps else "")
                    cells.append(f"{name} " + "/".join(f"{r['median_us']:.1f}" for r in rs))
            if cells:
                lines.append(f"{k:>5}->{n:<6} {d:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--variants", action="store_true", help="also time the launch variants")
    ap.add_argument("--variant-list", default="",
                    help="with --variants: only these variant numbers (comma-separated)")
    ap.add_argument("--reps", type=int, default=15, help="timed graph replays per point")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not kc.is_available():
        raise SystemExit("error: needs a CUDA device and nvcc")
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    t0 = time.time()
    kc.load(dev)
    log(f"built/loaded kernels in {time.time() - t0:.1f}s")
    meta = device_info(dev)
    copy_bw = copy_bandwidth(dev)
    meta["copy_bandwidth_GBps"] = copy_bw * 1e-9
    log(f"{meta['device']}: copy bandwidth {copy_bw * 1e-9:.0f} GB/s")
    meta.update(timing="CUDA-graph replays of many calls over rotated weight copies "
                "(>= 4x L2 bytes); per-call median and IQR over replays", seed=args.seed,
                sparsity_inputs="x ~ N(0,1) float32, threshold = quantile of |x|")

    records: list[dict] = [launch_floor(dev, args.reps)]
    checks: list[dict] = []
    log(f"launch floor per graph node: {records[0]['median_us']:.2f} us")
    variants = VARIANTS if args.variants else [(0, 0)]
    if args.variants and args.variant_list:
        only = {int(v) for v in args.variant_list.split(",")} | {0}
        unknown = only - set(VARIANT_NAMES)
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {sorted(unknown)}")
        variants = [(v, b) for v, b in VARIANTS if v in only]
    for k, n in SHAPES:
        bench_shape(k, n, list(DTYPES), variants, copy_bw, meta["l2_bytes"], dev, gen,
                    args.reps, records, checks)
    targets = evaluate(records)

    tag = card_tag(meta.get("nvidia_smi_name") or meta["device"])
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "checks": checks, "targets": targets, "records": records}
    (args.out / f"kernels_cuda_{tag}.json").write_text(json.dumps(doc, indent=1))
    plot(records, meta, args.out / f"kernels_cuda_{tag}.png")
    if args.variants:
        print(variant_table(records))
    for t in targets:
        print(("PASS " if t["ok"] else "MISS ") + f"{t['target']}: {t['value']}")
    print(table(records, copy_bw * 1e-9))
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
