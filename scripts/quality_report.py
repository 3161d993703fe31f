"""Quality of every allocation method on the bundled models: records, table and plots.

    python scripts/quality_report.py run [--models smollm2-135m,gemma3-270m] [--force]
    python scripts/quality_report.py render

``run`` evaluates, per model, the thresholds/ tables (magnitude and weight-aware) with every
method — uniform (TEAL's baseline with the magnitude table), greedy and cross-layer — at 25, 40,
50 and 60 % on the built-in held-out text, in one pass over the text (the dense forward runs
once), and writes ``results/quality_<model>.json``. ``render`` reads those records (and
``results/quality_dense_sanity.json`` when present) and writes ``results/quality.md`` and
``results/quality_<model>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path("results")
THRESHOLDS = Path("thresholds")
LEVELS = (0.25, 0.4, 0.5, 0.6)
# (method, criterion) pairs evaluated; the first is the baseline the targets refer to.
CONFIGS = (("uniform", "magnitude"), ("uniform", "weight-aware"), ("greedy", "magnitude"),
           ("greedy", "weight-aware"), ("cross-layer", "magnitude"),
           ("cross-layer", "weight-aware"))
MODELS = ("smollm2-135m", "gemma3-270m")


def label(method: str, criterion: str) -> str:
    return f"{method}-{criterion}"


def find_tables(loaded) -> dict[str, Path]:
    """The thresholds/ table of each criterion that fits ``loaded`` (by fingerprint)."""
    from sparsify.errors import SparsifyError
    from sparsify.table import ThresholdTable

    found: dict[str, Path] = {}
    for path in sorted(THRESHOLDS.glob("*.json")):
        try:
            t = ThresholdTable.load(path)
            t.check(loaded)
        except SparsifyError:
            continue
        found.setdefault(t.criterion, path)
    return found


def run(models: list[str], tokens: int, seq_len: int, force: bool) -> None:
    from tqdm import tqdm

    from sparsify.bundled import sha256_file
    from sparsify.evaluate import (
        evaluate_levels,
        machine_record,
        text_sequences,
        write_json,
    )
    from sparsify.loader import load
    from sparsify.table import ThresholdTable

    for name in models:
        out = RESULTS / f"quality_{name}.json"
        if out.exists() and not force:
            sys.exit(f"error: {out}: exists; pass --force to overwrite it")
        loaded = load(name)
        tables = find_tables(loaded)
        configs = [(m, c) for m, c in CONFIGS if c in tables]
        missing = [label(m, c) for m, c in CONFIGS if c not in tables]
        if missing:
            print(f"{name}: no table for {', '.join(missing)}", file=sys.stderr)
        loaded_tables = {c: ThresholdTable.load(p) for c, p in tables.items()}
        ths, targets, wa, tags = [], [], [], []
        for m, c in configs:
            for s in LEVELS:
                ths.append(loaded_tables[c].thresholds_at(s, m))
                targets.append(s)
                wa.append(c == "weight-aware")
                tags.append((m, c))
        seqs, source = text_sequences(loaded, None, tokens, seq_len)
        model = loaded.model()
        gguf_bytes = {n: loaded.gguf.tensors[n + ".weight"].nbytes
                      for n in loaded.cfg.projection_names}
        t0 = time.perf_counter()
        with tqdm(total=seqs.shape[0] * (1 + len(ths)), desc=name, file=sys.stderr,
                  leave=False) as bar:
            res = evaluate_levels(model, seqs, ths, targets, wa, gguf_bytes, bar.update)
        runs: dict[str, dict] = {}
        for (m, c), r in zip(tags, res.levels):
            key = label(m, c)
            run_ = runs.setdefault(key, {"method": m, "criterion": c,
                                         "table": str(tables[c]),
                                         "table_provenance": loaded_tables[c].provenance,
                                         "levels": []})
            lv = dict(vars(r))
            run_["levels"].append(lv)
        record = {
            "kind": "sparsify.quality", "schema_version": 1,
            "model": {"name": loaded.path.name, "bundled": name, "arch": loaded.cfg.arch,
                      "sha256": sha256_file(loaded.path), "synthetic_weights": False},
            "text": source, "dtype": "float32", "machine": machine_record(),
            "dense_perplexity": res.dense_perplexity, "dense_nll": res.dense_nll,
            "scored_positions": res.scored_positions, "seconds": time.perf_counter() - t0,
            "runs": list(runs.values()),
        }
        write_json(out, record, force)
        print(f"{name}: {res.seconds:.0f} s -> {out}", file=sys.stderr)


def render() -> None:
    records = []
    for name in MODELS:
        p = RESULTS / f"quality_{name}.json"
        if p.exists():
            records.append((name, json.loads(p.read_text())))
    if not records:
        sys.exit("error: no results/quality_<model>.json; run `quality_report.py run` first")
    lines = ["# Quality of sparse models", "",
             ("Written by `scripts/quality_report.py` from the records beside this file; "
             "do not edit by hand."), ""]
    lines += _sanity_section()
    for name, rec in records:
        lines += _model_section(name, rec)
        _plot(name, rec)
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / 'quality.md'}", file=sys.stderr)


def _sanity_section() -> list[str]:
    p = RESULTS / "quality_dense_sanity.json"
    if not p.exists():
        return []
    rec = json.loads(p.read_text())
    out = ["## Dense perplexity against llama.cpp", "",
           ("Same token windows (llama.cpp's tokenizer), llama-perplexity's scoring: n_ctx-token "
           "windows, BOS first, second half scored. llama.cpp through llama-cpp-python "
           f"{rec.get('llama_cpp_python', '?')}; ours in float32 on "
           f"{rec['machine']['device']}."), "",
           ("| model | text | windows | ours | llama.cpp | difference "
            "| llama-perplexity reference |"),
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rec["rows"]:
        ref = r.get("reference_llama_perplexity")
        out.append(f"| {r['model']} | {r['text']} | {r['chunks']} of {r['chunks_in_text']} | "
                   f"{r['perplexity_ours']:.3f} | {r['perplexity_llamacpp']:.3f} | "
                   f"{100 * r['relative_difference']:+.2f} % | "
                   f"{'' if ref is None else f'{ref:.2f}'} |")
    return out + [""]


def _model_section(name: str, rec: dict) -> list[str]:
    dense = rec["dense_perplexity"]
    m = rec["machine"]
    out = [f"## {name} ({rec['model']['name']})", "",
           (f"Held-out text: {rec['text']['identity']}, {rec['text']['sequences']} windows of "
           f"{rec['text']['seq_len']} tokens ({rec['scored_positions']} scored positions). "
           f"Dense perplexity {dense:.3f}. Measured on {m['device']}, {m['torch_threads']} "
           f"threads, torch {m['torch']}, {rec['seconds']:.0f} s for all runs."), "",
           ("Perplexity (rise over dense) and mean KL(dense ‖ sparse) in nats per token; "
           "realized = parameter-weighted model-wide sparsity on the held-out text."), ""]
    levels = [lv["target"] for lv in rec["runs"][0]["levels"]]
    head = "| method | " + " | ".join(f"{100 * s:.0f} %" for s in levels) + " |"
    out += [head, "|---|" + "---:|" * len(levels)]
    for r in rec["runs"]:
        cells = [f"{lv['perplexity']:.2f} (+{100 * lv['ppl_rise_rel']:.1f} %), "
                 f"KL {lv['mean_kl']:.3f}, realized {100 * lv['realized_model']:.1f} %"
                 for lv in r["levels"]]
        out.append(f"| {label(r['method'], r['criterion'])} | " + " | ".join(cells) + " |")
    out.append("")
    base = _run(rec, "uniform", "magnitude")
    if base is not None:
        out += _targets(rec, base)
    out += [f"![PPL and KL against realized sparsity](quality_{name}.png)", ""]
    return out


def _run(rec: dict, method: str, criterion: str) -> dict | None:
    return next((r for r in rec["runs"] if r["method"] == method
                 and r["criterion"] == criterion), None)


def _at(run: dict, s: float) -> dict | None:
    return next((lv for lv in run["levels"] if abs(lv["target"] - s) < 1e-9), None)


def _targets(rec: dict, base: dict) -> list[str]:
    out = []
    b40, b50 = _at(base, 0.4), _at(base, 0.5)
    if b40 is not None:
        rises = ", ".join(f"{label(r['method'], r['criterion'])} +{_at(r, 0.4)['ppl_rise']:.3f}"
                          for r in rec["runs"] if _at(r, 0.4) is not None)
        out.append(f"Perplexity rise at 40 %: {rises}.")
    if b50 is not None:
        best = min((r for r in rec["runs"] if _at(r, 0.5) is not None),
                   key=lambda r: _at(r, 0.5)["ppl_rise"])
        ratio = _at(best, 0.5)["ppl_rise"] / b50["ppl_rise"]
        verdict = "meets" if ratio <= 2 / 3 else "misses"
        out.append(f"At 50 %: best is {label(best['method'], best['criterion'])}, rise "
                   f"+{_at(best, 0.5)['ppl_rise']:.3f} against uniform-magnitude's "
                   f"+{b50['ppl_rise']:.3f}: ratio {ratio:.2f} ({verdict} the ≤ 2/3 goal).")
    worst = max(abs(lv["realized_model"] - lv["target"]) for r in rec["runs"]
                for lv in r["levels"])
    out.append(f"Largest gap between realized and target model-wide sparsity: "
               f"{100 * worst:.2f} points.")
    return out + [""]


def _plot(name: str, rec: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rec["runs"]:
        xs = [lv["realized_model"] for lv in r["levels"]]
        kw = {"marker": "o", "label": label(r["method"], r["criterion"])}
        if r["method"] == "uniform" and r["criterion"] == "magnitude":
            kw.update(color="black", linestyle="--")
        ax1.plot(xs, [lv["perplexity"] for lv in r["levels"]], **kw)
        ax2.plot(xs, [lv["mean_kl"] for lv in r["levels"]], **kw)
    ax1.axhline(rec["dense_perplexity"], color="grey", linewidth=0.8, label="dense")
    ax1.set(xlabel="realized model-wide sparsity", ylabel="perplexity (held-out)",
            title=f"{name}: perplexity")
    ax2.set(xlabel="realized model-wide sparsity", ylabel="mean KL(dense ‖ sparse), nats",
            title=f"{name}: KL to dense", yscale="log")
    ax1.legend(fontsize=8)
    m = rec["machine"]
    fig.suptitle(f"{rec['model']['name']} · {rec['text']['tokens']} held-out tokens · "
                 f"{m['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"quality_{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate and write results/quality_<model>.json")
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--tokens", type=int, default=8192)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--force", action="store_true")
    sub.add_parser("render", help="write results/quality.md and the plots from the records")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.models.split(","), args.tokens, args.seq_len, args.force)
    else:
        render()


if __name__ == "__main__":
    main()
