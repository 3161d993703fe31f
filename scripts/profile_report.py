"""Profile the bundled models with the default settings and record what it cost and how exact
the thresholds are: results/profile.json, results/profile.md, results/profile_<model>.png.

For each model and criterion this runs ``sparsify profile MODEL -o thresholds/...`` as the
user would, in a subprocess under ``/usr/bin/time -v`` (wall time, CPU time, peak RSS), then
re-runs the same calibration sequences through the model and counts, exactly, the fraction of
each tensor's input entries that each level's threshold zeroes:

- ``dense``: every projection sees the input of the dense model, the input the thresholds were
  fitted to. This is the quantile property; it should hold within half a point.
- ``masked``: every projection masked at the same level (MaskingProjector(count=True)), so
  later inputs shift with earlier masking; reported at a few levels, to show the drift.

Also records the token counts of both parts of the built-in corpus for both models.

    python scripts/profile_report.py                      # magnitude tables, both models
    python scripts/profile_report.py --criteria magnitude weight-aware
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "gemma3-270m")
# The end-to-end budgets on this 2-core machine, seconds.
BUDGET_S = {"smollm2-135m": 180, "gemma3-270m": 240}
TIME_FIELDS = {
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall_s",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Maximum resident set size (kbytes)": "peak_rss_kib",
    "Percent of CPU this job got": "cpu_percent",
}


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def wait_for_quiet(limit_s: float, below: float = 1.0) -> float:
    """Wait (up to ``limit_s``) until the 1-minute load average drops below ``below``: other
    jobs on a shared machine inflate timings. Returns the seconds waited."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - t0 < limit_s:
        time.sleep(15)
    return time.monotonic() - t0


