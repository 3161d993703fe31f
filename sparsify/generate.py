"""Text generation with the torch model: prefill, then one token at a time over a KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model import KVCache, Model


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill; the rest from decode steps.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    """Next token from logits (V,): argmax at temperature 0, else softmax sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(model: Model, prompt_ids: list[int], n: int, temperature: float = 0.0,
             seed: int = 0, stop_ids: set[int] | frozenset[int] = frozenset(),
             stats_out: Callable[[GenerationStats], None] | None = None) -> Iterator[int]:
    """Yield up to ``n`` new token ids after ``prompt_ids``; stops early on ``stop_ids``."""
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache.empty(model.cfg, len(prompt_ids) + n, device=model.device)
    ids = torch.tensor([prompt_ids], device=model.device)
    produced = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model.forward(ids, 0, cache, last_only=True)[0, -1]
        t1 = time.perf_counter()
        pos = len(prompt_ids)
        while produced < n:
            tok = sample(logits.float().cpu(), temperature, gen)
            produced += 1
            yield tok
            if tok in stop_ids or produced == n:
                break
            step = torch.tensor([[tok]], device=model.device)
            logits = model.forward(step, pos, cache)[0, -1]
            pos += 1
    t2 = time.perf_counter()
    if stats_out is not None:
        stats_out(GenerationStats(len(prompt_ids), produced, t1 - t0, t2 - t1))
