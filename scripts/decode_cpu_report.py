"""Table of the CPU decode records: results/decode_cpu_*.json -> results/decode_cpu.md.

The records come from ``sparsify bench MODEL --device cpu ... --json results/decode_cpu_*.json``;
this script only formats them (every number in the table is read from a record).

    python scripts/decode_cpu_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    lines = ["# CPU decode (batch 1)", "",
             ("Written by `scripts/decode_cpu_report.py` from the `sparsify bench --device cpu` "
             "records beside this file. `ideal` is dense bytes / bytes read per token at that "
             "level (the output head stays dense); `of ideal` is speedup / ideal; llama.cpp is "
             "its dense decode of the same file with the same thread count, in the same run. "
             "*after N tokens of context*: decode after an N-token prompt of built-in text "
             "(`sparsify bench --context N`), the other records after a one-line prompt; "
             "the attention note of a long-context record says how its heads ran (records "
             "without one come from code that ran them one after another at every length)."),
             "",
             ("| model | device | format | threads | sparsity | tok/s (median ± IQR) | speedup | "
             "ideal | of ideal | MB/token | GB/s | llama.cpp tok/s |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(RESULTS.glob("decode_cpu_*.json")):
        rec = json.loads(path.read_text())
        lc = rec.get("llama_cpp")
        llama = f"{lc['tok_s']['median']:.1f}" if isinstance(lc, dict) else "-"
        synth = " (synthetic)" if rec.get("synthetic") else ""
        if rec.get("prompt") is None and rec.get("context"):
            synth += (f", after {rec['context']} tokens of context, attention "
                      f"{rec.get('attention', 'heads in series')}")
        for r in rec["levels"]:
            sp = r.get("speedup")
            lines.append(
                f"| {rec['model']}{synth} | {rec['device']} | {rec['format']} | "
                f"{rec['threads']} | {r['sparsity']:.2f} | {r['tok_s']['median']:.1f} ± "
                f"{r['tok_s']['iqr']:.1f} | {sp:.2f}x | {r['ideal_speedup']:.2f}x | "
                f"{100 * sp / r['ideal_speedup']:.0f} % | {r['bytes_per_token'] / 1e6:.1f} | "
                f"{r['gb_s']:.1f} | {llama} |")
    out = RESULTS / "decode_cpu.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
