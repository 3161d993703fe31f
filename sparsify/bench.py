"""``sparsify bench``: decode tokens/s, dense and sparse, with the byte-count ideal beside it.

Every record carries what the number was measured on (device name as the machine reports it,
versions, threads, format, model and whether its weights are synthetic), the median and spread
of repeated runs, the weight bytes read per token and the achieved GB/s. On CPU, llama.cpp's
dense decode (through llama-cpp-python, when installed) is measured in the same run on the same
file with the same thread count.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .errors import SparsifyError

BENCH_PROMPT = "The history of the bicycle begins"


def bench_prompt_ids(tokenizer, context: int | None = None) -> list[int]:
    """The prompt a benchmark decodes after: BENCH_PROMPT, or with ``context``, the first
    ``context`` tokens of the built-in held-out text (decode then runs at positions from
    ``context`` on, where attention reads that many cached keys)."""
    if not context:
        return tokenizer.encode(BENCH_PROMPT)
    from .corpus import heldout

    text = heldout().text
    chars = 8 * context
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) >= context or chars >= len(text):
            break
        chars *= 2
    if len(ids) < context:
        raise SparsifyError(f"--context {context}: the built-in text gives only {len(ids)} tokens")
    return ids[:context]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import numba
    import torch

    from . import __version__

    out = {"sparsify": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "numba": numba.__version__, "torch": torch.__version__}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


def is_synthetic(loaded) -> bool:
    return str(loaded.gguf.metadata.get("general.name", "")).startswith("synthetic")


def summarize(samples: list[float]) -> dict[str, float]:
    q = np.percentile(samples, [25, 50, 75])
    return {"median": float(q[1]), "iqr": float(q[2] - q[0]), "min": float(min(samples)),
            "max": float(max(samples)), "n": len(samples)}


def _time_engine(engine, prompt_ids: list[int], tokens: int, repeats: int) -> tuple[list, dict]:
    """tokens/s of greedy decode (prefill excluded) over ``repeats`` runs, plus byte counts."""
    rates = []
    per_token_bytes = []
    for _ in range(repeats):
        logits = engine.prefill(prompt_ids)
        engine.bytes_read = 0
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = engine.step(tok)
            tok = int(np.argmax(logits))
        dt = time.perf_counter() - t0
        rates.append(tokens / dt)
        per_token_bytes.append(engine.bytes_read / tokens)
    return rates, {"bytes_per_token": float(np.mean(per_token_bytes))}


def llamacpp_decode_rate(path: Path, prompt: str, tokens: int, repeats: int,
                         threads: int) -> dict | None:
    """llama.cpp's dense greedy decode tokens/s on the same file, or None when not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from .oracle import _quiet_stderr

    with _quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                              n_threads_batch=threads, logits_all=False, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        rates = []
        with _quiet_stderr():
            for _ in range(repeats + 1):  # the first run warms up
                llm.reset()
                llm.eval(ids)
                t0 = time.perf_counter()
                for _ in range(tokens):
                    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    llm.eval([tok])
                rates.append(tokens / (time.perf_counter() - t0))
        info = llama_cpp.llama_print_system_info()
    finally:
        with _quiet_stderr():
            llm.close()
    return {"tok_s": summarize(rates[1:]), "system_info": info.decode(errors="replace").strip()}


def run_bench(spec: str, device: str, levels: list[float], table_path: str | None,
              fmt: str | None, tokens: int, repeats: int, threads: int | None,
              json_out: str | None, force: bool, context: int | None = None,
              kv_cache: str | None = None) -> None:
    from .loader import load

    if json_out and Path(json_out).exists() and not force:
        raise SparsifyError("exists; pass --force to overwrite", json_out)
    loaded = load(spec)
    table = None
    if any(s > 0 for s in levels):
        if table_path is None:
            raise SparsifyError("sparsity levels above 0 need --table (see `sparsify profile`)")
        from .table import ThresholdTable

        table = ThresholdTable.load(table_path)
        table.check(loaded)
    if device == "cuda":
        from .engine_cuda import bench_cuda

        record = bench_cuda(loaded, table, levels, fmt or "fp16", tokens, repeats, context,
                            kv_cache)
    else:
        record = bench_cpu(loaded, table, levels, fmt or "int8", tokens, repeats, threads,
                           context)
    _print_table(record)
    if json_out:
        write_json_atomic(Path(json_out), record)


