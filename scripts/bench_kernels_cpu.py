"""Benchmark the numba CPU GEMV kernels against numpy's dense GEMV and the ideal dense*(1-s).

For every shape (the projections of the bundled models plus 4096->14336 and 14336->4096), every
thread count and every sparsity it times: numpy's dense fp32 GEMV on the output-major (N, K)
array, our fp32 and int8 dense twins, and our fp32 and int8 sparse kernels. Weights are synthetic
Gaussian (speed does not depend on the values); several copies of each weight set, together larger
than twice the last-level cache, are rotated so every call streams its weights from DRAM, as in
decode. Writes a JSON record, a markdown table and a plot, all from the measurements.

    python scripts/bench_kernels_cpu.py            # full run (a few minutes on 2 cores)
    python scripts/bench_kernels_cpu.py --quick    # short run, fewer shapes and repetitions
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange
from sparsify_kernels import cpu, reference
from sparsify_kernels.quant import DEFAULT_GROUP, dequantize_int8, quantize_int8

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:  # numpy's BLAS threads then follow OPENBLAS_NUM_THREADS etc.; recorded below
    threadpool_info = threadpool_limits = None

ROOT = Path(__file__).resolve().parents[1]

# (model, projection names, K inputs, N outputs); GGUF tensor names of the bundled models.
SHAPES = [
    ("smollm2-135m", "attn_q, attn_output", 576, 576),
    ("smollm2-135m", "attn_k, attn_v", 576, 192),
    ("smollm2-135m", "ffn_gate, ffn_up", 576, 1536),
    ("smollm2-135m", "ffn_down", 1536, 576),
    ("gemma3-270m", "attn_q", 640, 1024),
    ("gemma3-270m", "attn_k, attn_v", 640, 256),
    ("gemma3-270m", "attn_output", 1024, 640),
    ("gemma3-270m", "ffn_gate, ffn_up", 640, 2048),
    ("gemma3-270m", "ffn_down", 2048, 640),
    ("8B-class", "ffn_gate, ffn_up", 4096, 14336),
    ("8B-class", "ffn_down", 14336, 4096),
]
BIG = [(4096, 14336), (14336, 4096)]
SPARSITIES = [round(0.1 * i, 1) for i in range(10)]


# ---------------------------------------------------------------------------------------------
# machine description (read from the machine, never typed)
# ---------------------------------------------------------------------------------------------


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model_name": platform.processor() or "unknown"}
    first = text.split("\n\n")[0]
    for line in first.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "vendor_id", "cpu family", "model", "stepping", "cpu MHz"):
            info[key.replace(" ", "_")] = value
        if key == "flags":
            flags = set(value.split())
            info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni") if f in flags]
    return info


def _llc_bytes() -> int:
    """Size of the largest CPU cache reported by sysfs (64 MiB if unknown)."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        s = p.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        best = max(best, int(s.rstrip("KMG")) * mult)
    return best or 64 << 20


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _busy_jiffies() -> int | None:
    """Machine-wide non-idle CPU time in clock ticks (from /proc/stat), None if unavailable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    v = [int(f) for f in fields]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def wait_until_quiet(budget_s: float, below_cores: float = 0.1) -> float:
    """Poll until other processes use less than `below_cores` CPUs over 0.5 s, or the budget
    runs out. Returns the seconds waited. The machine may be shared; a block measured while
    another job competes for the cores says little about the kernels."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        with foreign_load() as load:
            time.sleep(0.5)
        if load["cores"] < below_cores:
            break
    return time.perf_counter() - t0


