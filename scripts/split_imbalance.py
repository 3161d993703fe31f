"""Uneven K-splits at mid sparsity: the binomial model against a kernel record's timings.

Each K-split of the CUDA GEMV (sparse_gemv.cu) keeps a binomial number of its rows, and the
slowest split ends the launch. For each shape this script rebuilds the default launch's split
count from its rule (one wave of `sms * blocks_per_sm` blocks over the output tiles, at least
32 rows per block, rows rounded up to 32), draws the splits' kept counts at sparsity s
(Monte Carlo), and turns E[max] / mean - 1 into microseconds with the streaming rate of the
record itself (the slope of its 0% -> 90% line). It puts that beside the measured excess of
the s point over that line. Results: results/split_imbalance.json.

    python scripts/split_imbalance.py results/kernels_cuda_H100_v5.json [--sparsity 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from sparsify.bench import write_json_atomic

SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024))
TILE = {"fp16": 256, "bf16": 256, "int8": 512}  # output columns per tile (32 lanes x 16 bytes)
MAX_SPLITS, MIN_ROWS = 64, 32


def splits_of(k: int, n: int, dtype: str, sms: int, per_sm: int) -> tuple[int, int]:
    """(splits, rows per split) of the default launch, as launch() in sparse_gemv.cu."""
    tiles = math.ceil(n / TILE[dtype])
    s = max(1, min(MAX_SPLITS, sms * per_sm // tiles, math.ceil(k / MIN_ROWS)))
    rows = math.ceil(math.ceil(k / s) / 32) * 32
    return math.ceil(k / rows), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="a kernels_cuda_*.json of bench_kernels_cuda.py")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", default="fp16", choices=sorted(TILE))
    ap.add_argument("--blocks-per-sm", type=int, default=4,
                    help="resident blocks per SM of the kernel (4 for fp16/bf16, 2 for int8)")
    ap.add_argument("--out", type=Path, default=Path("results/split_imbalance.json"))
    a = ap.parse_args()
    rec = json.loads(a.record.read_text())
    sms = rec["meta"]["sm_count"]
    t = {(r["K"], r["N"], round(r["sparsity"], 2)): r["median_us"] for r in rec["records"]
         if r["kind"] == "sparse" and r["variant"] == "default" and r["dtype"] == a.dtype}
    rng = np.random.default_rng(0)
    s = a.sparsity
    rows_out = []
    for k, n in SHAPES:
        splits, rows = splits_of(k, n, a.dtype, sms, a.blocks_per_sm)
        last = k - (splits - 1) * rows
        sizes = np.array([rows] * (splits - 1) + [last])
        kept = rng.binomial(sizes, 1 - s, size=(20000, splits))
        excess_frac = float(kept.max(1).mean() / ((1 - s) * rows) - 1)
        t0, t9, ts = t[k, n, 0.0], t[k, n, 0.9], t[k, n, round(s, 2)]
        slope = (t0 - t9) / 0.9  # us per unit of density on the straight line
        line = t0 - slope * s
        rows_out.append({"K": k, "N": n, "splits": splits, "rows_per_split": rows,
                         "expected_max_over_mean": 1 + excess_frac,
                         "predicted_excess_us": excess_frac * slope * (1 - s),
                         "measured_us": ts, "line_us": line, "measured_excess_us": ts - line})
        r = rows_out[-1]
        print(f"{k}->{n}: {splits} splits x {rows} rows; E[max]/mean {1 + excess_frac:.3f}; "
              f"predicted +{r['predicted_excess_us']:.2f} us, measured {ts:.2f} vs line "
              f"{line:.2f} = +{r['measured_excess_us']:.2f} us")
    write_json_atomic(a.out, {"record": str(a.record), "device": rec["meta"]["device"],
                              "dtype": a.dtype, "sparsity": s, "sm_count": sms,
                              "blocks_per_sm": a.blocks_per_sm, "shapes": rows_out})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
