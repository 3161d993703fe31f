"""Write results/hostile_corpus.json: every hostile GGUF and table case, what sparsify did with
it, counts per group and stage, and (with --pytest) the hostile test suite's runtime and
hypothesis example counts.

The corpus is ``tests/hostile.py``; each case is made in a temporary directory and observed
the way the tests observe it (``hostile.observe`` / ``observe_table``). A case whose observed
stage or message differs from the one it expects is recorded as a mismatch and makes the
script exit 1.

    python scripts/hostile_report.py            # corpus only (seconds)
    python scripts/hostile_report.py --pytest   # also run the hostile tests (about 2 minutes)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "hostile_corpus.json"
TESTS = ["tests/test_hostile_gguf.py", "tests/test_hostile_table.py",
         "tests/test_hostile_cli.py", "tests/test_hostile_properties.py"]


def _hostile():
    """tests/hostile.py as a module (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("hostile", ROOT / "tests" / "hostile.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hostile"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _counts(rows: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r[key]] = out.get(r[key], 0) + 1
    return out


def gguf_rows(H, work: Path) -> tuple[list[dict], dict]:
    """One row per GGUF case, and the peak-memory probe of ``info`` over the bombs."""
    from sparsify.bundled import BUNDLED, cache_dir

    real = cache_dir() / "models" / BUNDLED["smollm2-135m"].file
    bases = H.make_bases(work / "bases", real)
    bombs = []
    for c in H.gguf_cases():
        if c.bomb and (c.base != "real" or bases.real is not None):
            bombs.append(c.write(bases, work / f"bomb-{c.id}.gguf"))
    amp = H.write_amplifier(bases, work / "strings.gguf", 1_000_000)
    res = H.peak_memory_of_info(work / "bases" / "base-mini.gguf", [*bombs, amp])
    mib = 1 << 20
    memory = {
        "address_space_limit_bytes": 3 << 29,
        "peak_rss_after_warmup_mib": round(res["base"] / mib, 1),
        "bombs": [{"file": Path(p).name.removeprefix("bomb-"), "file_bytes": Path(p).stat()
                   .st_blocks * 512, "exit": code, "peak_growth_mib": round((m - res["base"])
                                                                           / mib, 1)}
                  for p, code, m in res["runs"][:-1]],
        "strings_10mb": {"file_bytes": amp.stat().st_size, "exit": res["runs"][-1][1],
                         "peak_growth_mib": round((res["runs"][-1][2] - res["base"]) / mib,
                                                  1)},
    }
    rows = []
    for c in H.gguf_cases():
        row = {"id": c.id, "group": c.group, "base": c.base, "bomb": c.bomb,
               "expected_stage": c.stage, "expected_match": c.match}
        if c.base == "real" and bases.real is None:
            rows.append(row | {"skipped": "bundled SmolLM2-135M not in the cache"})
            continue
        path = c.write(bases, work / f"{c.id}.gguf")
        stage, msg = H.observe(path, forward=c.base != "real")
        msg = msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg
        ok = stage == c.stage and (bool(re.search(c.match, msg)) if c.match else msg == "")
        rows.append(row | {"file_bytes": path.stat().st_blocks * 512 if c.base == "real"
                           else path.stat().st_size,
                           "stage": stage, "message": msg, "as_expected": ok})
        path.unlink()
    return rows, memory


def table_rows(H, work: Path) -> list[dict]:
    tb, loaded = H.make_table_bases(work / "tables", np.random.default_rng(0))
    rows = []
    for c in H.table_cases():
        path = work / f"{c.id}.json"
        path.write_bytes(c.make(tb.text, tb.parsed, tb.others))
        stage, msg = H.observe_table(path, loaded)
        msg = msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg
        ok = stage == c.stage and (bool(re.search(c.match, msg)) if c.match else msg == "")
        rows.append({"id": c.id, "group": c.group, "expected_stage": c.stage,
                     "expected_match": c.match, "file_bytes": path.stat().st_size,
                     "stage": stage, "message": msg, "as_expected": ok})
        path.unlink()
    return rows


def run_pytest() -> dict:
    """Run the hostile tests in a subprocess; wall and CPU time, outcome counts, and the
    passing-example count of every hypothesis test."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # -rP shows passing tests' output: the property tests print how many examples ran.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rP", "-p", "no:cacheprovider",
                        *TESTS], cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    outcome = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    # "___ test_name ___" headers, then the captured "hypothesis examples: N".
    found = re.findall(r"_{3,} (test_\w+) _{3,}\n(?:.*\n)*?hypothesis examples: (\d+)",
                       r.stdout)
    examples = {name: int(n) for name, n in found}
    stops = {name: json.loads(v) for name, v in re.findall(
        r"_{3,} (test_\w+) _{3,}\n(?:.*\n)*?hypothesis stops: (\{.*\})", r.stdout)}
    return {"returncode": r.returncode, "summary": tail, "outcomes": outcome,
            "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
                           1),
            "hypothesis_examples": examples,
            "hypothesis_gguf_stops": stops}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytest", action="store_true", help="also run the hostile test suite")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()

    import sparsify

    H = _hostile()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        g, memory = gguf_rows(H, Path(tmp))
        t = table_rows(H, Path(tmp))
    corpus_s = time.perf_counter() - t0
    record = {
        "kind": "sparsify.hostile_corpus",
        "schema_version": 1,
        "sparsify_version": sparsify.__version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
        "corpus_seconds": round(corpus_s, 1),
        "gguf": {"cases": len(g), "by_group": _counts(g, "group"),
                 "by_stage": _counts([r for r in g if "stage" in r], "stage"),
                 "bombs": sum(r["bomb"] for r in g),
                 "mismatches": [r["id"] for r in g if r.get("as_expected") is False],
                 "list": g},
        "memory": memory,
        "table": {"cases": len(t), "by_group": _counts(t, "group"),
                  "by_stage": _counts(t, "stage"),
                  "mismatches": [r["id"] for r in t if not r["as_expected"]],
                  "list": t},
    }
    if args.pytest:
        record["tests"] = run_pytest()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    bad = record["gguf"]["mismatches"] + record["table"]["mismatches"]
    print(f"wrote {args.output}: {len(g)} GGUF cases, {len(t)} table cases, "
          f"{len(bad)} mismatches", file=sys.stderr)
    if args.pytest:
        print(f"tests: {record['tests']['summary']} ({record['tests']['wall_s']} s wall, "
              f"{record['tests']['cpu_s']} s CPU)", file=sys.stderr)
    ok = not bad and (not args.pytest or record["tests"]["returncode"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
