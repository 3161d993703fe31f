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


def gguf_rows(H, work: Path) -> list[dict]:
    from sparsify.bundled import BUNDLED, cache_dir

    real = cache_dir() / "models" / BUNDLED["smollm2-135m"].file
    bases = H.make_bases(work / "bases", real)
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
    return rows


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
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--hypothesis-show-statistics", *TESTS], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    outcome = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    examples = {}
    # Statistics blocks: "tests/x.py::test_name:" then "- during generate phase ...:
    # N passing examples, M failing examples, ...".
    stats = re.findall(r"^(tests/\S+::\S+):\n((?:  .*\n?)+)", r.stdout, re.MULTILINE)
    for name, block in stats:
        m = re.search(r"generate phase.*?: (\d+) passing examples", block)
        if m:
            examples[name] = int(m.group(1))
    return {"returncode": r.returncode, "summary": tail, "outcomes": outcome,
            "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
                           1),
            "hypothesis_passing_examples": examples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytest", action="store_true", help="also run the hostile test suite")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()

    import sparsify

    H = _hostile()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        g = gguf_rows(H, Path(tmp))
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
