"""GPU decode benchmark: engine tests, a synthetic Llama-3-8B-shaped model, tokens/s per level.

``run OUT`` does everything one device session needs, in order of importance, under a deadline:

1. starts writing a synthetic model at Llama-3-8B's shapes (F16, ~16 GB, random weights) in a
   background process, so the CPU work overlaps with steps 2-3;
2. builds the CUDA kernels and runs ``tests/test_kernels_cuda.py`` and
   ``tests/test_engine_cuda.py`` on the GPU (if a test of the fused decode step fails, the
   benchmarks below run the torch glue, ``SPARSIFY_CUDA_FUSED=0``, and the log says so), then
   (``--kernels``) the kernel benchmark ``scripts/bench_kernels_cuda.py`` into OUT;
3. benchmarks a small synthetic model (a smoke test of ``bench_cuda``);
4. profiles thresholds for the big model (``sparsify profile``, CPU torch; or takes the table
   given with ``--table``, profiled earlier on the same file) and runs
   ``sparsify bench --device cuda`` (the same ``run_bench`` call, in this process so the data
   hash the table check needs is computed once) for fp16, int8, then bf16 while time is left.

Records go to ``OUT/decode_cuda_<card>_<model>_<format>.json``, the log to stdout.
``table JSON...`` writes the markdown table (``results/decode_cuda.md``) from such records.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:7.1f} s] {msg}", flush=True)


def left(deadline: float) -> float:
    return deadline - (time.monotonic() - START)


def sh(cmd: list[str], timeout: float) -> int:
    """Run a command with its output in the log; returns the exit code (124 on timeout)."""
    log("$ " + " ".join(cmd))
    try:
        return subprocess.run(cmd, timeout=max(timeout, 1), check=False).returncode
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f} s")
        return 124


def card_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def bench_one(model: str, table: str | None, levels: list[float], fmt: str, out: Path,
              tokens: int, repeats: int, label: str, context: int | None = None) -> Path | None:
    import torch

    from sparsify.bench import run_bench

    path = out / f"decode_cuda_{card_tag(torch.cuda.get_device_name())}_{label}_{fmt}.json"
    t0 = time.monotonic()
    try:
        run_bench(model, "cuda", levels, table, fmt, tokens, repeats, None, str(path), True,
                  context)
    except Exception as e:  # noqa: BLE001 (keep going: later formats may still run)
        log(f"bench {label} {fmt} failed: {type(e).__name__}: {e}")
        return None
    finally:
        torch.cuda.empty_cache()
    log(f"bench {label} {fmt}: {time.monotonic() - t0:.0f} s -> {path.name}")
    return path


# Tests whose failure means the fused decode step cannot be trusted: the decode kernels' own
# tests and the engine's. The benchmark then measures the torch glue instead (and says so).
FUSED_TESTS = ("test_group_", "test_gated_", "test_add_rms_norm", "test_attention_decode")
# Tests of the deferred split-K reduction: a failure there turns only that off.
DEFER_TESTS = ("test_partial_", "test_deferred_", "test_attention_decode_partial_rows")


def fused_failures(junit: Path, prefixes: tuple[str, ...] = FUSED_TESTS,
                   engine: bool = True) -> list[str]:
    """Names of failed tests (from pytest's junit XML) whose names start with ``prefixes`` (by
    default those that bear on the fused decode step, the engine's tests included)."""
    import xml.etree.ElementTree as ET

    if not junit.exists():
        return ["(no test report)"]
    bad = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        name = case.get("name", "")
        if (engine and "test_engine_cuda" in case.get("classname", "")) or \
                name.startswith(prefixes):
            bad.append(f"{case.get('classname')}::{name}")
    return bad


def run(out: Path, deadline: float, tokens: int, repeats: int, profile_tokens: int,
        kernels: bool, table_path: Path | None, small: bool,
        formats: tuple[str, ...] = ("fp16", "int8", "bf16"), ab_variants: tuple[int, ...] = (),
        ab_formats: tuple[str, ...] = (), ab_envs: tuple[str, ...] = (),
        kernel_variants: str = "", tests: bool = True, contexts: tuple[int, ...] = (),
        contexts_only: bool = False) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/sparsify_bench"))
    work.mkdir(parents=True, exist_ok=True)
    big = work / "synthetic-llama3-8b.gguf"
    log(f"torch {torch.__version__} cuda {torch.version.cuda}; {os.cpu_count()} CPUs; "
        f"device {torch.cuda.get_device_name()}")
    gen = None
    if not big.exists():
        code = ("from sparsify.synthetic import preset, write_synthetic_gguf; "
                f"write_synthetic_gguf({str(big)!r}, preset('llama3-8b'))")
        log("writing the synthetic llama3-8b file in the background")
        gen = subprocess.Popen([sys.executable, "-c", code])
        gen_t0 = time.monotonic()

    from sparsify_kernels import cuda as kc

    t0 = time.monotonic()
    kc.load()
    log(f"kernels built/loaded in {time.monotonic() - t0:.1f} s")
    junit = out / "tests.xml"
    if tests:
        # The GPU suite takes 60-80 s on an H200; a suite cut short has no report, and every
        # record below would then fall back to the torch glue.
        rc = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                 f"--junitxml={junit}", "tests/test_kernels_cuda.py",
                 "tests/test_engine_cuda.py"], timeout=max(150, min(240, left(deadline) - 150)))
        log(f"kernel and engine tests exit code {rc}")
    else:
        log("tests skipped (--no-tests): the records below rest on a suite run elsewhere")
    bad_defer = fused_failures(junit, DEFER_TESTS, engine=False) if tests else []
    if bad_defer:
        os.environ["SPARSIFY_CUDA_DEFER"] = "0"
        log(f"deferred reductions NOT benchmarked (failed: {', '.join(bad_defer[:5])}); "
            "the records below reduce inside the GEMVs")
    bad = [b for b in fused_failures(junit) if b not in bad_defer] if tests else []
    if bad:
        os.environ["SPARSIFY_CUDA_FUSED"] = "0"
        log(f"fused decode step NOT benchmarked (failed: {', '.join(bad[:5])}); "
            "the records below use the torch glue")
    if kernels:
        rc = sh([sys.executable, "scripts/bench_kernels_cuda.py", "--out", str(out)]
                + (["--variants"] if left(deadline) > 400 else [])
                + (["--variant-list", kernel_variants] if kernel_variants else []),
                timeout=max(30, min(180, left(deadline) - 150)))
        log(f"kernel benchmark exit code {rc}")

    if small:
        # Small synthetic model: a smoke test of the whole bench path before the big one.
        from sparsify.synthetic import preset, write_synthetic_gguf

        sm = work / "synthetic-small.gguf"
        write_synthetic_gguf(sm, preset("tiny", n_layer=4, d_model=512, d_ff=1536, n_head=8,
                                        n_head_kv=2, vocab_size=4096, dtype="f16"), threads=4)
        sm_table = work / "synthetic-small.table.json"
        sh([sys.executable, "-m", "sparsify.cli", "profile", str(sm), "--tokens", "512",
            "--seq-len", "128", "-o", str(sm_table), "--force"], timeout=120)
        bench_one(str(sm), str(sm_table), [0.0, 0.5], "fp16", out, 64, 3, "synthetic-small")

    if gen is not None:
        rc = gen.wait(timeout=max(left(deadline) - 60, 1))
        log(f"synthetic llama3-8b written (rc {rc}) in {time.monotonic() - gen_t0:.0f} s, "
            f"{big.stat().st_size / 1e9:.1f} GB")
    if table_path is not None:
        # A table `sparsify profile` wrote for this same file earlier (profiling is
        # deterministic: the same file, text and seed give a byte-identical table); the
        # bench's table check still refuses it unless it fits the file's fingerprint.
        table, rc = table_path, 0
        log(f"thresholds from {table_path}")
    else:
        table = work / "synthetic-llama3-8b.table.json"
        # Profiling is CPU torch; keep >= ~200 s for benchmarking after it.
        ptok = profile_tokens if left(deadline) > 420 else profile_tokens // 2
        t0 = time.monotonic()
        rc = sh([sys.executable, "-m", "sparsify.cli", "profile", str(big), "--tokens",
                 str(ptok), "--seq-len", "256", "-o", str(table), "--force"],
                timeout=left(deadline) - 180)
        log(f"profile ({ptok} tokens) exit {rc} in {time.monotonic() - t0:.0f} s")
        if rc != 0:
            log("no table: dense only")
        else:
            shutil.copy(table, out / table.name)
    levels = [0.0, 0.4, 0.5] if rc == 0 else [0.0]
    tab = str(table) if rc == 0 else None
    for fmt in formats:
        if left(deadline) < 55:
            log(f"skipping {fmt}: {left(deadline):.0f} s left")
            continue
        bench_one(str(big), tab, levels, fmt, out, tokens, repeats, "synthetic-llama3-8b")
    # A/B inside the whole step, in this process and on this card: the same decode with every
    # default GEMV launch switched to another launch variant (SPARSIFY_GEMV_VARIANT,
    # sparse_gemv.h), or with one engine setting of the environment changed (e.g.
    # SPARSIFY_CUDA_FOLD_NORMS=0), one setting at a time. The record says what it ran.
    runs = [{"SPARSIFY_GEMV_VARIANT": str(v)} for v in ab_variants if v]
    for setting in ab_envs:
        name, _, value = setting.partition("=")
        runs.append({name: value})
    # Then the A/B formats after a long prompt (--contexts): the default step first, then each
    # setting, so that attention over many cached keys is compared in the same process.
    plan = [] if contexts_only else [(settings, None) for settings in runs]
    for ctx in contexts:
        plan += [({}, ctx)] + [(settings, ctx) for settings in runs]
    for settings, ctx in plan:
        os.environ.update(settings)
        tag = "_".join(re.sub(r"[^A-Za-z0-9]+", "", f"{k.split('_')[-1]}{v}").lower()
                       for k, v in settings.items())
        label = "_".join(x for x in ("synthetic-llama3-8b", f"ctx{ctx}" if ctx else "", tag) if x)
        for fmt in ab_formats:
            # a prefill per level: 89-102 s measured after 4096 tokens on an H200
            if left(deadline) < 50 + (ctx or 0) / 55:
                log(f"skipping A/B {settings} context {ctx} {fmt}: {left(deadline):.0f} s left")
                continue
            path = bench_one(str(big), tab, levels, fmt, out, tokens, repeats, label, ctx)
            if path is not None and settings:
                rec = json.loads(path.read_text())
                rec["environment"] = settings
                if "SPARSIFY_GEMV_VARIANT" in settings:
                    rec["gemv_variant"] = int(settings["SPARSIFY_GEMV_VARIANT"])
                path.write_text(json.dumps(rec, indent=1))
        for k in settings:
            del os.environ[k]
    log("done")


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------


