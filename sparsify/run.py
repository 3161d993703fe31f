"""What the commands do, between parsing and printing."""

from __future__ import annotations

import sys
import time

import click


def run_generate(spec: str, prompt: str, n: int, temperature: float, seed: int,
                 table: str | None, sparsity: float | None, device: str,
                 kv_cache: str | None = None) -> None:
    """Stream generated text to stdout; timing to stderr (``kv_cache``: cuda's cache type)."""
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
    if device == "cuda":
        _generate_cuda(m, prompt, n, temperature, seed, table, sparsity, t0, kv_cache)
        return
    model = m.model(device=device)
    if table is not None:
        from .sparse import apply_table

        apply_table(model, m, table, sparsity)
    ids = tok.encode(prompt)
    if not ids:
        from .errors import SparsifyError

        raise SparsifyError("the prompt is empty and the model adds no BOS token")
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


def _generate_cuda(m, prompt: str, n: int, temperature: float, seed: int, table: str | None,
                   sparsity: float | None, t0: float, kv_cache: str | None = None) -> None:
    """Generation on the GPU decode engine (fp16 weights, one CUDA graph per token)."""
    import torch

    from .engine_cuda import CUDAEngine
    from .generate import sample

    tok = m.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        from .errors import SparsifyError

        raise SparsifyError("the prompt encodes to no tokens")
    engine = CUDAEngine(m, fmt="fp16", max_len=len(ids) + n, kv_cache=kv_cache)
    if table is not None:
        from .table import ThresholdTable

        tab = ThresholdTable.load(table)
        tab.check(m)
        engine.set_thresholds(tab.thresholds_at(sparsity),
                              weight_aware=tab.criterion == "weight-aware")
    gen = torch.Generator().manual_seed(seed)
    stream = tok.stream_decoder()
    click.echo(prompt, nl=False)
    t1 = time.perf_counter()
    logits = engine.prefill(ids)
    first = None
    produced = 0
    while produced < n:
        t = sample(logits.cpu(), temperature, gen)
        produced += 1
        if first is None:
            first = time.perf_counter()
        piece = stream.push(t)
        if piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        if t in tok.eos_ids or produced == n:
            break
        logits = engine.step(t)
    t2 = time.perf_counter()
    click.echo(stream.flush())
    sparse = f", table at sparsity {sparsity:g}" if table is not None else ""
    rate = (produced - 1) / (t2 - first) if produced > 1 else float("nan")
    click.echo(f"[{len(ids)} prompt tokens, {produced} generated{sparse}; load and repack "
               f"{t1 - t0:.2f} s, first token after {first - t0:.2f} s; decode {rate:.1f} tok/s "
               f"(CUDA engine, fp16, one host sync per token for sampling)]", err=True)
