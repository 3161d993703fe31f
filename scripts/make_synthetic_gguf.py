"""Write a synthetic llama GGUF file: random weights at real shapes (see sparsify/synthetic.py).

    python scripts/make_synthetic_gguf.py out.gguf --preset llama3-8b        # ~16 GB, F16
    python scripts/make_synthetic_gguf.py out.gguf --preset tiny --n-layer 4 --dtype f16

Any field of the preset can be overridden. Progress (bytes written) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparsify.synthetic import PRESETS, preset, write_synthetic_gguf

OVERRIDES = ("n_layer", "d_model", "d_ff", "n_head", "n_head_kv", "vocab_size",
             "context_length", "seed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for field in OVERRIDES:
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=None)
    ap.add_argument("--dtype", choices=("f16", "f32"), default=None)
    ap.add_argument("--tied-output", action="store_true", default=None,
                    help="no output.weight: the head reuses token_embd")
    ap.add_argument("--threads", type=int, default=None, help="generator threads [all CPUs]")
    ap.add_argument("--force", action="store_true", help="replace an existing file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    changes = {f: getattr(a, f) for f in (*OVERRIDES, "dtype", "tied_output")
               if getattr(a, f) is not None}
    try:
        spec = preset(a.preset, **changes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.output.exists() and not a.force:
        print(f"error: {a.output}: exists; pass --force to replace it", file=sys.stderr)
        return 1
    if not a.output.parent.is_dir():
        print(f"error: {a.output}: directory {a.output.parent} does not exist", file=sys.stderr)
        return 1

    from tqdm import tqdm

    total = spec.data_bytes()
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, disable=a.quiet,
              desc=a.output.name) as bar:
        write_synthetic_gguf(a.output, spec, threads=a.threads, progress=bar.update)
    dt = time.perf_counter() - t0
    size = a.output.stat().st_size
    print(f"wrote {a.output}: {spec.n_params() / 1e6:.1f} M parameters, {size / 1e9:.2f} GB in "
          f"{dt:.1f} s ({size / 1e6 / dt:.0f} MB/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