def timed_profile(model: str, out: Path, criterion: str) -> dict:
    """Run ``sparsify profile`` under /usr/bin/time -v; its measurements as a dict."""
    cmd = [sys.executable, "-m", "sparsify.cli", "profile", model, "-o", str(out),
           "--criterion", criterion, "--force"]
    timer = shutil.which("time") or "/usr/bin/time"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run([timer, "-v", *cmd], stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"profile of {model} failed ({r.returncode})")
    got: dict = {"command": " ".join(["sparsify", *cmd[3:]]), "measured_wall_s": round(wall, 2),
                 "load_average_before": [round(x, 2) for x in load_before],
                 "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    for line in r.stderr.splitlines():
        key, _, val = line.strip().partition(": ")
        if key in TIME_FIELDS:
            name = TIME_FIELDS[key]
            if name == "wall_s":
                got[name] = round(_seconds(val), 2)
            elif name == "cpu_percent":
                got[name] = int(val.rstrip("%"))
            elif name == "peak_rss_kib":
                got["peak_rss_bytes"] = int(val) * 1024
            else:
                got[name] = float(val)
    return got


def exactness(model_name: str, table_path: Path, masked_levels: list[float]) -> dict:
    """Realized vs requested sparsity on the table's own calibration sequences."""
    from sparsify import corpus
    from sparsify.loader import load
    from sparsify.profile import realized_by_level, realized_sparsity
    from sparsify.table import ThresholdTable

    table = ThresholdTable.load(table_path)
    loaded = load(model_name)
    table.check(loaded)
    pv = table.provenance
    if not pv["corpus"].startswith("builtin:"):
        raise SystemExit("exactness is measured on the built-in corpus only")
    seqs = corpus.sequences(loaded.tokenizer, corpus.calibration_text(), pv["seq_len"],
                            pv["tokens"] // pv["seq_len"], seed=pv["seed"])
    model = loaded.model()
    t0 = time.perf_counter()
    dense = realized_by_level(model, seqs, table)
    dense_s = time.perf_counter() - t0
    levels = np.asarray(table.levels)
    err = {n: r - levels for n, r in dense.items()}
    # Level 0 has threshold 0, which "zeroes" the inputs that are exactly zero already (e.g.
    # channels whose norm weight is 0); that is reported on its own, not as an error.
    worst_name = max(err, key=lambda n: np.abs(err[n][1:]).max())
    j = 1 + int(np.abs(err[worst_name][1:]).argmax())
    per_level = np.max([np.abs(e) for e in err.values()], axis=0)
    zeros_name = max(dense, key=lambda n: dense[n][0])
    out = {
        "tokens": int(seqs.size),
        "dense": {
            "levels": table.levels,
            "worst_abs_error_points": round(float(np.abs(err[worst_name][j])) * 100, 4),
            "worst_at": {"tensor": worst_name, "level": table.levels[j],
                         "realized": round(float(dense[worst_name][j]), 6)},
            "worst_abs_error_points_per_level": [round(float(x) * 100, 4) for x in per_level],
            "tensors_over_half_point": int(sum((np.abs(e)[1:] > 0.005).any()
                                               for e in err.values())),
            "exact_zeros_at_level_0": {"tensor": zeros_name,
                                       "fraction": round(float(dense[zeros_name][0]), 6)},
            "seconds": round(dense_s, 1),
        },
        "masked": [],
    }
    weight_aware = table.criterion == "weight-aware"
    for level in masked_levels:
        got = realized_sparsity(model, seqs, table.thresholds_at(level), weight_aware)
        d = {n: v - level for n, v in got.items()}
        worst = max(d, key=lambda n: abs(d[n]))
        by_proj: dict[str, list[float]] = {}
        for n, v in d.items():
            by_proj.setdefault(n.split(".")[2], []).append(v)
        out["masked"].append({
            "level": level,
            "mean_error_points": round(float(np.mean(list(d.values()))) * 100, 3),
            "worst_error_points": round(d[worst] * 100, 3), "worst_tensor": worst,
            "mean_error_points_by_projection": {p: round(float(np.mean(v)) * 100, 3)
                                                for p, v in sorted(by_proj.items())},
        })
    return out


def corpus_counts() -> dict:
    from sparsify import corpus
    from sparsify.loader import load

    out = {"calibration": {"identity": corpus.calibration().identity,
                           "sha256": corpus.calibration().sha256,
                           "characters": len(corpus.calibration_text())},
           "heldout": {"identity": corpus.heldout().identity, "sha256": corpus.heldout().sha256,
                       "characters": len(corpus.heldout_text())},
           "documents": len(corpus.documents()), "tokens": {}}
    for name in MODELS:
        tok = load(name).tokenizer
        out["tokens"][name] = {
            "calibration": len(tok.encode(corpus.calibration_text(), add_bos=False)),
            "heldout": len(tok.encode(corpus.heldout_text(), add_bos=False)),
        }
    return out


def markdown(rec: dict) -> str:
    m = rec["machine"]
    head = (f"Machine: {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']} "
            f"({m['torch_threads']} threads), Python {m['python']}. Written by "
            f"`scripts/profile_report.py`.")
    cols = ("model", "criterion", "tokens", "wall s", "budget s", "CPU s (user+sys)", "CPU %",
            "load avg before", "peak RSS MiB", "table KiB", "worst dense error (pts)",
            "masked 0.5: mean / worst (pts)", "same table as thresholds/")
    lines = ["# Profiling: cost and exactness", "", head, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rec["runs"]:
        t, ex = r["time"], r["exactness"]
        mk = next((x for x in ex["masked"] if x["level"] == 0.5), None)
        mtxt = (f"{mk['mean_error_points']:+.2f} / {mk['worst_error_points']:+.2f}" if mk
                else "-")
        cells = (r["model"], r["criterion"], ex["tokens"], f"{t['wall_s']:.0f}", r["budget_s"],
                 f"{t['user_s'] + t['system_s']:.0f}", t["cpu_percent"],
                 f"{t['load_average_before'][0]:.1f}", f"{t['peak_rss_bytes'] / 2**20:.0f}",
                 f"{r['table_bytes'] / 1024:.0f}",
                 f"{ex['dense']['worst_abs_error_points']:.3f}", mtxt,
                 {True: "yes", False: "NO", None: "-"}[r.get("same_as_committed_table")])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    c = rec["corpus"]
    note = ("*Dense error*: |realized - requested| sparsity over every tensor and every level "
            "from 0.01 to 0.99 (level 0 has threshold 0, which only meets inputs that are "
            "exactly zero already), counted exactly on the calibration sequences with each "
            "tensor fed the dense model's input. *Masked*: realized minus requested when every "
            "projection is masked at 0.5 at once; later inputs drift, which allocation has to "
            "account for.")
    corpus_line = (f"Built-in corpus ({c['documents']} documents; calibration sha256 "
                   f"{c['calibration']['sha256'][:12]}…, held-out "
                   f"{c['heldout']['sha256'][:12]}…):")
    lines += ["", note, "", corpus_line, "", "| model | calibration tokens | held-out tokens |",
              "|---|---|---|"]
    for name, n in c["tokens"].items():
        lines.append(f"| {name} | {n['calibration']} | {n['heldout']} |")
    mem = rec.get("memory")
    if mem:
        peaks = ", ".join(f"{x['n_layer']} blocks {x['peak_rss_bytes'] / 2**20:.0f} MiB"
                          for x in mem["runs"])
        memo = (f"Memory (results/profile_memory.json, synthetic F16 models of width "
                f"{mem['config']['d_model']}): peak RSS {peaks}; ratio {mem['peak_ratio']:.3f} "
                f"while the files are {mem['file_ratio']}x apart.")
        lines += ["", memo]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--criteria", nargs="+", default=["magnitude"],
                    choices=["magnitude", "weight-aware"])
    ap.add_argument("--masked-levels", type=float, nargs="*", default=[0.5])
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="before each timed run, wait up to this many seconds for the load "
                         "average to drop below 1")
    ap.add_argument("--tables", type=Path, default=None,
                    help="where the new tables go [a temporary directory; each is compared "
                         "with the one in thresholds/, whose allocations it must not replace]")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs already in results/profile.json for models and "
                         "criteria not run now")
    a = ap.parse_args(argv)

    from sparsify.evaluate import machine_record
    from sparsify.table import ThresholdTable, plot, write_atomic

    tmp = None
    if a.tables is None:
        tmp = tempfile.TemporaryDirectory(prefix="profile-report-")
        a.tables = Path(tmp.name)
    rec: dict = {"machine": {**machine_record(), "load_average": list(os.getloadavg())},
                 "corpus": corpus_counts(), "runs": []}
    old_path = a.results / "profile.json"
    kept = []
    if a.merge and old_path.exists():
        now = {(m, c) for m in a.models for c in a.criteria}
        kept = [r for r in json.loads(old_path.read_text())["runs"]
                if (r["model"], r["criterion"]) not in now]
    for name in a.models:
        for criterion in a.criteria:
            out = a.tables / f"{name}.{criterion}.json"
            waited = wait_for_quiet(a.quiet_wait) if a.quiet_wait else 0.0
            print(f"profiling {name} ({criterion}) -> {out}", file=sys.stderr)
            t = timed_profile(name, out, criterion)
            t["waited_for_quiet_s"] = round(waited)
            print(f"  {t['wall_s']:.0f} s wall, peak RSS {t['peak_rss_bytes'] / 2**20:.0f} MiB;"
                  f" checking exactness", file=sys.stderr)
            ex = exactness(name, out, a.masked_levels)
            table = ThresholdTable.load(out)
            png = a.results / f"profile_{name}.{criterion}.png"
            write_atomic(png, plot(table, 0.5), force=True)
            committed = ROOT / "thresholds" / out.name
            same = None
            if committed.exists() and committed.resolve() != out.resolve():
                old = ThresholdTable.load(committed).to_dict()
                new = table.to_dict()
                old.pop("allocations")
                new.pop("allocations")
                same = old == new
            rec["runs"].append({
                "model": name, "criterion": criterion,
                "table": f"thresholds/{out.name}", "same_as_committed_table": same,
                "table_bytes": out.stat().st_size,
                "table_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                "budget_s": BUDGET_S[name], "time": t, "exactness": ex,
                "synthetic": False,
            })
            write_records({**rec, "runs": _ordered(kept + rec["runs"])}, a.results)
    rec["runs"] = _ordered(kept + rec["runs"])
    print(markdown(rec), file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _ordered(runs: list[dict]) -> list[dict]:
    crit = ("magnitude", "weight-aware")
    return sorted(runs, key=lambda r: (MODELS.index(r["model"]), crit.index(r["criterion"])))


def write_records(rec: dict, results: Path) -> None:
    from sparsify.table import write_atomic

    mem = results / "profile_memory.json"
    rec["memory"] = json.loads(mem.read_text()) if mem.exists() else None
    write_atomic(results / "profile.json",
                 (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode(), force=True)
    write_atomic(results / "profile.md", markdown(rec).encode(), force=True)


if __name__ == "__main__":
    sys.exit(main())
