"""What the commands do, between parsing and printing."""

from __future__ import annotations

import sys

import click


def run_generate(spec: str, prompt: str, n: int, temperature: float, seed: int,
                 table: str | None, sparsity: float | None, device: str) -> None:
    """Stream generated text to stdout; timing to stderr."""
    import time

    from .generate import generate
    from .loader import load

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
    for t in generate(model, ids, n, temperature, seed, tok.eos_ids, stats.append):
        piece = stream.push(t)
        if piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo(stream.flush())
    s = stats[0]
    click.echo(f"[{s.prompt_tokens} prompt tokens, {s.new_tokens} generated; load+prefill "
               f"{s.prefill_s + (time.perf_counter() - t0 - s.prefill_s - s.decode_s):.2f} s; "
               f"decode {s.decode_tok_s:.1f} tok/s on {device}]", err=True)
