"""How often an input channel kept at one token is kept at the next: results/persistence.json.

A prefetch of "the rows kept last token" only pays if the kept set persists from token to
token much more than chance. For each model and each projection input (attn_q/k/v, attn_output,
ffn_gate/up, ffn_down), one dense forward over calibration text records |x| at every position;
per layer the threshold is the s-quantile of |x| over those same positions (self-calibrated,
the BOS position left out), and a channel is kept when |x| exceeds it. Reported, averaged over
layers:

- ``p_keep``: the kept fraction (1 - s by construction);
- ``persistence``: P(kept at t | kept at t - 1) over consecutive positions of a sequence (and
  its range over layers);
- ``channel_baseline``: the same if tokens were independent but channels kept at their own
  rates, sum p_c^2 / sum p_c;
- ``lag64``: P(kept at t | kept at t - 64).

    python scripts/persistence_report.py [--out results/persistence.json] [--force]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparsify import corpus
from sparsify.bench import cpu_name, versions, write_json_atomic
from sparsify.bundled import fetch
from sparsify.config import PROJECTION_INPUT
from sparsify.loader import load
from sparsify.model import dense_projector
from sparsify.profile import RECORDED_BY
from sparsify.synthetic import preset, write_synthetic_gguf

LEVELS = (0.5, 0.4)
N_SEQ, SEQ_LEN, LAG = 2, 256, 64
KINDS = {"attn_in": "attn_q/k/v", "attn_out": "attn_output", "ffn_in": "ffn_gate/up",
         "ffn_mid": "ffn_down"}
# torch.quantile's input limit; larger inputs are subsampled with a fixed seed.
QUANTILE_MAX = 2**24 - 1


class Capture:
    """Projector that keeps |x| of the first projection reading each distinct input."""

    def __init__(self) -> None:
        self.x: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        block, proj = name.rsplit(".", 1)
        inp = PROJECTION_INPUT[proj]
        if RECORDED_BY[inp] == proj:
            self.x[int(block.split(".")[1]), inp] = x.detach().abs().float()
        return dense_projector(name, x, w)


def quantile(a: torch.Tensor, q: float, gen: torch.Generator) -> torch.Tensor:
    flat = a.reshape(-1).double()
    if flat.numel() > QUANTILE_MAX:
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:QUANTILE_MAX]]
    return torch.quantile(flat, q).float()


def measure(path: str) -> tuple[dict, list[dict]]:
    loaded = load(path)
    seqs = corpus.sequences(loaded.tokenizer, corpus.calibration().text, SEQ_LEN, N_SEQ)
    start = 1 if corpus.adds_bos(loaded.tokenizer) else 0
    cap = Capture()
    with torch.inference_mode():
        loaded.model(projector=cap).forward(torch.from_numpy(seqs), last_only=True)
    gen = torch.Generator().manual_seed(0)
    per: dict[tuple[str, float], list[tuple[float, float, float, float]]] = {}
    for (_, inp), a in sorted(cap.x.items()):
        a = a[:, start:]  # (sequences, positions, K)
        for s in LEVELS:
            keep = a > quantile(a, s, gen)
            prev, cur = keep[:, :-1], keep[:, 1:]
            pc = keep.float().reshape(-1, keep.shape[-1]).mean(0)
            per.setdefault((inp, s), []).append((
                keep.float().mean().item(),
                ((prev & cur).sum() / prev.sum()).item(),
                (pc.pow(2).sum() / pc.sum()).item(),
                ((keep[:, :-LAG] & keep[:, LAG:]).sum() / keep[:, :-LAG].sum()).item()))
    rows = []
    for (inp, s), v in sorted(per.items(), key=lambda kv: (-kv[0][1], list(KINDS).index(kv[0][0]))):
        arr = np.array(v)
        mean = arr.mean(0)
        rows.append({"input_of": KINDS[inp], "sparsity": s, "p_keep": mean[0],
                     "persistence": mean[1], "persistence_min": arr[:, 1].min(),
                     "persistence_max": arr[:, 1].max(), "channel_baseline": mean[2],
                     "lag64": mean[3], "layers": len(v)})
    c = loaded.cfg
    dims = {"architecture": c.arch, "n_layer": c.n_layer, "d_model": c.d_model, "d_ff": c.d_ff}
    return dims, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/persistence.json"))
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force to replace it")
    t0 = time.perf_counter()
    rec = {"device": cpu_name(), "versions": versions(), "threads": torch.get_num_threads(),
           "text": f"{N_SEQ} sequences x {SEQ_LEN} tokens of the built-in calibration corpus",
           "thresholds": "self-calibrated per layer: s-quantile of |x| over the same positions",
           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        spec = preset("tiny", n_layer=4, d_model=512, d_ff=1536, n_head=8, n_head_kv=2,
                      vocab_size=4096, dtype="f16")
        synthetic = write_synthetic_gguf(Path(tmp) / "synthetic-4x512.gguf", spec, threads=2)
        for label, path in (("smollm2-135m", fetch("smollm2-135m")),
                            ("gemma3-270m", fetch("gemma3-270m")),
                            ("synthetic-4x512 (synthetic)", str(synthetic))):
            dims, rows = measure(str(path))
            rec["models"][label] = {"dims": dims, "rows": rows}
            for r in rows:
                print(f"{label:28s} {r['input_of']:12s} s={r['sparsity']:.1f} "
                      f"keep {r['p_keep']:.3f} persistence {r['persistence']:.3f} "
                      f"(layers {r['persistence_min']:.3f}-{r['persistence_max']:.3f}) "
                      f"channel baseline {r['channel_baseline']:.3f} lag64 {r['lag64']:.3f}")
    rec["seconds"] = time.perf_counter() - t0
    write_json_atomic(a.out, rec)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
