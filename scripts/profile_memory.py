"""Show that profiling memory does not grow with depth: a 4-block vs a 32-block synthetic model.

Both files have the same width (llama architecture, F16, random weights; see
sparsify/synthetic.py). Each is profiled by ``sparsify profile`` in a fresh subprocess, which
reports its own peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which
counts the memory-mapped model pages it touched too). The block-by-block pass holds one
block's weights and the hidden states of all sequences, so the two peaks should be close
(the issue's bound: within 20%), while the files differ eightfold.

    python scripts/profile_memory.py            # writes results/profile_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the subprocess: profile, then print peak RSS (KiB on Linux) as JSON on stdout.
CHILD = r"""
import json, resource, sys, time
import torch, sparsify.profile  # import first, so import_rss covers the libraries
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from sparsify.cli import main
t0 = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
dt = time.perf_counter() - t0
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "import_rss_kib": import_rss, "profile_s": dt,
                  "torch_threads": torch.get_num_threads()}))
"""


def machine() -> dict:
    """Where the numbers were measured (as the machine reports it), plus memory and load."""
    from sparsify.evaluate import machine_record

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {**machine_record(), "memory_bytes": mem,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs=2, default=(4, 32))
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-head-kv", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "profile_memory.json")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the synthetic files go [a temporary directory]")
    a = ap.parse_args(argv)

    from sparsify.synthetic import preset, write_synthetic_gguf
    from sparsify.table import write_atomic

    runs = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        for n_layer in a.blocks:
            spec = preset("tiny", n_layer=n_layer, d_model=a.d_model, d_ff=a.d_ff,
                          n_head=a.n_head, n_head_kv=a.n_head_kv, vocab_size=a.vocab_size,
                          dtype="f16", context_length=max(2048, a.seq_len))
            path = Path(tmp) / f"synthetic-{n_layer}.gguf"
            t0 = time.perf_counter()
            write_synthetic_gguf(path, spec)
            gen_s = time.perf_counter() - t0
            table = Path(tmp) / f"synthetic-{n_layer}.json"
            cmd = [sys.executable, "-c", CHILD, "profile", str(path), "-o", str(table),
                   "--tokens", str(a.tokens), "--seq-len", str(a.seq_len)]
            print(f"profiling {path.name} ({path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
            wall = time.perf_counter() - t0
            child = json.loads(r.stdout.strip().splitlines()[-1])
            block_params = sum(
                math.prod(s) for n, s in spec.tensor_shapes()
                if n.startswith("blk.0."))
            runs.append({
                "n_layer": n_layer, "file_bytes": path.stat().st_size,
                "params": spec.n_params(), "generate_s": round(gen_s, 2),
                "block_weights_f32_bytes": block_params * 4,
                "hidden_states_bytes": a.tokens * a.d_model * 4,
                "peak_rss_bytes": child["peak_rss_kib"] * 1024,
                "import_rss_bytes": child["import_rss_kib"] * 1024,
                "profile_s": round(child["profile_s"], 2), "process_wall_s": round(wall, 2),
                "torch_threads": child["torch_threads"],
            })
            print(f"  peak RSS {child['peak_rss_kib'] / 1024:.0f} MiB", file=sys.stderr)
    small, big = runs
    ratio = big["peak_rss_bytes"] / small["peak_rss_bytes"]
    record = {
        "what": "peak RSS of `sparsify profile` on synthetic llama models of equal width and "
                "different depth (weights synthetic, F16)",
        "machine": machine(),
        "config": {"d_model": a.d_model, "d_ff": a.d_ff, "n_head": a.n_head,
                   "n_head_kv": a.n_head_kv, "vocab_size": a.vocab_size, "tokens": a.tokens,
                   "seq_len": a.seq_len, "dtype": "F16", "synthetic": True},
        "runs": runs,
        "peak_ratio": round(ratio, 4),
        "file_ratio": round(big["file_bytes"] / small["file_bytes"], 2),
        "bound": 1.2,
        "within_bound": bool(max(ratio, 1 / ratio) < 1.2),
    }
    write_atomic(a.out, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(),
                 force=True)
    print(f"peak RSS {small['n_layer']} blocks {small['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"{big['n_layer']} blocks {big['peak_rss_bytes'] / 2**20:.0f} MiB: ratio {ratio:.3f} "
          f"(files {record['file_ratio']}x); wrote {a.out}", file=sys.stderr)
    return 0 if record["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
