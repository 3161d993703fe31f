"""Every command on hostile input: exit code 1, exactly one ``error:`` line on stderr, no
traceback, and no output or temp file left behind, also when interrupted with Ctrl-C.

Most cases run ``sparsify.cli.main`` in-process (the whole corpus, every command); a few run
``python -m sparsify.cli`` in a subprocess for the end-to-end guarantee: real stderr, real exit
code, a real SIGINT.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import gguf_cases, make_bases, table_cases, valid_table

from sparsify import cli
from sparsify.loader import load

GGUF = [c for c in gguf_cases() if c.stage != "ok"]
TABLES = [c for c in table_cases() if c.stage != "ok"]
# What needs more than the header: the tokenizer, or the weights.
NEEDS_MODEL = ("generate", "profile", "eval", "bench", "allocate")
TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the "
        "worst of times; in the beginning was the word, and the word was short.\n\n") * 40


@pytest.fixture(scope="module")
def env(tmp_path_factory, model_path):
    """Case files, a valid table for the mini model, and a short text, in one directory."""
    root = tmp_path_factory.mktemp("hostile-cli")
    bases = make_bases(root / "bases", model_path("smollm2-135m"))
    mini = root / "bases" / "base-mini.gguf"
    loaded = load(mini)
    table = root / "mini.table.json"
    valid_table(loaded, np.random.default_rng(0)).save(table)
    text = root / "text.txt"
    text.write_text(TEXT)
    return {"root": root, "bases": bases, "mini": mini, "loaded": loaded, "table": table,
            "text": text}


def run(argv: list, capsys) -> tuple[int, str, str]:
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error(code: int, err: str, match: str = "") -> str:
    """Exit 1, one ``error:`` line (the last line of stderr), printable, no traceback."""
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [x for x in re.split(r"[\r\n]", err) if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].isprintable(), errors[0]
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


def snapshot(*dirs: Path) -> set[Path]:
    return {p for d in dirs for p in d.rglob("*")}


def gguf_commands(model, table, out: Path, text) -> dict[str, list]:
    return {
        "info": ["info", model],
        "generate": ["generate", model, "-p", "hello world", "-n", "2"],
        "profile": ["profile", model, "-o", out / "p.json", "--corpus", text, "--tokens", "64",
                    "--seq-len", "32"],
        "table check": ["table", "check", table, model],
        "eval": ["eval", model, "--table", table, "--sparsity", "0,0.5", "--text", text,
                 "--tokens", "64", "--seq-len", "32", "--json", out / "e.json"],
        "bench": ["bench", model, "--sparsity", "0", "--tokens", "2", "--repeats", "1",
                  "--json", out / "b.json"],
        "allocate": ["allocate", model, table, "-o", out / "a.json", "--corpus", text,
                     "--tokens", "64"],
    }


@pytest.mark.parametrize("case", GGUF, ids=[c.id for c in GGUF])
def test_every_command_refuses_bad_gguf(case, env, tmp_path, capsys):
    bases, root = env["bases"], env["root"]
    if case.base == "real" and bases.real is None:
        pytest.skip("the bundled SmolLM2-135M is not available")
    model = case.write(bases, root / f"{case.id}.gguf")
    table = env["table"]
    if case.stage in ("tokenizer", "weights"):
        # The header loads: give eval and allocate a table that fits, so they get as far as
        # the tokenizer or the weights.
        table = tmp_path / "fits.json"
        loaded = load(model)
        valid_table(loaded, np.random.default_rng(1)).save(table)
        loaded.gguf.close()
    before = snapshot(root, tmp_path)
    for name, argv in gguf_commands(model, table, tmp_path, env["text"]).items():
        code, _, err = run(argv, capsys)
        if case.stage in ("open", "load") or name in NEEDS_MODEL:
            assert_one_error(code, err, case.match)
        else:
            assert code == 0, f"{name}: {err}"
        assert snapshot(root, tmp_path) == before, f"{name} left files behind"


def table_commands(model, table, out: Path, text, plot: bool) -> dict[str, list]:
    return {
        "table show": ["table", "show", table, *(["--plot", out / "t.png"] if plot else [])],
        "table check": ["table", "check", table, model],
        "eval": ["eval", model, "--table", table, "--sparsity", "0.5", "--text", text,
                 "--tokens", "64", "--seq-len", "32", "--json", out / "e.json"],
        "bench": ["bench", model, "--sparsity", "0.5", "--table", table, "--tokens", "2",
                  "--repeats", "1", "--json", out / "b.json"],
        "allocate": ["allocate", model, table, "-o", out / "a.json", "--corpus", text,
                     "--tokens", "64"],
        "generate": ["generate", model, "-p", "hello", "-n", "2", "--table", table,
                     "--sparsity", "0.5"],
    }


@pytest.fixture(scope="module")
def table_env(env, tmp_path_factory):
    from hostile import make_table_bases

    tb, _ = make_table_bases(env["root"] / "bases", np.random.default_rng(2))
    return tb


@pytest.mark.parametrize("case", TABLES, ids=[c.id for c in TABLES])
def test_every_command_refuses_bad_table(case, env, table_env, tmp_path, capsys):
    tb = table_env
    table = tmp_path / "bad.json"
    table.write_bytes(case.make(tb.text, tb.parsed, tb.others))
    before = snapshot(env["root"], tmp_path)
    cmds = table_commands(env["mini"], table, tmp_path, env["text"], case.stage == "load")
    for name, argv in cmds.items():
        code, _, err = run(argv, capsys)
        if case.stage == "check" and name == "table show":
            assert code == 0, err  # show reads the table alone; it never sees the model
        else:
            assert_one_error(code, err, case.match)
        assert snapshot(env["root"], tmp_path) == before, f"{name} left files behind"


def test_bad_paths_and_outputs(env, tmp_path, capsys):
    """Missing files, directories, device files as inputs; outputs that may not be written."""
    mini, table, text = env["mini"], env["table"], env["text"]
    keep = tmp_path / "keep.json"
    keep.write_text("keep me")
    cases = [
        (["info", tmp_path / "nope.gguf"], r"no such file"),
        (["info", tmp_path], r"is a directory"),
        (["info", "/dev/zero"], r"not a GGUF file|truncated"),
        (["info", text], r"not a GGUF file"),
        (["table", "show", tmp_path / "nope.json"], r"no such table file"),
        (["table", "show", "/dev/zero"], r"larger than|not UTF-8|invalid JSON"),
        (["table", "check", mini, mini], r"not UTF-8|invalid JSON"),
        (["profile", mini, "-o", keep, "--corpus", text, "--tokens", "64", "--seq-len", "32"],
         r"exists; pass --force"),
        (["profile", mini, "-o", tmp_path / "no" / "dir.json", "--corpus", text],
         r"does not exist"),
        (["profile", mini, "-o", tmp_path / "p.json", "--corpus", mini, "--tokens", "64"],
         r"not UTF-8"),
        (["eval", mini, "--table", table, "--sparsity", "0.5", "--json", keep],
         r"exists; pass --force"),
        (["bench", mini, "--sparsity", "0", "--json", keep], r"exists; pass --force"),
        (["allocate", mini, table], r"pass --force"),
        (["allocate", mini, table, "-o", keep], r"exists; pass --force"),
        (["table", "show", table, "--plot", keep], r"exists; pass --force"),
    ]
    before = snapshot(env["root"], tmp_path)
    for argv, match in cases:
        code, _, err = run(argv, capsys)
        assert_one_error(code, err, match)
        assert snapshot(env["root"], tmp_path) == before, argv
    assert keep.read_text() == "keep me"
    # click refuses a directory for a file argument as a usage error: exit 2, its usage text.
    for argv in (["table", "show", tmp_path], ["profile", mini, "-o", tmp_path]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "is a directory" in err and "Traceback" not in err, argv


# ---- subprocesses: the real process boundary ------------------------------------------------

def sparsify(*argv, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsify.cli", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_subprocess_errors_are_one_line(env, table_env, tmp_path):
    bases = env["bases"]
    cases = {c.id: c for c in gguf_cases()}
    work = tmp_path / "work"
    work.mkdir()
    magic = cases["magic-zip"].write(bases, work / "zip.gguf")
    nan = cases["nan-ffn-down"].write(bases, work / "nan.gguf")
    tcase = {c.id: c for c in table_cases()}["tensor-escape-name"]
    tb = table_env
    esc = work / "esc.json"
    esc.write_bytes(tcase.make(tb.text, tb.parsed, tb.others))
    runs = [
        (("info", magic), r"zip\.gguf: not a GGUF file"),
        (("table", "show", esc), r"thresholds for \\x1b\[2J, which"),
        (("profile", nan, "--corpus", env["text"], "--tokens", "64", "--seq-len", "32"),
         r"tensor blk\.0\.ffn_down\.weight holds non-finite weights"),
    ]
    before = snapshot(work)
    for argv, match in runs:
        r = sparsify(*argv, cwd=work)
        assert_one_error(r.returncode, r.stderr, match)
        assert snapshot(work) == before, argv


def test_ctrl_c_during_profile_leaves_nothing(tmp_path):
    """SIGINT mid-pass: exit 1, one ``error: interrupted`` line, no table, no temp file.

    A small synthetic model (8 blocks, width 256) profiles 32768 tokens at about half a second
    per block once numba's caches are warm (a 4-block width-48 model finished in 0.4 s and
    outran the signal); the signal goes once the progress bar shows block 2, so that the pass
    is running. A SIGINT that lands inside a ctypes callback (llvmlite's object cache, during
    numba's first-call setup) or a finalizer is dropped by CPython; the next progress step
    raises it again (sparsify.interrupt, and the finalizer test below)."""
    from sparsify.synthetic import preset, write_synthetic_gguf

    spec = preset("tiny", n_layer=8, d_model=256, d_ff=1024, n_head=4, n_head_kv=2)
    write_synthetic_gguf(tmp_path / "small.gguf", spec, threads=1)
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "sparsify.cli", "profile", "small.gguf",
                             "--tokens", "32768", "--seq-len", "256"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    try:
        deadline = time.monotonic() + 120
        while b"blk 2/8" not in err and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 1 << 16)
                if not chunk:
                    break
                err += chunk
        assert b"blk 2/8" in err, err.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err += rest
    assert_one_error(proc.returncode, err.decode(), r"^error: interrupted$")
    assert out == b""
    assert snapshot(tmp_path) == before, sorted(p.name for p in snapshot(tmp_path) - before)


_PROBE = """
import sys

import sparsify.info as info
from sparsify import cli


def interrupted(spec):
    exec("raise KeyboardInterrupt")  # as scipy's lazy imports, run by numba mid-profile, do


info.describe = interrupted
sys.argv = ["sparsify", "info", "x"]
cli.main()
"""


_SWALLOW_PROBE = """
import os
import signal
import sys

from sparsify import cli, profile


class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, inside __del__
            pass


original = profile.HistogramProjector.thresholds
blocks = []


def thresholds(self, levels):
    blocks.append(len(blocks))
    if len(blocks) == 2:
        Finalizer()  # collected at once: CPython reports and drops the KeyboardInterrupt
    return original(self, levels)


profile.HistogramProjector.thresholds = thresholds
sys.argv = ["sparsify", *sys.argv[1:]]
cli.main()
"""


def test_ctrl_c_dropped_by_a_finalizer_still_interrupts(tmp_path):
    """A SIGINT whose KeyboardInterrupt is raised inside a finalizer (CPython drops it, as it
    does inside a ctypes callback) still stops the profile at its next progress step: exit 1,
    one ``error: interrupted`` line, no table, no temp file."""
    from sparsify.synthetic import preset, write_synthetic_gguf

    write_synthetic_gguf(tmp_path / "small.gguf", preset("tiny", n_layer=4), threads=1)
    (tmp_path / "swallowprobe.py").write_text(_SWALLOW_PROBE)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "swallowprobe", "profile", "small.gguf",
                        "--tokens", "256", "--seq-len", "64"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert_one_error(r.returncode, r.stderr, r"^error: interrupted$")
    assert r.stdout == ""
    assert snapshot(tmp_path) == before, sorted(p.name for p in snapshot(tmp_path) - before)


def test_ctrl_c_through_exec_still_exits_1(tmp_path):
    """A KeyboardInterrupt that passed through exec() of a string makes ``python -m`` end by
    SIGINT after a clean sys.exit(1) (CPython keeps a flag from the exec); the CLI exits 1."""
    (tmp_path / "kiprobe.py").write_text(_PROBE)
    r = subprocess.run([sys.executable, "-m", "kiprobe"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
    assert_one_error(r.returncode, r.stderr, r"^error: interrupted$")
