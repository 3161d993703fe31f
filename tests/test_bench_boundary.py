"""scripts/bench_boundary_cuda.py's argument checks and its answer on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_boundary_cuda.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.mark.parametrize("phases", ["3", "32,7", "0"])
def test_phase_counts_must_be_even(tmp_path, phases):
    res = run(str(tmp_path / "out.json"), "--phases", phases)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        ("error: --phases takes even counts of at least 2 (phases alternate between two "
         "buffers, and each replay starts on the first)")]
    assert not (tmp_path / "out.json").exists()


def test_an_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("{}")
    res = run(str(out))
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {out} exists (use --force to overwrite)"
    assert out.read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    res = run(str(tmp_path / "out.json"))
    assert res.returncode == 1
    assert res.stderr.strip() == "error: no CUDA device"
    assert not (tmp_path / "out.json").exists()