def record_version(path: Path) -> str:
    """The version a record file's name carries: '_vN' before '.json' (older code), else
    'latest'."""
    m = re.search(r"_v(\d+)$", path.stem)
    return f"v{m.group(1)}" if m else "latest"


def markdown(items: list[tuple[Path, dict]]) -> str:
    """One table of every level of every record, each row labelled with its model, card and the
    code version of its file name."""
    records = [r for _, r in items]
    lines = ["# GPU decode (batch 1, CUDA graph per token)", "",
             ("Written by `scripts/bench_decode_cuda.py table` from the JSON records beside it. "
             "Models marked *synthetic* have random weights at real shapes: their speeds are "
             "real, their text is not. `% bound` is tokens/s over the bandwidth bound "
             "(device-to-device copy bandwidth measured in the same run / weight bytes read "
             "per token); `ideal` is dense bytes / bytes read at that level (the output head "
             "stays dense); `glue` is the time of one step with every GEMV left out "
             "(`CUDAEngine.glue_ms`; records before it was measured show –); `step` is the "
             "fused decode step or the torch glue between the GEMVs (records before the fused "
             "step existed show torch glue; *norms in GEMVs*: the RMS norms computed inside "
             "the q/k/v and gate/up GEMVs and the residual adds inside attn_output and "
             "ffn_down, five launches per block instead of seven; *deferred q/k/v+gate/up*: "
             "those launches leave their split-K partial sums unreduced, added by the "
             "attention kernel and ffn_down; *prefetched*: the attention kernel's L2 "
             "prefetch of the attn_output rows that GEMV keeps, or of the cache rows it "
             "reads; *preloaded*: the cache rows copied into its shared memory before its "
             "wait; *diagnostic: no wait N*: SPARSIFY_DIAG_NO_WAIT=N, the launches of bits "
             "1 ffn_down, 2 attn_output, 4 attention skip the wait for the kernel before, "
             "a timing bound only; *attention split-KV*: past 256 visible keys per range, each "
             "head's keys spread over several blocks, combined by the last (records before "
             "it, and any with SPARSIFY_CUDA_ATTN_SPLITS=1, run one block per head); "
             "*after N tokens of context*: decode after an N-token prompt of built-in text "
             "(`sparsify bench --context N`), the other records after a one-line prompt; "
             "*GEMV grids of N blocks per SM*: SPARSIFY_GEMV_BLOCKS_PER_SM=N "
             "instead of the occupancy, four; *attention for any head size*: "
             "SPARSIFY_ATTN_GENERIC=1, the attention kernel that reads the head dimensions at "
             "run time instead of the one compiled for them, the only one before run H16; "
             "*f16 KV cache*: keys and values stored in float16 (`kv_cache=\"f16\"`), the "
             "others in float32); "
             "`code` is the version in the record's file "
             "name (`_vN`: an earlier record of that card; latest: that card's most recent "
             "record; kernels/cuda/NOTES.md names the code of each run)."), ""]
    seen = set()
    for r in records:
        v = r["versions"]
        key = (r["device"], v.get("driver"), v.get("torch"))
        if key not in seen:
            seen.add(key)
            lines.append(f"- Device: {r['device']} (compute capability "
                         f"{r.get('compute_capability')}), driver {v.get('driver')}, "
                         f"CUDA {v.get('cuda')}, torch {v.get('torch')}, sparsify "
                         f"{v.get('sparsify')}")
    lines += ["", ("| device | code | model | step | format | sparsity | tok/s (median ± IQR) "
              "| speedup | ideal | MB/token | GB/s | % bound | copy GB/s | glue ms/step |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, r in items:
        model = r["model"] + (" (synthetic)" if r.get("synthetic") else "")
        if r.get("gemv_variant"):
            model += f" [GEMV variant {r['gemv_variant']}]"
        glue = r.get("glue_ms_per_step")
        glue = f"{glue:.2f}" if glue is not None else "–"
        step = "fused" if r.get("fused") else "torch glue"
        if r.get("fold_norms"):
            step += ", norms in GEMVs"
        deferred = [k for k, on in (r.get("deferred_reduction") or {}).items() if on]
        if deferred:
            step += ", deferred " + "+".join({"qkv": "q/k/v", "ffn": "gate/up"}[k]
                                             for k in deferred)
        if r.get("prefetch_attn_output"):
            step += ", attn_output rows prefetched"
        if r.get("prefetch_cache"):
            step += ", cache rows prefetched"
        if r.get("preload_cache"):
            step += ", cache rows preloaded"
        env = r.get("environment") or {}
        cap = env.get("SPARSIFY_GEMV_BLOCKS_PER_SM")
        if cap:
            step += f", GEMV grids of {cap} blocks per SM"
        if env.get("SPARSIFY_ATTN_GENERIC", "0") not in ("", "0"):
            step += ", attention for any head size"
        if (r.get("attn_splits") or 1) > 1:
            if r.get("attn_group") and "attn_group_from" not in r:  # H21: grouped from 512 keys
                step += (f", attention split-KV (up to {r['attn_splits']} blocks per key/value "
                         "head, query heads grouped)")
            else:
                step += f", attention split-KV (up to {r['attn_splits']} blocks per head"
                if r.get("attn_group"):
                    step += (f"; from {r['attn_group_from']} keys {r['attn_group_splits']} per "
                             "key/value head, query heads grouped")
                step += ")"
        if r.get("kv_cache", "f32") != "f32":
            step += f", {r['kv_cache']} KV cache"
        if r.get("prompt") is None and r.get("context"):
            model += f", after {r['context']} tokens of context"
        bits = env.get("SPARSIFY_DIAG_NO_WAIT")
        if bits:
            step += f", **diagnostic: no wait {bits}, wrong results**"
        for lv in r["levels"]:
            sp = f"{lv['speedup']:.2f}x" if lv.get("speedup") else "–"
            lines.append(
                f"| {r['device']} | {record_version(path)} | {model} | {step} | {r['format']} | "
                f"{lv['sparsity']:.2f} | "
                f"{lv['tok_s']['median']:.1f} ± {lv['tok_s']['iqr']:.1f} | {sp} | "
                f"{lv['ideal_speedup']:.2f}x | {lv['bytes_per_token'] / 1e6:.1f} | "
                f"{lv['gb_s']:.0f} | {lv['pct_of_bound']:.0f}% | "
                f"{r['copy_bandwidth_GBps']:.0f} | {glue} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="tests + benchmarks on this machine's GPU")
    r.add_argument("out", type=Path)
    r.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    r.add_argument("--tokens", type=int, default=128)
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--profile-tokens", type=int, default=1024)
    r.add_argument("--kernels", action="store_true", help="also run the kernel benchmark")
    r.add_argument("--table", type=Path, default=None,
                   help="threshold table profiled earlier on the same synthetic file")
    r.add_argument("--no-small", action="store_true", help="skip the small smoke-test model")
    r.add_argument("--no-tests", action="store_true",
                   help="skip the GPU test suite (when another run in the same call ran it)")
    r.add_argument("--formats", default="fp16,int8,bf16",
                   help="comma-separated weight formats to benchmark, in order")
    r.add_argument("--ab-variant", type=int, action="append", default=[],
                   help="then benchmark --ab-formats again with this GEMV launch variant "
                        "(repeatable: one run per variant)")
    r.add_argument("--ab-formats", default="fp16")
    r.add_argument("--ab-env", action="append", default=[], metavar="NAME=VALUE",
                   help="then benchmark --ab-formats again with this environment setting "
                        "(repeatable: one run per setting)")
    r.add_argument("--contexts", default="",
                   help="comma-separated prompt lengths: the --ab-formats again after a prompt "
                        "of that many tokens, default step and each A/B setting")
    r.add_argument("--contexts-only", action="store_true",
                   help="run the A/B settings after the --contexts prompts only, not after the "
                        "short one")
    r.add_argument("--kernel-variants", default="",
                   help="with --kernels: time only these launch variants besides the default "
                        "(comma-separated numbers)")
    t = sub.add_parser("table", help="markdown table from JSON records")
    t.add_argument("records", nargs="+", type=Path)
    t.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.out, a.deadline, a.tokens, a.repeats, a.profile_tokens, a.kernels, a.table,
            not a.no_small, tuple(f for f in a.formats.split(",") if f), tuple(a.ab_variant),
            tuple(f for f in a.ab_formats.split(",") if f), tuple(a.ab_env), a.kernel_variants,
            not a.no_tests, tuple(int(c) for c in a.contexts.split(",") if c), a.contexts_only)
    else:
        items = [(p, json.loads(p.read_text())) for p in sorted(a.records)]
        a.output.write_text(markdown(items))


if __name__ == "__main__":
    main()
