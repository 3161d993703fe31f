"""Measure the foundation's numbers and write them to results/foundation.json.

For each bundled model: agreement with the float32 reference and llama.cpp's logits in
shared/reference/, the live llama.cpp comparison (when llama-cpp-python is installed: the five
oracle prompts and 12 windows of held-out text, each with llama.cpp's agreement with itself,
batch against token by token), the time from opening the file to the first logits (in a fresh
interpreter, imports timed separately; llama.cpp's the same way) and the decode tokens/s of the
plain torch path.

    python scripts/foundation_report.py [--out results/foundation.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsify.bench import cpu_name, versions, write_json_atomic
from sparsify.bundled import fetch
from sparsify.generate import GenerationStats, generate
from sparsify.loader import load
from sparsify.oracle import as_dict, compare, heldout_windows, llamacpp_available

MODELS = ("smollm2-135m", "gemma3-270m")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

# Runs in a fresh interpreter: what a user waits for on `sparsify generate`.
_FIRST_LOGITS = r"""
import sys, time, json
t0 = time.perf_counter()
import torch
from sparsify.loader import load
t1 = time.perf_counter()
m = load(sys.argv[1])
t2 = time.perf_counter()
ids = m.tokenizer.encode("The history of the bicycle")
t3 = time.perf_counter()
with torch.inference_mode():
    logits = m.model().forward(torch.tensor([ids]), last_only=True)
t4 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "open_s": t2 - t1, "tokenizer_s": t3 - t2,
                  "weights_and_forward_s": t4 - t3, "open_to_first_logits_s": t4 - t1}))
"""


def reference_agreement(name: str, model, tok) -> dict:
    path = REFERENCE / f"{name}.json"
    if not path.exists():
        return {"skipped": f"no {path}"}
    ref = json.loads(path.read_text())
    ids = ref["token_ids"]
    with torch.inference_mode():
        logits = model.forward(torch.tensor([ids]))[0]
    hf_top1 = lc_top1 = 0
    worst_rel = 0.0
    for p in ref["positions"]:
        row = logits[p["pos"]]
        top = int(row.argmax())
        hf_top1 += top == p["hf_fp32_top5_ids"][0]
        lc_ids = p.get("llamacpp_top5_ids") or p["top5_ids"]
        lc_top1 += top == lc_ids[0]
        got = row[p["hf_fp32_top5_ids"]].numpy()
        rel = np.abs(got - np.array(p["hf_fp32_top5_logits"])).max() / float(row.abs().max())
        worst_rel = max(worst_rel, float(rel))
    n = len(ref["positions"])
    return {"positions": n, "tokens_equal": tok.encode(ref["prompt"]) == ids,
            "top1_vs_float32": hf_top1 / n, "top1_vs_llamacpp": lc_top1 / n,
            "max_rel_logit_diff_vs_float32": worst_rel}


def _best_of_three(script: str, name: str) -> dict:
    """Run ``script`` on the model's file in three fresh interpreters; the fastest run's
    timings, with every run's open-to-first-logits time beside them."""
    path = fetch(name, quiet=True)
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["open_to_first_logits_s"])
    best["runs_open_to_first_logits_s"] = [r["open_to_first_logits_s"] for r in runs]
    return best


# The same measure for llama.cpp (llama-cpp-python), on the same machine in the same run.
_LLAMACPP_FIRST_LOGITS = r"""
import sys, time, json, os
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
fd = os.dup(2); os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
ids = llm.tokenize(b"The history of the bicycle")
llm.eval(ids)
logits = llm.scores[len(ids) - 1]
t2 = time.perf_counter()
os.dup2(fd, 2)
print(json.dumps({"imports_s": t1 - t0, "open_to_first_logits_s": t2 - t1}))
"""


def help_time() -> float:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sparsify.cli", "--help"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t)
    return min(times)


def torch_decode(model, tok, n: int = 32) -> dict:
    stats: list[GenerationStats] = []
    ids = tok.encode("The history of the bicycle")
    list(generate(model, ids, 4))  # warm up
    rates = []
    for _ in range(3):
        list(generate(model, ids, n, stats_out=stats.append))
        rates.append(stats[-1].decode_tok_s)
    return {"tokens": n, "tok_s_median": float(np.median(rates)), "tok_s_runs": rates,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/foundation.json")
    args = ap.parse_args()
    rec = {"device": cpu_name(), "versions": versions(), "help_s": help_time(), "models": {}}
    for name in MODELS:
        print(f"{name} ...", file=sys.stderr)
        m = load(name)
        model = m.model()
        r = {"file": m.path.name, "reference": reference_agreement(name, model, m.tokenizer),
             "first_logits": _best_of_three(_FIRST_LOGITS, name),
             "torch_decode": torch_decode(model, m.tokenizer)}
        if llamacpp_available():
            r["llamacpp_first_logits"] = _best_of_three(_LLAMACPP_FIRST_LOGITS, name)
            r["llamacpp_live"] = as_dict(compare(m, model))
            # Running text: 12 windows of 96 tokens from the held-out corpus.
            r["llamacpp_heldout"] = as_dict(compare(m, model, heldout_windows(m.tokenizer),
                                                    greedy_tokens=0))
        rec["models"][name] = r
    write_json_atomic(Path(args.out), rec)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
