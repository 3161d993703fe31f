"""Dequantization speed per ggml type, and numba first-call cost with a cold and a warm cache.

Writes one JSON record (default results/quants_cpu.json) and prints a table to stderr.
    python scripts/bench_quants.py [--elements N] [--repeats R] [--model GGUF] [-o OUT]

Throughput is measured two ways on random valid blocks of N elements (inputs and outputs far
larger than the caches): ``call`` is dequantize() as the loader calls it, output allocation and
first touch included; ``kernel`` writes into an already-touched output. First-call times run in
fresh processes: ``cold`` with an empty numba cache directory (compile), ``warm`` reusing it.
With --model, every tensor of that file is decoded in a fresh process, as a loader would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from sparsify import quants
from sparsify.bench import cpu_name

FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
from sparsify import quants
t1 = time.perf_counter()
t = quants.GGML_TYPES[{qid}]
quants.dequantize(np.zeros(t.type_size * 8, np.uint8), {qid}, (8 * t.block_size,))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

WHOLE_MODEL = """
import sys, time, numpy as np
from sparsify import quants
from sparsify.gguf_file import GGUFFile
f = GGUFFile.open(sys.argv[1])
mm = np.memmap(sys.argv[1], dtype=np.uint8, mode="r")
t0 = time.perf_counter()
for q in {i.qtype for i in f}:  # load every kernel and start the threads, outside the timing
    t = quants.GGML_TYPES[q]
    quants.dequantize(np.zeros(t.type_size, np.uint8), q, (t.block_size,))
warm = time.perf_counter() - t0
keep, res = [], {}
for group in ("blk.", "token_embd."):
    t0, n = time.perf_counter(), 0
    for i in f:  # every tensor decoded and kept alive, as a loader does
        if i.name.startswith(group):
            keep.append(quants.dequantize(mm[i.offset : i.offset + i.nbytes], i.qtype, i.shape))
            n += keep[-1].size
    res[group] = (n, time.perf_counter() - t0)
print(warm, *res["blk."], *res["token_embd."])
"""


def random_raw(rng: np.random.Generator, t: quants.GGMLType, n: int) -> np.ndarray:
    """Random bytes for n elements of type t; every half-precision field made finite by
    clearing the top exponent bit wherever a pattern is inf/nan (the bytes of a block are
    random anyway, so this only needs to touch aligned 16-bit words)."""
    raw = rng.integers(0, 256, size=n // t.block_size * t.type_size, dtype=np.uint8)
    if t.name == "F32":
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    words = raw.view(np.uint16)
    words[(words & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)
    if t.name == "BF16":
        words[(words & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)
    return raw


def throughput(n: int, repeats: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    kept = np.empty(n, np.float32)
    kept[:] = 0  # touched once, reused by every kernel-only run
    for qid in sorted(quants._KERNELS):
        t = quants.GGML_TYPES[qid]
        raw = random_raw(rng, t, n)
        shape = (n // 4096, 4096)
        quants.dequantize(raw[: t.type_size * 16], qid, (16 * t.block_size,))  # compile/load
        call, kern = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = quants.dequantize(raw, qid, shape)
            call.append(time.perf_counter() - t0)
            del out
            flat = quants._as_bytes(raw)
            dst = kept.view(np.uint32) if t.name == "BF16" else kept
            t0 = time.perf_counter()
            quants._KERNELS[qid](flat, dst, quants._F16_TO_F32)
            kern.append(time.perf_counter() - t0)
        rows.append({
            "type": t.name, "elements": n, "bytes_in": int(raw.size),
            "call_s": {"median": float(np.median(call)), "min": min(call), "max": max(call)},
            "kernel_s": {"median": float(np.median(kern)), "min": min(kern), "max": max(kern)},
            "call_melem_s": n / float(np.median(call)) / 1e6,
            "kernel_melem_s": n / float(np.median(kern)) / 1e6,
        })
        print(f"{t.name:5s} call {rows[-1]['call_melem_s']:7.0f} Melem/s   kernel "
              f"{rows[-1]['kernel_melem_s']:7.0f} Melem/s", file=sys.stderr)
    return rows


def first_calls() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for qid in sorted(quants._KERNELS):
            row = {"type": quants.GGML_TYPES[qid].name}
            for mode in ("cold", "warm"):  # the cold run fills the cache the warm run reads
                out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(qid=qid)], env=env,
                                     check=True, capture_output=True, text=True).stdout
                imp, first = map(float, out.split())
                row[f"{mode}_first_call_s"] = first
                row["import_s"] = imp
            rows.append(row)
            print(f"{row['type']:5s} first call: cold cache {row['cold_first_call_s']:.2f} s, "
                  f"warm cache {row['warm_first_call_s']:.3f} s", file=sys.stderr)
    return rows


def whole_model(path: Path) -> dict:
    """Every tensor of a GGUF file decoded and kept, in a fresh process (as at model load)."""
    out = subprocess.run([sys.executable, "-c", WHOLE_MODEL, str(path)], check=True,
                         capture_output=True, text=True).stdout
    warm, n_blk, s_blk, n_emb, s_emb = map(float, out.split())
    types = sorted({quants.type_name(i.qtype) for i in _tensors(path)})
    row = {"model": path.name, "types": types, "kernel_load_s": warm,
           "blocks": {"elements": int(n_blk), "s": s_blk, "melem_s": n_blk / s_blk / 1e6},
           "token_embd": {"elements": int(n_emb), "s": s_emb, "melem_s": n_emb / s_emb / 1e6}}
    print(f"{path.name}: kernels loaded in {warm:.2f} s; blk.* {n_blk / 1e6:.0f}M elements "
          f"in {s_blk:.3f} s; token_embd {n_emb / 1e6:.0f}M in {s_emb:.3f} s", file=sys.stderr)
    return row


def _tensors(path: Path) -> list:
    from sparsify.gguf_file import GGUFFile

    with GGUFFile.open(path) as f:
        return list(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, action="append", default=[])
    ap.add_argument("-o", "--out", type=Path, default=Path("results/quants_cpu.json"))
    args = ap.parse_args()
    record = {
        "benchmark": "dequantize",
        "device": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": numba.get_num_threads(),
        "threading_layer": None,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "numba": numba.__version__},
        "synthetic": True,
        "loadavg_before": os.getloadavg()[0],
        "throughput": throughput(args.elements, args.repeats, args.seed),
        "first_call": first_calls(),
        "models": [whole_model(m) for m in args.model],
    }
    record["threading_layer"] = numba.threading_layer()
    record["loadavg_after"] = os.getloadavg()[0]  # others' work on the machine skews timings
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
