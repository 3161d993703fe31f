"""Dense perplexity, ours against llama.cpp's, on the windows ``llama-perplexity`` scores.

llama.cpp's ``tools/perplexity/perplexity.cpp`` (``perplexity()``) tokenizes the whole text once
(with BOS when the model asks for it), cuts it into ``n_chunk = n_tokens // n_ctx`` consecutive
windows of ``n_ctx`` tokens, puts BOS in place of each window's first token (when the model adds
BOS), evaluates each window from an empty context, and scores only the second half: the logits at
positions ``n_ctx/2 .. n_ctx-2`` against the tokens that follow them. Perplexity is
exp(mean NLL) over all scored tokens.

This script computes that quantity twice on identical windows (token ids from llama.cpp's own
tokenizer): once with llama.cpp's logits through llama-cpp-python, once with our float32 forward
pass. It also notes whether our tokenizer gives the same ids. Texts:

- ``kjv``: the King James Bible as the Debian package ``bible-kjv-text`` prints it
  (``bible Gen1:1-Rev22:21`` with 80 columns; needs ``apt-get install bible-kjv-text``);
- ``pydoc``: Python's ``pydoc_data.topics`` help pages, sorted by key, joined by blank lines;
- any UTF-8 file given with ``--text``.

Writes ``results/quality_dense_sanity.json`` (refuses to overwrite without ``--force``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsify.bundled import sha256_file
from sparsify.evaluate import (
    llama_perplexity_windows,
    machine_record,
    second_half_nll,
    write_json,
)
from sparsify.loader import load
from sparsify.oracle import _quiet_stderr, llamacpp_logits, open_llama

# What the real llama-perplexity binary reported for gemma3-270m at n_ctx 512 when the project
# was set up (its chunk count and text formatting were not recorded): context only, not a bound.
REFERENCE_LLAMA_PERPLEXITY = {("gemma3-270m", "kjv"): 5.27, ("gemma3-270m", "pydoc"): 12.83}


def kjv_text() -> str:
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("error: the KJV text needs the 'bible' program (apt-get install bible-kjv-text)")
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, env=env, check=True)
    return out.stdout.decode("utf-8")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def compare(model_name: str, text_name: str, text: str, n_ctx: int,
            chunks: int | None) -> dict:
    """Both perplexities on the same windows of ``text``; a dict for the record."""
    loaded = load(model_name)
    llm = open_llama(str(loaded.path), n_ctx=n_ctx)
    try:
        t0 = time.perf_counter()
        add_bos = loaded.tokenizer.encode("", add_bos=None) != []
        with _quiet_stderr():
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        bos = loaded.tokenizer.bos_id if add_bos else None
        wins = llama_perplexity_windows(ids, n_ctx, bos, chunks)
        if not wins:
            raise SystemExit(f"error: {text_name} has fewer than {n_ctx} tokens")
        # Our tokenizer on the same text, for the record (the comparison uses llama.cpp's ids).
        probe = text[: 1 << 16]
        with _quiet_stderr():
            ref_probe = llm.tokenize(probe.encode("utf-8"), add_bos=False, special=False)
        same_tokens = loaded.tokenizer.encode(probe, add_bos=False) == ref_probe
        model = loaded.model()
        ours = theirs = 0.0
        count = 0
        for w in wins:
            with torch.inference_mode():
                lo = model.forward(torch.tensor([w]))[0].numpy()
            a, n = second_half_nll(lo, w)
            b, _ = second_half_nll(llamacpp_logits(llm, w), w)
            ours += a
            theirs += b
            count += n
        ppl_ours = math.exp(ours / count)
        ppl_llama = math.exp(theirs / count)
        return {
            "model": loaded.path.name, "model_sha256": sha256_file(loaded.path),
            "text": text_name, "text_sha256": _sha(text), "text_tokens": len(ids),
            "n_ctx": n_ctx, "chunks": len(wins), "chunks_in_text": len(ids) // n_ctx,
            "scored_tokens": count, "perplexity_ours": ppl_ours,
            "perplexity_llamacpp": ppl_llama,
            "relative_difference": ppl_ours / ppl_llama - 1.0,
            "reference_llama_perplexity": REFERENCE_LLAMA_PERPLEXITY.get(
                (model_name, text_name)),
            "our_tokenizer_matches_llamacpp_on_first_64k_chars": same_tokens,
            "seconds": time.perf_counter() - t0,
        }
    finally:
        with _quiet_stderr():
            llm.close()


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--texts", default="kjv,pydoc", help="kjv, pydoc (comma-separated)")
    ap.add_argument("--text", default=None, help="a UTF-8 file to use instead of --texts")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32,
                    help="windows per text (llama-perplexity --chunks); 0 for all")
    ap.add_argument("--out", default="results/quality_dense_sanity.json")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if Path(args.out).exists() and not args.force:
        sys.exit(f"error: {args.out}: exists; pass --force to overwrite it")
    if args.text:
        texts = {Path(args.text).name: Path(args.text).read_text(encoding="utf-8")}
    else:
        makers = {"kjv": kjv_text, "pydoc": pydoc_text}
        texts = {name: makers[name]() for name in args.texts.split(",")}
    rows = []
    for m in args.models.split(","):
        for name, text in texts.items():
            r = compare(m, name, text, args.n_ctx, args.chunks or None)
            print(f"{m:<14} {name:<8} chunks {r['chunks']:>4}  ours {r['perplexity_ours']:.4f}  "
                  f"llama.cpp {r['perplexity_llamacpp']:.4f}  "
                  f"({100 * r['relative_difference']:+.2f}%)  {r['seconds']:.0f} s",
                  file=sys.stderr)
            rows.append(r)
    import llama_cpp

    write_json(args.out, {"kind": "sparsify.dense_sanity", "schema_version": 1,
                          "machine": machine_record(), "llama_cpp_python": llama_cpp.__version__,
                          "dtype": "float32", "rows": rows}, force=args.force)


if __name__ == "__main__":
    main()
