"""Where one GPU decode step spends its time: each kernel of the captured step, timed on the device.

The step's CUDA graph is replayed under torch's profiler (CUPTI kernel records, which include
the kernels inside a graph), one replay at a time with an idle gap between replays. Each kernel
gets its start and end on the device clock; its increment is how far it moves the step's end
(end minus the previous kernel's end), so the increments of a replay add up to the step. On
the fused, folded step (five launches per block: q/k/v, attention, attn_output, gate/up,
ffn_down) each increment is set beside the byte time of that launch (the weight bytes its kept
rows hold, at the copy bandwidth measured in the same run): what is left is the launch's fixed
cost in the step.

    python scripts/step_timeline_cuda.py run MODEL.gguf --table T.json --format fp16 \
        --levels 0,0.5 --out OUT.json
    python scripts/step_timeline_cuda.py plot OUT.json [OUT.json ...] -o OUT.png

The profiler's own cost shows in the record as the step time with and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROLES = ("qkv", "attention", "attn_output", "gate_up", "ffn_down")
ROLE_TENSORS = {"qkv": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
                "gate_up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kernel_events(trace: Path) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every GPU kernel in a chrome trace, by start."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    out = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", ""))
           for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    return sorted(out)


def split_replays(kernels: list[tuple[float, float, str]], gap_us: float
                  ) -> list[list[tuple[float, float, str]]]:
    """Cut a kernel list into replays at idle gaps longer than ``gap_us``."""
    replays: list[list[tuple[float, float, str]]] = []
    last_end = None
    for k in kernels:
        if last_end is None or k[0] - last_end > gap_us:
            replays.append([])
        replays[-1].append(k)
        last_end = k[1] if last_end is None else max(last_end, k[1])
    return replays


def roles_of(names: list[str]) -> list[str]:
    """The role of each kernel of one folded fused step: the four GEMVs around each attention
    launch by position, the last GEMV the head, everything else 'other'."""
    roles = ["other"] * len(names)
    att = [i for i, n in enumerate(names) if "attention_kernel" in n]
    for a in att:
        if a < 1 or a + 3 >= len(names):
            raise ValueError("the step does not have the folded five-launch block pattern")
        roles[a - 1], roles[a], roles[a + 1], roles[a + 2], roles[a + 3] = ROLES
        if not all("gemv_kernel" in names[j] for j in (a - 1, a + 1, a + 2, a + 3)):
            raise ValueError("the step does not have the folded five-launch block pattern")
    gemvs = [i for i, n in enumerate(names) if "gemv_kernel" in n and roles[i] == "other"]
    if gemvs:
        roles[gemvs[-1]] = "head"
    return roles


def profile_level(engine, ids: list[int], replays: int, gap_s: float) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = engine.device
    engine.prefill(ids)
    for _ in range(8):
        engine._run()
    torch.cuda.synchronize(dev)
    # The step time without the profiler, from events around back-to-back replays.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    steps = 32
    for _ in range(steps):
        engine._run()
    end.record()
    end.synchronize()
    plain_ms = start.elapsed_time(end) / steps
    engine.prefill(ids)
    for _ in range(4):
        engine._run()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            engine._run()
            torch.cuda.synchronize(dev)
            time.sleep(gap_s)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        kernels = kernel_events(trace)
    if not kernels:
        raise RuntimeError("the profiler recorded no kernels (no CUPTI kernel records)")
    reps = split_replays(kernels, gap_us=gap_s * 1e6 / 2)
    lengths = [len(r) for r in reps]
    counts = sorted(set(lengths))
    m = max(counts, key=lengths.count)  # the usual kernel count of one replay
    reps = [r for r in reps if len(r) == m]
    names = [k[2] for k in reps[0]]
    starts = np.array([[k[0] - r[0][0] for k in r] for r in reps])
    ends = np.array([[k[1] - r[0][0] for k in r] for r in reps])
    prev_end = np.concatenate([starts[:, :1], np.maximum.accumulate(ends, axis=1)[:, :-1]],
                              axis=1)
    inc = np.maximum.accumulate(ends, axis=1) - prev_end
    dur = ends - starts
    return {"plain_step_ms": plain_ms, "replays": len(reps), "kernel_counts_seen": counts,
            "kernels_per_step": m, "names": names,
            "start_us": np.median(starts, axis=0).tolist(),
            "end_us": np.median(ends, axis=0).tolist(),
            "increment_us": np.median(inc, axis=0).tolist(),
            "duration_us": np.median(dur, axis=0).tolist(),
            "profiled_step_us": float(np.median(ends.max(axis=1)))}


def summarize(level: dict, engine, ids: list[int], copy_bw: float) -> dict:
    """Per role: increment per block, kernel duration, byte time of the kept rows."""
    names = level["names"]
    roles = roles_of(names)
    inc, dur = np.array(level["increment_us"]), np.array(level["duration_us"])
    _, realized = engine.count_bytes(ids, 16)
    n_layer = engine.cfg.n_layer
    out = {}
    for role in (*ROLES, "head", "other"):
        sel = [i for i, r in enumerate(roles) if r == role]
        if not sel:
            continue
        row = {"launches": len(sel), "increment_us_total": float(inc[sel].sum()),
               "duration_us_median": float(np.median(dur[sel]))}
        row["increment_us_per_launch"] = row["increment_us_total"] / len(sel)
        nbytes = None  # weight bytes one launch of this role reads
        if role in ROLE_TENSORS:
            nbytes = sum((1.0 - realized[name]) * p.nbytes for name, p in engine.projs.items()
                         if name.split(".")[-1] in ROLE_TENSORS[role]) / n_layer
        elif role == "head":
            nbytes = float(engine.head.nbytes)
        if nbytes is not None:
            row["bytes_per_launch"] = nbytes
            row["byte_time_us_per_launch"] = nbytes / copy_bw * 1e6
            row["excess_us_per_launch"] = (row["increment_us_per_launch"]
                                           - row["byte_time_us_per_launch"])
        out[role] = row
    return out


def run(args) -> None:
    import torch

    from sparsify.bench import BENCH_PROMPT, is_synthetic, versions
    from sparsify.engine_cuda import CUDAEngine, copy_bandwidth, device_info
    from sparsify.loader import load
    from sparsify.table import ThresholdTable

    if args.out.exists() and not args.force:
        sys.exit(f"error: {args.out}: exists; pass --force to overwrite")
    loaded = load(str(args.model))
    levels = [float(s) for s in args.levels.split(",")]
    table = None
    if any(s > 0 for s in levels):
        if args.table is None:
            sys.exit("error: sparsity levels above 0 need --table")
        table = ThresholdTable.load(args.table)
        table.check(loaded)
    dev = torch.device("cuda", torch.cuda.current_device())
    ids = loaded.tokenizer.encode(BENCH_PROMPT)
    engine = CUDAEngine(loaded, fmt=args.format, max_len=len(ids) + 64, device=dev)
    copy_bw = copy_bandwidth(dev)
    weight_aware = table is not None and table.criterion == "weight-aware"
    rows = []
    for s in levels:
        thresholds = None if s == 0 or table is None else table.thresholds_at(s)
        engine.set_thresholds(thresholds, weight_aware and thresholds is not None)
        log(f"level {s:g}: profiling {args.replays} replays")
        lev = profile_level(engine, ids, args.replays, args.gap_ms / 1e3)
        lev["sparsity"] = s
        try:
            lev["roles"] = summarize(lev, engine, ids, copy_bw)
        except ValueError as e:
            lev["roles"] = None
            log(f"level {s:g}: no per-role summary ({e})")
        rows.append(lev)
        log(f"level {s:g}: step {lev['plain_step_ms']:.3f} ms plain, "
            f"{lev['profiled_step_us'] / 1e3:.3f} ms profiled, {lev['kernels_per_step']} kernels")
        for role, r in (lev["roles"] or {}).items():
            log(f"  {role:12s} {r['launches']:3d} x {r['increment_us_per_launch']:7.2f} us"
                + (f"  (bytes {r['byte_time_us_per_launch']:6.2f} us, excess "
                   f"{r['excess_us_per_launch']:5.2f})" if "byte_time_us_per_launch" in r else ""))
    info = device_info(dev)
    vers = versions()
    vers.update(cuda=info["cuda"], driver=info["driver"])
    rec = {"kind": "step_timeline", "device": info["device"], "versions": vers,
           "model": loaded.path.name, "synthetic": is_synthetic(loaded), "format": args.format,
           "copy_bandwidth_GBps": copy_bw / 1e9, "fused": engine.fused,
           "fold_norms": engine.fold_norms,
           "environment": {k: v for k, v in os.environ.items() if k.startswith("SPARSIFY_")},
           "n_layer": loaded.cfg.n_layer, "levels": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(args.out)
    log(f"wrote {args.out}")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(Path(p).read_text()) for p in args.records]
    bars = []
    for rec in recs:
        for lev in rec["levels"]:
            if lev.get("roles"):
                env = " ".join(f"{k.removeprefix('SPARSIFY_')}={v}"
                               for k, v in sorted((rec.get("environment") or {}).items()))
                label = (f"{rec['format']} s={lev['sparsity']:g}"
                         + (" (synthetic)" if rec.get("synthetic") else "")
                         + (f"\n{env}" if env else ""))
                bars.append((label, lev["roles"], rec))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(bars)))
    colors = {"qkv": "C0", "attention": "C1", "attn_output": "C2", "gate_up": "C3",
              "ffn_down": "C4", "head": "C5", "other": "C7"}
    for y, (label, roles, rec) in enumerate(bars):
        x = 0.0
        for role in (*ROLES, "head", "other"):
            r = roles.get(role)
            if r is None:
                continue
            total = r["increment_us_total"] / 1e3
            byte = r.get("byte_time_us_per_launch", 0.0) * r["launches"] / 1e3
            ax.barh(y, min(byte, total), left=x, color=colors[role], label=role if y == 0 else None)
            if total > byte:
                ax.barh(y, total - byte, left=x + byte, color=colors[role], alpha=0.35,
                        hatch="//" if "byte_time_us_per_launch" in r else None)
            x += total
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (solid: weight bytes at the copy bandwidth; "
                  "hatched: the rest)")
    rec0 = recs[0]
    ax.set_title(f"{rec0['model']} on {rec0['device']}: where the step's time goes", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=7)
    fig.tight_layout()
    tmp = args.output.with_suffix(".tmp" + args.output.suffix)
    fig.savefig(tmp, dpi=120)
    tmp.replace(args.output)
    log(f"wrote {args.output}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("--table", type=Path)
    r.add_argument("--format", default="fp16")
    r.add_argument("--levels", default="0,0.5")
    r.add_argument("--replays", type=int, default=24)
    r.add_argument("--gap-ms", type=float, default=2.0)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--force", action="store_true")
    p = sub.add_parser("plot")
    p.add_argument("records", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    from sparsify.errors import SparsifyError

    try:
        run(args) if args.cmd == "run" else plot(args)
    except SparsifyError as e:  # a bad model, table or record: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
