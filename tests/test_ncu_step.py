"""scripts/ncu_step_cuda.py's reading of ncu's raw CSV page, on hand-made pages (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ncu_step_cuda.py"

HEADER = ('"ID","Kernel Name","device__attribute_display_name","gpu__time_duration.sum",'
          '"dram__bytes_read.sum","launch__grid_size","launch__block_size",'
          '"smsp__inst_executed.sum","smsp__pcsamp_warps_issue_stalled_long_scoreboard",'
          '"smsp__pcsamp_warps_issue_stalled_barrier",'
          '"smsp__pcsamp_warps_issue_stalled_barrier_not_issued"')
UNITS = '"","","","usecond","Mbyte","","","inst","","",""'


@pytest.fixture(scope="module")
def ncu(script_module):
    return script_module("ncu_step_cuda")


def page(tmp_path: Path, *rows: str) -> Path:
    p = tmp_path / "raw.csv"
    p.write_text("\n".join(["==PROF== Disconnected from process 1", HEADER, UNITS, *rows]) + "\n")
    return p


def test_kernel_rows_in_units_of_the_record(ncu, tmp_path):
    p = page(tmp_path, '"0","gemv_kernel<0>","NVIDIA H200","20.5","58.7","512","256","1,048,576",'
                       '"900","100","7"',
             '"1","attention_kernel","NVIDIA H200","9.7","0.8","32","1024","35,040","10","30","2"')
    rows = ncu.read_raw(p)
    k = [ncu.kernel_summary(r) for r in rows]
    assert k[0]["duration_ns"] == pytest.approx(20500.0)
    assert k[0]["dram_bytes_read"] == pytest.approx(58.7e6)
    assert k[0]["dram_read_GBps"] == pytest.approx(58.7e6 / 20500.0)
    assert k[0]["instructions_per_warp"] == pytest.approx(1048576 / (512 * 8))
    # not-issued samples are a subset of the samples of their reason: not counted twice
    assert k[0]["stall_samples"] == 1000.0
    assert k[0]["stall_share"] == pytest.approx({"long_scoreboard": 0.9, "barrier": 0.1})
    assert list(k[1]["stall_share"]) == ["barrier", "long_scoreboard"]
    assert k[1]["instructions_per_warp"] == pytest.approx(35040 / 1024)


def test_summary_writes_one_record_and_refuses_to_overwrite(tmp_path):
    p = page(tmp_path, '"0","k","NVIDIA H200","1.0","1.0","1","32","10","1","0","0"')
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(SCRIPT), "summary", str(p), "--out", str(out), "--note", "n"]
    subprocess.run(cmd, check=True, capture_output=True)
    rec = json.loads(out.read_text())
    assert rec["kind"] == "ncu_step" and rec["device"] == "NVIDIA H200"
    assert rec["reports"][0]["kernels"][0]["duration_ns"] == pytest.approx(1000.0)
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr and "Traceback" not in r.stderr


def test_a_file_that_is_no_raw_page_is_one_error_line(tmp_path):
    p = tmp_path / "raw.csv"
    p.write_text("no csv here\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "summary", str(p), "--out",
                        str(tmp_path / "o.json")], check=False, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "no ncu raw CSV header" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.json").exists()