@contextlib.contextmanager
def foreign_load():
    """Measure the CPU used by *other* processes during the block, in cores:
    machine-wide busy time (/proc/stat) minus this process's CPU time, over the wall time.
    Yields a dict whose "cores" entry is filled when the block ends (NaN if unavailable)."""
    res = {"cores": float("nan")}
    t0, b0, p0 = time.perf_counter(), _busy_jiffies(), os.times()
    try:
        yield res
    finally:
        wall = time.perf_counter() - t0
        b1, p1 = _busy_jiffies(), os.times()
        if b0 is not None and b1 is not None and wall > 0:
            ours = (p1.user - p0.user) + (p1.system - p0.system)
            res["cores"] = max(0.0, ((b1 - b0) / os.sysconf("SC_CLK_TCK") - ours) / wall)


def _meta(args: argparse.Namespace) -> dict:
    blas = threadpool_info() if threadpool_info else None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpuinfo(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "llc_bytes": _llc_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": None,  # filled after the first parallel call
        "blas": blas,
        "blas_threads_pinned": threadpool_limits is not None,
        "group": args.group,
        "weights": "synthetic Gaussian, float32; int8 via quantize_int8",
        "timing": "perf_counter per call, weight copies rotated, median and IQR over reps",
        "argv": sys.argv[1:],
    }


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s) * 1e3
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {
        "median_ms": float(med),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "min_ms": float(a.min()),
        "reps": int(a.size),
    }


