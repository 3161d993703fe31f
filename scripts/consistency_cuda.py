"""GPU sparse decode against the torch forward on the bundled models: greedy tokens, one JSON.

For each model, weight format and level (0 = dense, else the committed magnitude table at that
level), the torch model (float32, CPU, masked by the same thresholds) and the CUDA engine both
continue the prompt greedily for ``--tokens`` tokens. Two torch references: the model over the
file's weights ("float32"), and the model over the engine's own rounded (fp16/bf16/int8) weights
and a KV cache of the engine's type ("rounded"), which leaves only summation order and entries
within rounding of a threshold. The record holds the sequences, the length of the common prefix
and, where they part, torch's own top-2 margin at that step, and the teacher-forced agreement
(the engine fed torch's sequence).

Usage: python scripts/consistency_cuda.py OUT.json [--tokens 64] [--formats fp16 bf16 int8]
       [--kv-cache f16]
       python scripts/consistency_cuda.py --table RECORD.json [RECORD.json ...] OUT.md
           (the markdown summary of one or more records)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("The history of the bicycle", "def fibonacci(n):",
           "The capital of France is")


def torch_greedy(model, ids: list[int], n: int, cache_dtype: torch.dtype = torch.float32
                 ) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of the torch model fed one token at a time over a KV cache of
    ``cache_dtype``, and the logits at each pick."""
    from sparsify.model import KVCache

    cache = KVCache.empty(model.cfg, len(ids) + n, device=model.device, dtype=cache_dtype)
    seq, out, logits = list(ids), [], []
    with torch.inference_mode():
        for pos in range(len(ids) + n - 1):
            z = model.forward(torch.tensor([[seq[pos]]], device=model.device), pos, cache)[0, -1]
            if pos >= len(ids) - 1:
                out.append(int(z.argmax()))
                logits.append(z.cpu().numpy())
                seq.append(out[-1])
    return out, np.stack(logits)


def write_table(record_paths: list[str], out: str) -> None:
    """Markdown summary of records (one card): per record, model, format and level, the common
    prefix per prompt."""
    recs = [(Path(p).name, json.loads(Path(p).read_text())) for p in record_paths]
    rec = recs[0][1]
    title = (f"# GPU decode against the torch forward ({rec['device']}, driver "
             f"{rec.get('driver', '?')}, torch {rec['torch']})")
    legend = (f"Greedy continuations of {rec['rows'][0]['tokens']} tokens from 3 prompts, made by "
              "`scripts/consistency_cuda.py`; the record of each row is named in its first "
              "column, with the time of its run. Each cell: "
              "tokens equal before the first difference, per prompt, and in brackets torch's "
              "top-2 margin (logits) at that first difference. 'float32': torch over the file's "
              "weights; 'rounded': torch over the engine's rounded weights (and, in records made "
              "after 2026-12-03 13:06, a KV cache of the engine's type). KV cache: the "
              "engine's cache element type. Teacher-forced: "
              "steps where the engine, fed torch's (float32) sequence, picks torch's token.")
    lines = [title, "", legend, "",
             ("| record | model | format | KV cache | level | vs float32 | vs rounded | "
              "teacher-forced |"),
             "|---|---|---|---|---|---|---|---|"]

    def cell(rows, key):
        out = []
        for r in rows:
            x = r[key]
            m = x["margin_at_split"]
            out.append(f"{x['equal_prefix']}" + ("" if m is None else f" ({m:.2f})"))
        return ", ".join(out)

    for name, r0 in recs:
        groups: dict = {}
        for r in r0["rows"]:
            # records before the float16 cache have no kv_cache field: theirs was float32
            key = (r["model"], r["format"], r.get("kv_cache", "f32"), r["level"])
            groups.setdefault(key, []).append(r)
        for (model, fmt, cache, level), rows in groups.items():
            tf = sum(r["float32"]["teacher_forced_agree"] for r in rows)
            n = sum(r["tokens"] for r in rows)
            lines.append(f"| {name} ({r0['when'][:16]}Z) | {model} | {fmt} | {cache} | {level:g} | "
                         f"{cell(rows, 'float32')} | {cell(rows, 'rounded')} | {tf}/{n} |")
    Path(out).write_text("\n".join(lines) + "\n")


