"""What the commands do, between parsing and printing."""

from __future__ import annotations

import sys
import time

import click


def run_generate(spec: str, prompt: str, n: int, temperature: float, seed: int,
                 table: str | None, sparsity: float | None, device: str) -> None:
    """Stream generated text to stdout; timing to stderr."""
    from .generate import generate
    from .loader import load

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from .errors import SparsifyError

            raise SparsifyError("--device cuda: no CUDA device is available to torch")
    t0 = time.perf_counter()
    m = load(spec)
    tok = m.tokenizer
    model = m.model(device=device)
    if table is not None:
        from .sparse import apply_table

        apply_table(model, m, table, sparsity)
    ids = tok.encode(prompt)
    stats = []
    stream = tok.stream_decoder()
    click.echo(prompt, nl=False)
    first = None
    for t in generate(model, ids, n, temperature, seed, tok.eos_ids, stats.append):
        if first is None:
            first = time.perf_counter() - t0
        piece = stream.push(t)
        if piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo(stream.flush())
    s = stats[0]
    sparse = f", table at sparsity {sparsity:g}" if table is not None else ""
    click.echo(f"[{s.prompt_tokens} prompt tokens, {s.new_tokens} generated{sparse}; "
               f"first token after {first:.2f} s; decode {s.decode_tok_s:.1f} tok/s "
               f"(torch, {device})]", err=True)