def bench_cpu(loaded, table, levels: list[float], fmt: str, tokens: int, repeats: int,
              threads: int | None, context: int | None = None) -> dict:
    import numba

    from .engine_cpu import FORMATS, PARALLEL_KEYS, CPUEngine

    if fmt not in FORMATS:
        raise SparsifyError(f"--format {fmt} is not available on cpu (choose {', '.join(FORMATS)})")
    old = numba.get_num_threads()
    threads = threads or old
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise SparsifyError(f"--threads {threads}: numba was started with "
                            f"{numba.config.NUMBA_NUM_THREADS} threads at most")
    numba.set_num_threads(threads)
    try:
        print(f"packing weights ({fmt}) ...", file=sys.stderr)
        ids = bench_prompt_ids(loaded.tokenizer, context)
        engine = CPUEngine(loaded.model(), fmt=fmt,
                           max_len=max(len(BENCH_PROMPT), len(ids)) + tokens + 16)
        engine.set_thresholds(None)
        engine.prefill(ids[:2])  # compile and warm the caches
        rows = []
        dense_bytes = engine.block_bytes + engine.head.nbytes
        for s in levels:
            thresholds = None if s == 0 or table is None else table.thresholds_at(s)
            scales = None
            if thresholds is not None and table.criterion == "weight-aware":
                scales = _column_norms(engine)
            engine.set_thresholds(thresholds, scales)
            _time_engine(engine, ids, min(tokens, 8), 1)  # warm up at this level
            print(f"level {s:g}: {repeats} x {tokens} tokens ...", file=sys.stderr)
            rates, extra = _time_engine(engine, ids, tokens, repeats)
            bpt = extra["bytes_per_token"]
            ts = summarize(rates)
            rows.append({
                "sparsity": s, "tok_s": ts, "bytes_per_token": bpt,
                "gb_s": bpt * ts["median"] / 1e9,
                "realized_block_sparsity": 1 - (bpt - engine.head.nbytes) / engine.block_bytes,
                "ideal_speedup": dense_bytes / bpt,
            })
        base = rows[0]["tok_s"]["median"] if levels and levels[0] == 0 else None
        for r in rows:
            r["speedup"] = r["tok_s"]["median"] / base if base else None
        llama = (llamacpp_decode_rate(loaded.path, BENCH_PROMPT, tokens, repeats, threads)
                 if not context else "not run with --context")
    finally:
        numba.set_num_threads(old)
    return {
        "kind": "decode", "device": cpu_name(), "device_type": "cpu", "threads": threads,
        "cores": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
        "versions": versions(), "model": loaded.path.name,
        "architecture": loaded.cfg.arch, "synthetic": is_synthetic(loaded), "format": fmt,
        "tokens": tokens, "repeats": repeats, "prompt": BENCH_PROMPT if not context else None,
        "context": len(ids),
        "attention": f"heads in parallel from {PARALLEL_KEYS} visible keys",
        "table": None if table is None else {"criterion": table.criterion},
        "weight_bytes_dense": dense_bytes, "head_bytes": engine.head.nbytes,
        "levels": rows,
        "llama_cpp": llama if llama is not None else "llama-cpp-python is not installed",
    }


def _column_norms(engine) -> dict[str, np.ndarray]:
    """‖W[:, i]‖ per input channel for every projection, from the engine's packed weights."""
    out = {}
    for name, p in engine.projs.items():
        if p.wt is not None:
            out[name] = np.linalg.norm(p.wt, axis=1).astype(np.float32)
        else:
            w = p.q.astype(np.float32).reshape(p.k, -1, engine.group) if p.n % engine.group == 0 \
                else None
            if w is None:
                from sparsify_kernels.quant import dequantize_int8

                full = dequantize_int8(p.q, p.scales, engine.group)
            else:
                full = (w * p.scales[:, :, None]).reshape(p.k, p.n)
            out[name] = np.linalg.norm(full, axis=1).astype(np.float32)
    return out


def _print_table(rec: dict) -> None:
    synth = " (synthetic weights)" if rec.get("synthetic") else ""
    print(f"{rec['model']}{synth} on {rec['device']}, {rec.get('format')}, "
          f"threads {rec.get('threads', '-')}")
    print(f"{'sparsity':>8} {'tok/s':>9} {'±iqr':>7} {'speedup':>8} {'ideal':>7} "
          f"{'MB/token':>9} {'GB/s':>7}")
    for r in rec["levels"]:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{r['sparsity']:>8.2f} {r['tok_s']['median']:>9.1f} {r['tok_s']['iqr']:>7.1f} "
              f"{sp:>8} {r['ideal_speedup']:>6.2f}x {r['bytes_per_token'] / 1e6:>9.1f} "
              f"{r['gb_s']:>7.1f}")
    lc = rec.get("llama_cpp")
    if isinstance(lc, dict):
        print(f"llama.cpp dense (same file, same threads): {lc['tok_s']['median']:.1f} tok/s")
    elif lc:
        print(f"llama.cpp: {lc}")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as sorted JSON to ``path`` (its directory made if missing) through
    :func:`sparsify.table.write_atomic`; an existing file is replaced (callers check
    ``--force`` before measuring)."""
    from .table import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), force=True)


__all__ = ["bench_cpu", "run_bench", "summarize"]