def main() -> int:
    if len(sys.argv) >= 4 and sys.argv[1] == "--table":
        write_table(sys.argv[2:-1], sys.argv[-1])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--formats", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.5])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--device", default="cuda", help="cpu runs the engine's stand-in (a check)")
    ap.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                    help="the engine's KV cache type (default: SPARSIFY_CUDA_KV_CACHE, else f32)")
    args = ap.parse_args()

    from sparsify.bundled import fetch
    from sparsify.engine_cuda import CUDAEngine, device_info, rounded_model
    from sparsify.loader import load
    from sparsify.model import dense_projector
    from sparsify.sparse import MaskingProjector
    from sparsify.table import ThresholdTable

    torch.set_num_threads(8)
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    rows = []
    for name in args.models:
        loaded = load(fetch(name))
        model = loaded.model(device=str(dev))
        table = ThresholdTable.load(ROOT / "thresholds" / f"{name}.magnitude.json")
        table.check(loaded)
        prompt_ids = {p: loaded.tokenizer.encode(p) for p in PROMPTS}
        for fmt in args.formats:
            eng = CUDAEngine(loaded, fmt=fmt, max_len=64 + args.tokens, device=dev,
                             kv_cache=args.kv_cache)
            rounded = rounded_model(eng, loaded, dev)
            for level in args.levels:
                thr = None if level == 0 else table.thresholds_at(level)
                eng.set_thresholds(thr)
                for m in (model, rounded):
                    m.projector = MaskingProjector(thr) if thr else dense_projector
                for prompt, ids in prompt_ids.items():
                    with torch.inference_mode():
                        got = eng.generate(ids, args.tokens)
                        eng.reset()
                    row = {"model": name, "format": fmt, "kv_cache": eng.kv_cache,
                           "level": level, "prompt": prompt,
                           "tokens": args.tokens, "engine_tokens": got,
                           "engine_text": loaded.tokenizer.decode(got)}
                    for label, m in (("float32", model), ("rounded", rounded)):
                        # 'rounded' is the engine's own arithmetic: its weights and its cache
                        want, ref = torch_greedy(m, ids, args.tokens,
                                                 eng.cache_dtype if label == "rounded"
                                                 else torch.float32)
                        with torch.inference_mode():
                            eng.reset()
                            picks = [int(eng.step(t).argmax())
                                     for t in ids + want[:-1]][len(ids) - 1:]
                        top2 = np.sort(ref, axis=-1)[:, -2:]
                        margin = top2[:, 1] - top2[:, 0]
                        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                                     None)
                        row[label] = {
                            "equal_prefix": args.tokens if first is None else first,
                            "margin_at_split": None if first is None else float(margin[first]),
                            "teacher_forced_agree": sum(a == b for a, b in zip(picks, want)),
                            "tokens": want}
                    rows.append(row)
                    f, r = row["float32"], row["rounded"]
                    print(f"{name} {fmt} {eng.kv_cache} cache level {level:g} {prompt!r}: "
                          f"equal prefix vs float32 {f['equal_prefix']}/{args.tokens} (margin "
                          f"at split {f['margin_at_split']}), vs rounded "
                          f"{r['equal_prefix']}/{args.tokens} (margin {r['margin_at_split']}); "
                          f"teacher-forced "
                          f"{f['teacher_forced_agree']}/{r['teacher_forced_agree']}", flush=True)
            del eng, rounded
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    info = device_info(dev) if dev.type == "cuda" else {"device": "cpu (engine stand-in)"}
    record = {"kind": "consistency", **info, "torch": torch.__version__,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "reference": "torch forward (float32, stepwise, same thresholds, on the same "
                 "device) over the file's weights ('float32', float32 KV cache) and over the "
                 "engine's rounded weights and a KV cache of the engine's type ('rounded')",
              "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
