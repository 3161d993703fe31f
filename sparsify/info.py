"""``sparsify info``: what a GGUF model file holds."""

from __future__ import annotations

from collections import Counter

from .loader import load


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(spec: str) -> str:
    """A human-readable summary of the model: config, then one line per tensor."""
    m = load(spec)
    cfg, g = m.cfg, m.gguf
    meta = g.metadata
    lines = [
        f"file          {m.path}",
        f"name          {meta.get('general.name', '?')}",
        f"architecture  {cfg.arch}",
        f"blocks        {cfg.n_layer}",
        f"width         {cfg.d_model}   ffn {cfg.d_ff}",
        f"heads         {cfg.n_head} q / {cfg.n_head_kv} kv, head dim {cfg.head_dim}",
        f"vocabulary    {cfg.vocab_size} ({meta.get('tokenizer.ggml.model', '?')})",
        f"context       {cfg.context_length}",
        f"rope          base {cfg.rope_base:g}"
        + (f", local {cfg.rope_base_swa:g}" if cfg.sliding_window else "")
        + (" (neox)" if cfg.rope_neox else " (norm)"),
    ]
    if cfg.sliding_window:
        n_swa = sum(cfg.swa_layers)
        lines.append(f"sliding win.  {cfg.sliding_window} on {n_swa} of {cfg.n_layer} blocks")
    lines.append(f"output head   {'tied to token_embd' if cfg.tied_output else 'output'}")
    by_type: Counter[str] = Counter()
    count: Counter[str] = Counter()
    total = 0
    for t in g:
        by_type[t.type_name] += t.nbytes
        count[t.type_name] += 1
        total += t.nbytes
    lines.append(f"tensors       {len(g.tensors)}, {_human(total)}")
    for name, nbytes in by_type.most_common():
        lines.append(f"  {name:<8} {count[name]:>4} tensors  {_human(nbytes):>10}")
    lines.append("")
    lines.append(f"{'tensor':<32} {'type':<6} {'shape (out, in)':<18} bytes")
    for t in g:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"{t.name:<32} {t.type_name:<6} {shape:<18} {t.nbytes}")
    return "\n".join(lines)
