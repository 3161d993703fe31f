"""What a dependency across all blocks of a grid costs: kernel boundary against grid barrier.

    python scripts/bench_boundary_cuda.py OUT.json [--phases 32,160] [--reps 50] [--force]

Builds scripts/boundary_cost.cu for the device and times P phases in which every block reads
what another block wrote in the phase before (so each phase waits for the whole last one),
three ways, on a grid of `--per-sm` 256-thread blocks per multiprocessor (the fp16 GEMVs' one
wave: 4), every block resident:
- `pdl`: P launches of a one-phase kernel in a CUDA graph, each one allowed to launch early
  and waiting for the previous grid with `griddepcontrol.wait` (the decode step's launches);
- `plain`: the same graph without programmatic dependent launch;
- `barrier`: one persistent kernel that runs all P phases, with a software grid barrier
  (an acquire-release counter and a generation flag) between them;
- `counter`: the same with a counting barrier (each block adds one without awaiting a reply
  and waits for the count of all blocks; one L2 trip fewer).
It checks that every value counts every phase that ran (a phase that read too early would
leave one behind), and records µs per phase (the median of `--repeats` timings of `--reps`
graph replays each) with the device, versions and grid.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sparsify.bench import write_json_atomic
from sparsify.engine_cuda import device_info

SOURCE = Path(__file__).with_name("boundary_cost.cu")
MODES = {"pdl": 0, "plain": 1, "barrier": 2, "counter": 3}


def build(out_dir: Path) -> tuple[ctypes.CDLL, str]:
    """The built library, and nvcc's version line."""
    import torch
    from sparsify_kernels import cuda as kc

    nvcc = kc.find_nvcc()
    if nvcc is None:
        raise SystemExit("error: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    lib = out_dir / "boundary_cost.so"
    arch = tuple(torch.cuda.get_device_capability())
    cmd = [nvcc, *kc.NVCC_FLAGS, kc.gencode(arch), "--shared", "-o", str(lib), str(SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"error: nvcc failed: {res.stderr.strip().splitlines()[-1]}")
    so = ctypes.CDLL(str(lib))
    so.boundary_time.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 3 + [
        ctypes.POINTER(ctypes.c_float)]
    return so, kc.nvcc_version(nvcc).splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--phases", default="32,160", help="phases per graph, comma-separated")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    ap.add_argument("--repeats", type=int, default=5, help="timings per setting (median)")
    ap.add_argument("--per-sm", type=int, default=4,
                    help="blocks per multiprocessor (the GEMVs' fp16 grid: 4)")
    ap.add_argument("--force", action="store_true", help="overwrite OUT")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists (use --force to overwrite)")
    phase_counts = [int(p) for p in args.phases.split(",")]
    if any(p < 2 or p % 2 for p in phase_counts):
        raise SystemExit("error: --phases takes even counts of at least 2 (phases alternate "
                         "between two buffers, and each replay starts on the first)")

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        so, nvcc_version = build(Path(tmp))
        resident = so.boundary_resident_blocks()
        if resident <= 0:
            raise SystemExit("error: occupancy query failed")
        dev = torch.device("cuda")
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        blocks = min(resident, args.per_sm * sms)
        rows = []
        for phases in phase_counts:
            for mode, code in MODES.items():
                a = torch.zeros(blocks, device=dev)
                b = torch.zeros(blocks, device=dev)
                bar = torch.zeros(4, dtype=torch.int32, device=dev)
                times, ran = [], 0
                for _ in range(args.repeats):
                    us = ctypes.c_float()
                    rc = so.boundary_time(code, blocks, phases, args.reps, a.data_ptr(),
                                          b.data_ptr(), bar.data_ptr(), ctypes.byref(us))
                    if rc != 0:
                        raise SystemExit(f"error: {mode} with {phases} phases failed (rc {rc})")
                    times.append(us.value)
                    ran += (args.reps + 1) * phases  # the warm-up replay too
                torch.cuda.synchronize()
                # phase i writes b when i is even, so an even count ends on a
                counted = torch.unique(a).tolist()
                if counted != [float(ran)]:
                    raise SystemExit(f"error: {mode}: values {counted[:4]} after {ran} phases")
                row = {"mode": mode, "phases": phases, "us_per_phase": statistics.median(times),
                       "us_all": times}
                rows.append(row)
                print(f"{mode:8s} {phases:4d} phases: {row['us_per_phase']:.3f} us per phase",
                      file=sys.stderr)
        rec = {"kind": "grid_dependency_cost", **device_info(dev), "sm_count": sms,
               "torch": torch.__version__, "nvcc": nvcc_version,
               "blocks": blocks, "blocks_per_sm": blocks // sms, "threads": 256,
               "reps": args.reps, "repeats": args.repeats,
               "method": "CUDA events around --reps graph replays after one warm-up; µs per "
                         "phase = elapsed / (reps * phases); median of --repeats",
               "rows": rows}
        write_json_atomic(args.out, rec)


if __name__ == "__main__":
    main()
