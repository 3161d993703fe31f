"""scripts/step_timeline_cuda.py's trace reading, on hand-made traces (no GPU needed)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tl(script_module):
    return script_module("step_timeline_cuda")


def block(i: int) -> list[str]:
    return [f"gemv_kernel<qkv{i}>", "attention_kernel", f"gemv_kernel<o{i}>",
            f"gemv_kernel<gu{i}>", f"gemv_kernel<down{i}>"]


def test_kernel_events_keep_only_kernels_in_start_order(tl, tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "ph": "X", "name": "b", "ts": 10.0, "dur": 2.0},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 5.0},
        {"cat": "kernel", "ph": "X", "name": "a", "ts": 3.5, "dur": 1.0},
        {"cat": "kernel", "ph": "i", "name": "marker", "ts": 4.0},
    ]}))
    assert tl.kernel_events(trace) == [(3.5, 4.5, "a"), (10.0, 12.0, "b")]


def test_replays_split_at_idle_gaps(tl):
    ks = [(0, 5, "a"), (4, 9, "b"), (10, 11, "c"),          # overlapping, then a 1 µs gap
          (2000, 2001, "a"), (2001, 2003, "b"), (2003, 2004, "c")]
    reps = tl.split_replays(ks, gap_us=500)
    assert [len(r) for r in reps] == [3, 3]
    assert reps[1][0][0] == 2000


def test_roles_follow_the_folded_block_pattern(tl):
    names = ["index_select"] + block(0) + block(1) + ["gemv_kernel<head>", "argmax"]
    roles = tl.roles_of(names)
    assert roles[0] == "other" and roles[-1] == "other" and roles[-2] == "head"
    assert roles[1:11] == list(tl.ROLES) * 2


def test_roles_refuse_another_step(tl):
    # the unfolded step has norm kernels between the GEMVs: no per-role summary for it
    names = ["gemv_kernel<qkv>", "attention_kernel", "gemv_kernel<o>", "add_rms_norm_kernel",
             "gemv_kernel<gu>", "gemv_kernel<down>"]
    with pytest.raises(ValueError, match="five-launch"):
        tl.roles_of(names)
    with pytest.raises(ValueError, match="five-launch"):
        tl.roles_of(["attention_kernel", "gemv_kernel<o>"])
