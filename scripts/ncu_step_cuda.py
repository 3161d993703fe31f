"""One GPU decode step under Nsight Compute: the kernels of a few blocks, with warp-stall samples.

`drive` runs one captured decode step of the CUDA engine inside a cudaProfilerStart/Stop range
(after a prefill and warm replays outside it), so that ``ncu --profile-from-start off`` sees only
the step's kernels. `summary` reads the CSV that ``ncu --import REPORT --csv --page raw`` prints
and writes one JSON record: per profiled kernel, its duration, DRAM bytes and throughput,
occupancy and the share of warp-stall samples by reason. Under ncu every kernel runs alone
(no programmatic dependent launch, caches flushed between passes unless told otherwise), so a
duration here is the kernel's own, without the overlap it gets inside the step.

    ncu --profile-from-start off --set full -k regex:'gemv|attention' -s 20 -c 10 \\
        -o REPORT python scripts/ncu_step_cuda.py drive MODEL.gguf --table T.json --level 0.5
    ncu --import REPORT.ncu-rep --csv --page raw > RAW.csv
    python scripts/ncu_step_cuda.py summary RAW.csv --out OUT.json --note "..."

scripts/ncu_step_cuda.sh does all three for levels 0 and 0.5.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

# Raw metrics this summary keeps (ncu's names); a missing one is left out of the record.
METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    "dram_bytes_read": "dram__bytes_read.sum",
    "dram_bytes_write": "dram__bytes_write.sum",
    "dram_throughput_pct_peak": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers_per_thread": "launch__registers_per_thread",
    "grid_size": "launch__grid_size",
    "block_size": "launch__block_size",
    "sm_active_cycles": "sm__cycles_active.avg",
    "elapsed_cycles": "gpc__cycles_elapsed.max",
    "l2_hit_rate_pct": "lts__t_sector_hit_rate.pct",
    "warp_instructions": "smsp__inst_executed.sum",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
}
# ncu prints durations and byte counts in a unit it picks per value; the record keeps ns and bytes.
_TIME = {"usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}
_BYTES = {"Kbyte": 1e3, "KB": 1e3, "Mbyte": 1e6, "MB": 1e6, "Gbyte": 1e9, "GB": 1e9}
TO_RECORD_UNIT = {"duration_ns": _TIME, "dram_bytes_read": _BYTES, "dram_bytes_write": _BYTES}
STALL_PREFIX = "smsp__pcsamp_warps_issue_stalled_"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drive(args) -> None:
    import torch

    from sparsify.bench import BENCH_PROMPT
    from sparsify.engine_cuda import CUDAEngine
    from sparsify.loader import load
    from sparsify.table import ThresholdTable

    loaded = load(str(args.model))
    thresholds = None
    weight_aware = False
    if args.level > 0:
        if args.table is None:
            sys.exit("error: a level above 0 needs --table")
        table = ThresholdTable.load(args.table)
        table.check(loaded)
        thresholds = table.thresholds_at(args.level)
        weight_aware = table.criterion == "weight-aware"
    dev = torch.device("cuda", torch.cuda.current_device())
    ids = loaded.tokenizer.encode(BENCH_PROMPT)
    engine = CUDAEngine(loaded, fmt=args.format, max_len=len(ids) + 64, device=dev)
    engine.set_thresholds(thresholds, weight_aware and thresholds is not None)
    engine.prefill(ids)
    for _ in range(4):
        engine._run()
    torch.cuda.synchronize(dev)
    torch.cuda.profiler.start()
    for _ in range(args.steps):
        engine._run()
    torch.cuda.synchronize(dev)
    torch.cuda.profiler.stop()
    log(f"drove {args.steps} step(s) at level {args.level:g}, {args.format}, "
        f"{len(ids)} prompt tokens")


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def read_raw(path: Path) -> list[dict]:
    """ncu's raw page as CSV: a header row, a units row, then one row per profiled kernel."""
    text = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no ncu raw CSV header (a line starting with \"ID\")")
    rows = list(csv.reader(text[start:]))
    header, units, body = rows[0], rows[1], rows[2:]
    out = []
    for r in body:
        if len(r) != len(header):
            continue
        out.append({"cells": dict(zip(header, r)), "units": dict(zip(header, units))})
    return out


def kernel_summary(row: dict) -> dict:
    cells, units = row["cells"], row["units"]
    rec = {"name": cells.get("Kernel Name", ""), "id": cells.get("ID", ""),
           "device": cells.get("device__attribute_display_name", "")}
    for key, metric in METRICS.items():
        v = _number(cells[metric]) if metric in cells else None
        if v is not None:
            rec[key] = v * TO_RECORD_UNIT.get(key, {}).get(units.get(metric, ""), 1.0)
    stalls = {}
    for name, value in cells.items():
        if name.startswith(STALL_PREFIX) and not name.endswith("_not_issued"):
            v = _number(value)
            if v is not None:
                stalls[name[len(STALL_PREFIX):]] = v
    total = sum(stalls.values())
    if total > 0:
        rec["stall_samples"] = total
        rec["stall_share"] = {k: v / total for k, v in
                              sorted(stalls.items(), key=lambda kv: -kv[1]) if v / total >= 0.005}
    if all(k in rec for k in ("warp_instructions", "grid_size", "block_size")):
        rec["instructions_per_warp"] = rec["warp_instructions"] / (
            rec["grid_size"] * rec["block_size"] / 32)
    if "duration_ns" in rec and "dram_bytes_read" in rec and rec["duration_ns"] > 0:
        rec["dram_read_GBps"] = rec["dram_bytes_read"] / rec["duration_ns"]
    return rec


def summary(args) -> None:
    recs = []
    for raw in args.raw:
        try:
            rows = read_raw(raw)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        recs.append({"raw": raw.name, "kernels": [kernel_summary(r) for r in rows]})
    if args.out.exists() and not args.force:
        sys.exit(f"error: {args.out}: exists; pass --force to overwrite")
    devices = sorted({k["device"] for r in recs for k in r["kernels"] if k["device"]})
    out = {"kind": "ncu_step", "device": ", ".join(devices), "note": args.note, "reports": recs}
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    for rep in recs:
        log(rep["raw"])
        for k in rep["kernels"]:
            top = ", ".join(f"{n} {s:.0%}" for n, s in list(k.get("stall_share", {}).items())[:4])
            log(f"  {k['name'][:48]:48s} {k.get('duration_ns', float('nan')) / 1e3:7.2f} us"
                f"  DRAM {k.get('dram_read_GBps', float('nan')):6.0f} GB/s"
                f"  {k.get('instructions_per_warp', float('nan')):6.0f} instr/warp  {top}")
    log(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive", help="run the decode step inside a profiler range")
    d.add_argument("model", type=Path)
    d.add_argument("--table", type=Path)
    d.add_argument("--level", type=float, default=0.0)
    d.add_argument("--format", default="fp16", choices=("fp16", "bf16", "int8"))
    d.add_argument("--steps", type=int, default=1)
    s = sub.add_parser("summary", help="one JSON record from ncu raw CSV pages")
    s.add_argument("raw", type=Path, nargs="+")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--note", default="")
    s.add_argument("--force", action="store_true")
    args = ap.parse_args()
    {"drive": drive, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    main()