def _round_robin(
    cases: dict[str, Callable[[], None]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of every case, `reps` each, interleaved so that drifting machine load
    hits all cases alike."""
    for f in cases.values():
        for _ in range(warmup):
            f()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    clock = time.perf_counter
    for _ in range(reps):
        for name, f in cases.items():
            t0 = clock()
            f()
            samples[name].append(clock() - t0)
    return samples


class _Rotation:
    """Cycles through weight copies: call i uses copy i mod n (one counter per format)."""

    def __init__(self, copies: list) -> None:
        self.copies, self.i = copies, 0

    def next(self):
        self.i += 1
        return self.copies[self.i % len(self.copies)]


def _threshold_for(x: np.ndarray, s: float) -> np.float32:
    """Threshold that drops exactly floor(s*K) channels of the Gaussian x (-1: keep all)."""
    n_drop = math.floor(s * x.size + 1e-9)
    if n_drop == 0:
        return np.float32(-1.0)
    return np.float32(np.sort(np.abs(x))[n_drop - 1])


def _thread_ctx(n: int):
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _kernel_cases(
    nt: int, wts: _Rotation, q8: _Rotation, group: int, x: np.ndarray,
    thresholds: dict[float, np.float32], out: np.ndarray,
) -> dict[str, Callable[[], None]]:
    """Our kernels for one shape: serial variants at 1 thread, parallel (nt chunks) above."""
    k, n = wts.copies[0].shape
    rows, partial = cpu.workspace(k, n, nt)
    cases: dict[str, Callable[[], None]] = {}
    if nt > 1:
        cases["fp32 dense"] = lambda: cpu.dense_fp32_parallel(wts.next(), x, out, partial)
        cases["int8 dense"] = lambda: cpu.dense_int8_parallel(*q8.next(), group, x, out, partial)
        for s, t in thresholds.items():
            cases[f"fp32 sparse {s}"] = lambda t=t: cpu.sparse_fp32_parallel(
                wts.next(), x, t, None, out, rows, partial
            )
            cases[f"int8 sparse {s}"] = lambda t=t: cpu.sparse_int8_parallel(
                *q8.next(), group, x, t, None, out, rows, partial
            )
    else:
        cases["fp32 dense"] = lambda: cpu.dense_fp32_serial(wts.next(), x, out)
        cases["int8 dense"] = lambda: cpu.dense_int8_serial(*q8.next(), group, x, out)
        for s, t in thresholds.items():
            cases[f"fp32 sparse {s}"] = lambda t=t: cpu.sparse_fp32_serial(
                wts.next(), x, t, None, out, rows
            )
            cases[f"int8 sparse {s}"] = lambda t=t: cpu.sparse_int8_serial(
                *q8.next(), group, x, t, None, out, rows
            )
    return cases


def bench_shape(
    k: int, n: int, threads: list[int], group: int, llc: int, reps: int, attempts: int,
    quiet_s: float, rng: np.random.Generator,
) -> list[dict]:
    """All cases for one (K, N): rows of the result table."""
    fp32_bytes = k * n * 4
    n_groups = -(-n // group)
    int8_bytes = k * (n + 4 * n_groups)
    # Enough copies that one full rotation exceeds twice the LLC: every call misses in cache.
    n_fp32 = max(2, math.ceil(2 * llc / fp32_bytes))
    n_int8 = max(2, math.ceil(2 * llc / int8_bytes))
    base = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(max(n_fp32, n_int8))]
    wts = _Rotation(base[:n_fp32])
    wos = _Rotation([np.ascontiguousarray(w.T) for w in base[:n_fp32]])  # (N, K) for numpy
    q8 = _Rotation([quantize_int8(w, group) for w in base[:n_int8]])
    del base
    x = rng.standard_normal(k, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    out_np = np.empty(n, dtype=np.float32)
    rows = np.empty(k, dtype=np.int32)
    thresholds = {s: _threshold_for(x, s) for s in SPARSITIES}
    active = {s: cpu.select_rows(x, thresholds[s], None, rows) for s in SPARSITIES}

    check = _check_against_reference(wts.copies[0], q8.copies[0], group, x, thresholds[0.5])
    results: list[dict] = []
    saved_threads = numba.get_num_threads()
    try:
        for nt in threads:
            numba.set_num_threads(nt)
            def numpy_dense() -> None:
                np.dot(wos.next(), x, out=out_np)

            cases = _kernel_cases(nt, wts, q8, group, x, thresholds, out)
            best = None
            for attempt in range(attempts):
                waited = wait_until_quiet(quiet_s)
                with _thread_ctx(nt), foreign_load() as load:
                    # numpy runs in its own phases, before and after ours: OpenBLAS worker threads
                    # keep spinning for a while after a call and would steal a core from numba's
                    # threads (and libgomp's spinning from OpenBLAS) if the calls were interleaved.
                    half = max(1, reps // 2)
                    np_a = _round_robin({"numpy dense": numpy_dense}, half, warmup=3)
                    time.sleep(0.05)
                    ours = _round_robin(cases, reps, warmup=3)
                    time.sleep(0.05)
                    np_b = _round_robin({"numpy dense": numpy_dense}, reps - half, warmup=3)
                if best is None or load["cores"] < best[0]:
                    best = (load["cores"], attempt, np_a, np_b, ours, waited)
                if load["cores"] < 0.1:  # machine otherwise idle: keep this attempt
                    break
            foreign, attempt, np_a, np_b, ours, waited = best
            np_stats = _stats(np_a["numpy dense"] + np_b["numpy dense"])
            ours = {name: _stats(v) for name, v in ours.items()}

            common = {"K": k, "N": n, "threads": nt, "foreign_load_cores": round(foreign, 3),
                      "attempt": attempt, "waited_for_quiet_s": round(waited, 1)}
            dense32 = ours["fp32 dense"]["median_ms"]
            dense8 = ours["int8 dense"]["median_ms"]
            results.append({**common, "method": "numpy dense", "dtype": "float32",
                            "layout": "output-major (N, K)", "sparsity": 0.0, "active_rows": k,
                            "bytes": fp32_bytes, **np_stats})
            for dtype, nbytes_row, dense_ms in (("float32", 4 * n, dense32),
                                                ("int8", n + 4 * n_groups, dense8)):
                tag = "fp32" if dtype == "float32" else "int8"
                results.append({**common, "method": "dense twin", "dtype": dtype,
                                "layout": "input-major (K, N)", "sparsity": 0.0, "active_rows": k,
                                "bytes": k * nbytes_row, **ours[f"{tag} dense"]})
                for s in SPARSITIES:
                    results.append({**common, "method": "sparse", "dtype": dtype,
                                    "layout": "input-major (K, N)", "sparsity": s,
                                    "active_rows": int(active[s]),
                                    "bytes": int(active[s]) * nbytes_row,
                                    "ideal_ms": dense_ms * (1 - s),
                                    **ours[f"{tag} sparse {s}"]})
    finally:
        numba.set_num_threads(saved_threads)
    for r in results:
        r["gb_per_s"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        r["checked_vs_reference"] = check
    return results


def _check_against_reference(
    wt: np.ndarray, q8: tuple[np.ndarray, np.ndarray], group: int, x: np.ndarray, t: np.float32
) -> dict:
    """Before timing, the kernels being timed must match the numpy reference within the float32
    bound gamma_(K+3) * sum|x||w| (see tests/test_kernels_cpu.py); raises otherwise."""
    k = wt.shape[0]
    u = float(np.finfo(np.float32).eps) / 2
    gamma = (k + 3) * u / (1 - (k + 3) * u)
    keep = reference.keep_mask(x, t)
    worst = 0.0
    for name, w, run in (
        ("fp32", wt, lambda o, r, p: cpu.sparse_gemv_fp32_into(wt, x, t, o, r, p)),
        ("int8", dequantize_int8(*q8, group),
         lambda o, r, p: cpu.sparse_gemv_int8_into(*q8, group, x, t, o, r, p)),
    ):
        out = np.empty(wt.shape[1], dtype=np.float32)
        rows, partial = cpu.workspace(k, wt.shape[1], 2)
        run(out, rows, partial)
        want = reference.sparse_gemv_fp32_ref(w, x, t)
        bound = gamma * (np.abs(x[keep]).astype(np.float64) @ np.abs(w[keep]).astype(np.float64))
        err = np.abs(out.astype(np.float64) - want)
        if not np.all(err <= bound):
            raise RuntimeError(f"{name} kernel disagrees with the reference at K={k}")
        worst = max(worst, float(np.max(err / np.maximum(bound, 1e-30))))
    return {"sparsity": 0.5, "max_error_over_bound": worst}


@njit(cache=True, parallel=True)
def _output_chunked_fp32(wt, x, rows, m, out, n_chunks):
    """The alternative parallel split, for the study only: each chunk owns a contiguous slice of
    the outputs (64-byte aligned) and walks every kept row over it, eight rows per pass."""
    n = wt.shape[1]
    step = ((n + n_chunks - 1) // n_chunks + 15) // 16 * 16
    for c in prange(n_chunks):
        n0 = min(n, c * step)
        n1 = min(n, n0 + step)
        o = out[n0:n1]
        for j in range(o.shape[0]):
            o[j] = 0.0
        for r in range(0, m - m % 8, 8):
            w0, w1, w2, w3 = wt[rows[r], n0:n1], wt[rows[r + 1], n0:n1], wt[rows[r + 2], n0:n1], \
                wt[rows[r + 3], n0:n1]
            w4, w5, w6, w7 = wt[rows[r + 4], n0:n1], wt[rows[r + 5], n0:n1], \
                wt[rows[r + 6], n0:n1], wt[rows[r + 7], n0:n1]
            a0, a1, a2, a3 = x[rows[r]], x[rows[r + 1]], x[rows[r + 2]], x[rows[r + 3]]
            a4, a5, a6, a7 = x[rows[r + 4]], x[rows[r + 5]], x[rows[r + 6]], x[rows[r + 7]]
            for j in range(o.shape[0]):
                o[j] += (a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]) + (
                    a4 * w4[j] + a5 * w5[j] + a6 * w6[j] + a7 * w7[j])
        for r in range(m - m % 8, m):
            w0 = wt[rows[r], n0:n1]
            for j in range(o.shape[0]):
                o[j] += x[rows[r]] * w0[j]


def _split_cases(k: int, n: int, llc: int, rng: np.random.Generator) -> dict:
    copies = max(2, math.ceil(2 * llc / (k * n * 4)))
    wts = _Rotation([rng.standard_normal((k, n), dtype=np.float32) for _ in range(copies)])
    x = rng.standard_normal(k, dtype=np.float32)
    t = _threshold_for(x, 0.5)
    out = np.empty(n, dtype=np.float32)
    rows = np.empty(k, dtype=np.int32)
    m = cpu.select_rows(x, t, None, rows)
    cases: dict[str, Callable[[], None]] = {}
    for c in (1, 2, 4, 8):
        p = cpu.workspace(k, n, c)[1]
        cases[f"split-K|{c}"] = lambda p=p: cpu.sparse_fp32_parallel(
            wts.next(), x, t, None, out, rows, p
        )
    for c in (2, 8, 28):
        cases[f"output chunks|{c}"] = lambda c=c: _output_chunked_fp32(
            wts.next(), x, rows, m, out, c
        )
    return cases


def chunking_study(
    reps: int, quiet_s: float, llc: int, rng: np.random.Generator
) -> list[dict]:
    """Parallel fp32 sparse GEMV at 50 %, 2 threads: split-K (the library's choice) against
    splitting the outputs, for several chunk counts, on a wide and a tall shape."""
    out_rows = []
    saved = numba.get_num_threads()
    nt = min(2, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(nt)
    try:
        for k, n in ((4096, 14336), (2048, 640)):
            cases = _split_cases(k, n, llc, rng)
            wait_until_quiet(quiet_s)
            with foreign_load() as load:
                res = _round_robin(cases, reps if k * n > 1 << 22 else 10 * reps, warmup=2)
            for name, v in res.items():
                split, c = name.split("|")
                out_rows.append({"K": k, "N": n, "threads": nt, "sparsity": 0.5, "split": split,
                                 "n_chunks": int(c), "foreign_load_cores": round(load["cores"], 3),
                                 **_stats(v)})
    finally:
        numba.set_num_threads(saved)
    return out_rows


def call_overhead(reps: int) -> list[dict]:
    """Per-call cost on a 16x16 problem: raw njit kernel vs checked wrapper vs numpy."""
    rng = np.random.default_rng(1)
    wt = rng.standard_normal((16, 16), dtype=np.float32)
    wo = np.ascontiguousarray(wt.T)
    x = rng.standard_normal(16, dtype=np.float32)
    out = np.empty(16, dtype=np.float32)
    out_np = np.empty(16, dtype=np.float32)
    rows, partial = cpu.workspace(16, 16, 2)
    t = np.float32(0.5)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        res = _round_robin({
            "raw serial": lambda: cpu.sparse_fp32_serial(wt, x, t, None, out, rows),
            "raw parallel": lambda: cpu.sparse_fp32_parallel(wt, x, t, None, out, rows, partial),
            "checked serial": lambda: cpu.sparse_gemv_fp32_into(wt, x, t, out, rows),
            "checked parallel": lambda: cpu.sparse_gemv_fp32_into(wt, x, t, out, rows, partial),
            "numpy dot": lambda: np.dot(wo, x, out=out_np),
        }, reps, warmup=10)
        res = {name: _stats(v) for name, v in res.items()}
    finally:
        numba.set_num_threads(saved)
    return [{"call": name, "K": 16, "N": 16, **st} for name, st in res.items()]


def int8_group_study(rng: np.random.Generator) -> list[dict]:
    """Error of int8 vs fp32 on Gaussian weights for several group sizes G, and bytes per weight.

    Weight error: ||deq - W||_F / ||W||_F. Output error: ||x @ deq - x @ W|| / ||x @ W|| for a
    Gaussian x (dense). Both in float64 so only quantization error is measured.
    """
    k, n = 1024, 4096
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal(k).astype(np.float64)
    y = x @ w.astype(np.float64)
    rows = []
    for g in (16, 32, 64, 128, 256, 1024, n):
        q, s = quantize_int8(w, g)
        deq = dequantize_int8(q, s, g).astype(np.float64)
        rows.append({
            "group": g,
            "bytes_per_weight": 1 + 4 * (-(-n // g)) / n,
            "weight_rel_err": float(np.linalg.norm(deq - w) / np.linalg.norm(w)),
            "output_rel_err": float(np.linalg.norm(x @ deq - y) / np.linalg.norm(y)),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def _find(rows: list[dict], **kw) -> dict | None:
    for r in rows:
        if all(r.get(key) == v for key, v in kw.items()):
            return r
    return None


def headline(rows: list[dict], threads: list[int]) -> list[dict]:
    """4096->14336 at 50 %: ratios against numpy dense and our dense twins."""
    out = []
    for k, n in BIG:
        for nt in threads:
            npd = _find(rows, K=k, N=n, threads=nt, method="numpy dense")
            d32 = _find(rows, K=k, N=n, threads=nt, method="dense twin", dtype="float32")
            s32 = _find(rows, K=k, N=n, threads=nt, method="sparse", dtype="float32", sparsity=0.5)
            d8 = _find(rows, K=k, N=n, threads=nt, method="dense twin", dtype="int8")
            s8 = _find(rows, K=k, N=n, threads=nt, method="sparse", dtype="int8", sparsity=0.5)
            if not all((npd, d32, s32, d8, s8)):
                continue
            out.append({
                "K": k, "N": n, "threads": nt,
                "numpy_dense_ms": npd["median_ms"], "numpy_gb_per_s": npd["gb_per_s"],
                "fp32_dense_ms": d32["median_ms"], "fp32_dense_gb_per_s": d32["gb_per_s"],
                "fp32_sparse50_ms": s32["median_ms"], "fp32_sparse50_gb_per_s": s32["gb_per_s"],
                "int8_dense_ms": d8["median_ms"], "int8_sparse50_ms": s8["median_ms"],
                "int8_sparse50_gb_per_s": s8["gb_per_s"],
                "fp32_sparse50_vs_own_dense": d32["median_ms"] / s32["median_ms"],
                "fp32_sparse50_vs_numpy": npd["median_ms"] / s32["median_ms"],
                "int8_sparse50_vs_numpy": npd["median_ms"] / s8["median_ms"],
            })
    return out


def _cell(r: dict | None, ideal: bool = False) -> str:
    if r is None:
        return "-"
    s = f"{r['median_ms']:.3f} ({r['iqr_ms']:.3f})"
    if ideal:
        s += f" ({r['ideal_ms']:.3f})"
    return s


def markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [
        "# CPU GEMV kernels: measured",
        "",
        (
            f"Machine: {meta['cpu'].get('model_name', '?')}, {meta['cpus_usable']} usable "
            f"CPUs, LLC {meta['llc_bytes'] >> 20} MiB; numpy {meta['numpy']}, numba "
            f"{meta['numba']} ({meta['numba_threading_layer']}); {meta['date_utc']}. "
            "Generated by `scripts/bench_kernels_cpu.py` from `kernels_cpu.json`."
        ),
        "",
        "## Headline (sparsity 0.5)",
        "",
        (
            "| K->N | thr | numpy dense ms (GB/s) | fp32 dense ms (GB/s) | fp32 sparse ms "
            "(GB/s) | vs dense | vs numpy | int8 dense ms | int8 sparse ms (GB/s) "
            "| int8 vs numpy |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in record["headline"]:
        lines.append(
            f"| {h['K']}->{h['N']} | {h['threads']} | {h['numpy_dense_ms']:.2f} "
            f"({h['numpy_gb_per_s']:.1f}) | {h['fp32_dense_ms']:.2f} "
            f"({h['fp32_dense_gb_per_s']:.1f}) | {h['fp32_sparse50_ms']:.2f} "
            f"({h['fp32_sparse50_gb_per_s']:.1f}) | {h['fp32_sparse50_vs_own_dense']:.2f}x "
            f"| {h['fp32_sparse50_vs_numpy']:.2f}x | {h['int8_dense_ms']:.2f} "
            f"| {h['int8_sparse50_ms']:.2f} ({h['int8_sparse50_gb_per_s']:.1f}) "
            f"| {h['int8_sparse50_vs_numpy']:.2f}x |"
        )
    lines += ["", "## All shapes: median ms (IQR) at sparsity 0 / 0.5 / 0.9, ideal = dense*(1-s)",
              ""]
    lines.append("| K->N | thr | numpy | fp32 dense | fp32 s0 | fp32 s0.5 (ideal) "
                 "| fp32 s0.9 (ideal) | int8 dense | int8 s0.5 (ideal) | int8 s0.9 (ideal) "
                 "| load |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = record["rows"]
    seen = []
    for r in rows:
        key = (r["K"], r["N"], r["threads"])
        if key in seen:
            continue
        seen.append(key)
        k, n, nt = key

        def pick(k: int = k, n: int = n, nt: int = nt, **kw) -> dict | None:
            return _find(rows, K=k, N=n, threads=nt, **kw)

        lines.append(
            f"| {k}->{n} | {nt} | {_cell(pick(method='numpy dense'))} "
            f"| {_cell(pick(method='dense twin', dtype='float32'))} "
            f"| {_cell(pick(method='sparse', dtype='float32', sparsity=0.0))} "
            f"| {_cell(pick(method='sparse', dtype='float32', sparsity=0.5), True)} "
            f"| {_cell(pick(method='sparse', dtype='float32', sparsity=0.9), True)} "
            f"| {_cell(pick(method='dense twin', dtype='int8'))} "
            f"| {_cell(pick(method='sparse', dtype='int8', sparsity=0.5), True)} "
            f"| {_cell(pick(method='sparse', dtype='int8', sparsity=0.9), True)} "
            f"| {pick(method='numpy dense')['foreign_load_cores']:.2f} |"
        )
    lines += ["", "`load`: CPU cores used by other processes during the measurement.", "",
              "## int8 group size G (Gaussian weights 1024x4096)", "",
              "| G | bytes/weight | weight rel. err | output rel. err |", "|---|---|---|---|"]
    for g in record["int8_groups"]:
        lines.append(f"| {g['group']} | {g['bytes_per_weight']:.4f} | {g['weight_rel_err']:.5f} "
                     f"| {g['output_rel_err']:.5f} |")
    if record.get("chunking"):
        lines += ["", "## Parallel split (fp32 sparse 0.5)", "",
                  "| K->N | split | chunks | threads | median ms (IQR) |", "|---|---|---|---|---|"]
        for c in record["chunking"]:
            lines.append(f"| {c['K']}->{c['N']} | {c['split']} | {c['n_chunks']} "
                         f"| {c['threads']} | {c['median_ms']:.3f} ({c['iqr_ms']:.3f}) |")
    lines += ["", "## Call overhead (16x16, 2 threads)", "", "| call | median us |", "|---|---|"]
    for c in record["call_overhead"]:
        lines.append(f"| {c['call']} | {c['median_ms'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    threads = sorted({r["threads"] for r in rows})
    shapes = [s for s in BIG if _find(rows, K=s[0], N=s[1])]
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), len(threads), figsize=(5.5 * len(threads),
                             4 * len(shapes)), squeeze=False, sharey="row")
    for i, (k, n) in enumerate(shapes):
        for j, nt in enumerate(threads):
            ax = axes[i][j]
            npd = _find(rows, K=k, N=n, threads=nt, method="numpy dense")
            ax.axhline(npd["median_ms"], color="k", ls="--", lw=1, label="numpy dense fp32")
            for dtype, color in (("float32", "C0"), ("int8", "C3")):
                sp = [r for r in rows if r["K"] == k and r["N"] == n and r["threads"] == nt
                      and r["method"] == "sparse" and r["dtype"] == dtype]
                s = np.array([r["sparsity"] for r in sp])
                med = np.array([r["median_ms"] for r in sp])
                err = np.array([[r["median_ms"] - r["q1_ms"] for r in sp],
                                [r["q3_ms"] - r["median_ms"] for r in sp]])
                d = _find(rows, K=k, N=n, threads=nt, method="dense twin", dtype=dtype)
                ax.errorbar(s, med, yerr=err, color=color, marker="o", ms=3, capsize=2,
                            label=f"{dtype} sparse")
                ax.plot(s, d["median_ms"] * (1 - s), color=color, ls=":",
                        label=f"{dtype} ideal dense*(1-s)")
                ax.axhline(d["median_ms"], color=color, lw=0.8, alpha=0.5,
                           label=f"{dtype} dense twin")
            ax.set_title(f"{k}->{n}, {nt} thread{'s' if nt > 1 else ''}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel("ms per GEMV (median, IQR bars)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    cpu_name = record["meta"]["cpu"].get("model_name", "?")
    fig.suptitle(f"Sparse GEMV on {cpu_name} (numba {record['meta']['numba']}, "
                 f"numpy {record['meta']['numpy']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few shapes, few repetitions")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--group", type=int, default=DEFAULT_GROUP, help="int8 group size")
    ap.add_argument("--attempts", type=int, default=3,
                    help="repeat a block up to this often while other processes load the CPU")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="seconds to wait for an otherwise idle machine before each block "
                         "(default 120, 10 with --quick)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "kernels_cpu.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if max(threads) > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"at most {numba.config.NUMBA_NUM_THREADS} threads available to numba")
    rng = np.random.default_rng(args.seed)
    quiet_s = args.quiet_wait if args.quiet_wait is not None else (10.0 if args.quick else 120.0)
    llc = _llc_bytes()
    meta = _meta(args)
    meta["loadavg_start"] = _loadavg()
    shapes = SHAPES if not args.quick else [SHAPES[0], SHAPES[2], SHAPES[-2]]
    rows: list[dict] = []
    for model, names, k, n in shapes:
        big = k * n >= 1 << 24
        if args.quick:
            reps = 8 if big else 50
        else:
            reps = 60 if big else 400
        t0 = time.perf_counter()
        res = bench_shape(k, n, threads, args.group, llc, reps, args.attempts, quiet_s, rng)
        for r in res:
            r["model"], r["tensors"] = model, names
        rows += res
        h = _find(res, threads=threads[-1], method="sparse", dtype="float32", sparsity=0.5)
        d = _find(res, threads=threads[-1], method="dense twin", dtype="float32")
        npd = _find(res, threads=threads[-1], method="numpy dense")
        print(f"{model:13s} {k:5d}->{n:5d}  {threads[-1]} thr: numpy {npd['median_ms']:.3f} ms, "
              f"fp32 dense {d['median_ms']:.3f}, sparse@0.5 {h['median_ms']:.3f} "
              f"(load {npd['foreign_load_cores']:.2f})  [{time.perf_counter() - t0:.1f} s]",
              file=sys.stderr)
    meta["numba_threading_layer"] = numba.threading_layer()
    record = {
        "schema": "sparsify.bench.kernels_cpu/1",
        "meta": meta,
        "rows": rows,
        "headline": headline(rows, threads),
        "int8_groups": int8_group_study(rng),
        "chunking": (chunking_study(8 if args.quick else 40, quiet_s, llc, rng)
                     if 2 in threads else []),
        "call_overhead": call_overhead(200 if args.quick else 3000),
    }
    record["meta"]["loadavg_end"] = _loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    plot(record, args.out.with_suffix(".png"))
    print(markdown(record))


if __name__ == "__main__":
    main()
