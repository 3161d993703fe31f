"""Threshold tables: the shareable JSON artifact of ``sparsify profile`` (docs/tables.md).

A table holds, for one model file, one threshold per sparsifiable tensor per sparsity level
(score quantiles on a calibration text), the model's fingerprint (so a table is refused by any
other model or quantization), how it was made, and any per-tensor allocations for model-wide
targets. The JSON Schema is ``sparsify/schema/threshold-table.schema.json``; :meth:`load`
checks everything the schema says and more (every tensor present, thresholds finite,
non-negative and non-decreasing in level), refusing a bad file with a one-line SparsifyError.

Files are deterministic: sorted keys, numbers as Python's shortest round-trip ``repr``,
thresholds rounded to float32 (the precision the kernels compare in), no timestamps, so the
same model, text and options give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PROJECTIONS
from .errors import SparsifyError

SCHEMA_VERSION = 1
CRITERIA = ("magnitude", "weight-aware")
# The grid every table must cover (0.00 .. 0.95 step 0.05); finer grids are welcome.
REQUIRED_LEVELS = tuple(round(0.05 * i, 2) for i in range(20))
# Profile's grid: 0.00 .. 0.99 step 0.01, fine enough for per-tensor allocation.
DEFAULT_LEVELS = tuple(round(0.01 * i, 2) for i in range(100))

_PROJ_RE = re.compile(r"blk\.(\d+)\.(" + "|".join(PROJECTIONS) + r")\.weight")
_DIM_KEYS = ("n_layer", "d_model", "d_ff", "n_head", "n_head_kv", "head_dim", "head_dim_v",
             "vocab_size")
_PROVENANCE_KEYS = {"corpus": str, "corpus_sha256": str, "tokens": int, "seq_len": int,
                    "seed": int, "sparsify_version": str}
_TOP_KEYS = ("allocations", "criterion", "fingerprint", "levels", "provenance",
             "schema_version", "thresholds")

# llama.cpp's file types (llama.h: enum llama_ftype), for general.file_type.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}


class _Invalid(Exception):
    """A problem found while validating a table; becomes a SparsifyError naming the file."""


# Real tables are a few hundred KiB (a 32-block model with allocations stays under 2 MiB);
# anything far larger is not a table, and is refused before it is parsed.
MAX_TABLE_BYTES = 32 << 20


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """JSON object hook: a key given twice is an error, not "the last one wins"."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Invalid(f"duplicate key {_show(k)!r} in a JSON object")
        out[k] = v
    return out


def _show(text: str) -> str:
    """``text`` safe for a one-line terminal message: escapes for anything not printable."""
    return text if text.isprintable() and text.isascii() else ascii(text)[1:-1]


def _num(v: Any) -> float | None:
    """A JSON number as float (huge integers become inf); None for anything else."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf


# ---- fingerprint -------------------------------------------------------------------------

# In-process memo of data hashes, keyed by what identifies the file's current bytes. A file
# rewritten in place gets a new mtime (and usually size), so the key changes with it; nothing
# is kept across processes.
_HASHES: dict[tuple, str] = {}


def data_sha256(gguf) -> str:
    """sha256 of the file's tensor data region (``gguf.data_offset`` to the end of the file).

    Read with plain reads, not through the memory map, so hashing does not grow the process's
    resident memory by the model's size.
    """
    path = Path(gguf.path)
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           gguf.data_offset)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(gguf.data_offset)
            while block := f.read(1 << 23):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def file_type(gguf) -> str:
    """The file's quantization label (Q4_K_M, Q8_0, F16, ...).

    From ``general.file_type``; without it, the most common type among the block projections.
    """
    ft = gguf.metadata.get("general.file_type")
    if isinstance(ft, (int, np.integer)) and int(ft) in _FILE_TYPES:
        return _FILE_TYPES[int(ft)]
    counts: dict[str, int] = {}
    for name, info in gguf.tensors.items():
        if _PROJ_RE.fullmatch(name):
            counts[info.type_name] = counts.get(info.type_name, 0) + 1
    return max(sorted(counts), key=counts.__getitem__) if counts else "unknown"


def fingerprint(loaded) -> dict:
    """What identifies a model file: architecture, dims, tensors, file type, data sha256.

    ``loaded`` is a :class:`sparsify.loader.Loaded`. Hashes the tensor data once per process
    per file state (about 1 s per GB).
    """
    g, cfg = loaded.gguf, loaded.cfg
    return {
        "architecture": cfg.arch,
        "name": str(g.metadata.get("general.name", "")),
        "file_type": file_type(g),
        "dims": {k: int(getattr(cfg, k)) for k in _DIM_KEYS},
        "tensors": {name: {"shape": [int(d) for d in info.shape], "type": info.type_name}
                    for name, info in sorted(g.tensors.items())},
        "data_sha256": data_sha256(g),
    }


def projection_names(fp: dict) -> list[str]:
    """Sparsifiable tensors of a fingerprint (``blk.3.ffn_down``), in block, then model order."""
    found = []
    for name in fp["tensors"]:
        m = _PROJ_RE.fullmatch(name)
        if m:
            found.append((int(m.group(1)), PROJECTIONS.index(m.group(2)), name[:-len(".weight")]))
    return [n for _, _, n in sorted(found)]


def _fingerprint_mismatch(made: dict, this: dict, model_path: str) -> str | None:
    """One line saying how fingerprint ``made`` (the table's) differs from ``this``, or None."""
    where = f"model file {Path(model_path).name}"
    if made["architecture"] != this["architecture"]:
        return (f"table made for a {_show(made['architecture'])} model, {where} is "
                f"{this['architecture']}")
    for k in _DIM_KEYS:
        if made["dims"][k] != this["dims"][k]:
            return f"table made for {k} {made['dims'][k]}, {where} has {this['dims'][k]}"
    mt, tt = made["tensors"], this["tensors"]
    missing = sorted(set(mt) - set(tt))
    if missing:
        return f"table made for a model with tensor {_show(missing[0])}, which {where} lacks"
    extra = sorted(set(tt) - set(mt))
    if extra:
        return f"{where} has tensor {extra[0]}, which the table's model lacks"
    for name in sorted(mt):
        a, b = mt[name], tt[name]
        if a["type"] != b["type"]:
            if made["file_type"] != this["file_type"]:
                return (f"table made for {_show(made['file_type'])}, "
                        f"{where} is {this['file_type']} "
                        f"({name}: {_show(a['type'])} vs {b['type']})")
            return f"table made for {name} in {_show(a['type'])}, {where} has {b['type']}"
        if a["shape"] != b["shape"]:
            return f"table made for {name} of shape {a['shape']}, {where} has {b['shape']}"
    if made["data_sha256"] != this["data_sha256"]:
        return (f"table made for other weights of the same shapes and types (tensor data "
                f"sha256 {made['data_sha256'][:12]}…, {where} has {this['data_sha256'][:12]}…)")
    return None


# ---- the table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdTable:
    """Per-tensor thresholds on a grid of sparsity levels, for one model file.

    ``thresholds[name][j]`` zeroes a fraction ``levels[j]`` of tensor ``name``'s input entries
    on the calibration text (``score <= threshold``). ``allocations[method][target]`` maps
    tensor names to levels for a model-wide target (``target`` formatted ``"0.50"``).
    ``source`` is the file the table was loaded from (for messages; not part of the table).
    """

    schema_version: int
    fingerprint: dict
    provenance: dict
    criterion: str
    levels: list[float]
    thresholds: dict[str, list[float]]
    allocations: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    # ---- reading and writing ----------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> ThresholdTable:
        """Read and validate a table file; SparsifyError (one line, naming the file) if bad."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_TABLE_BYTES + 1)
        except FileNotFoundError:
            raise SparsifyError("no such table file", p) from None
        except IsADirectoryError:
            raise SparsifyError("is a directory, not a table file", p) from None
        except OSError as e:
            raise SparsifyError(f"cannot read table: {e.strerror}", p) from None
        if len(raw) > MAX_TABLE_BYTES:
            raise SparsifyError(f"not a threshold table: larger than {MAX_TABLE_BYTES >> 20} MiB",
                                p)
        try:
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise SparsifyError("not a threshold table (not UTF-8 text)", p) from None
        except json.JSONDecodeError as e:
            raise SparsifyError(f"not a threshold table: invalid JSON at line {e.lineno} column "
                                f"{e.colno} ({e.msg}; truncated?)", p) from None
        except _Invalid as e:
            raise SparsifyError(f"not a threshold table: {e}", p) from None
        except RecursionError:
            raise SparsifyError("not a threshold table: invalid JSON, nested too deeply",
                                p) from None
        except ValueError as e:  # e.g. an integer literal with thousands of digits
            raise SparsifyError(f"not a threshold table: invalid JSON ({_show(str(e))[:80]})",
                                p) from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> ThresholdTable:
        """Validate parsed JSON; raises SparsifyError (naming ``source``) if anything is wrong."""
        try:
            return _validate(data, source)
        except _Invalid as e:
            raise SparsifyError(str(e), source) from None

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
            "criterion": self.criterion,
            "levels": list(self.levels),
            "thresholds": self.thresholds,
            "allocations": self.allocations,
        }

    def to_json(self) -> str:
        """The file's text: sorted keys, short containers on one line, ends with a newline."""
        return _dumps(self.to_dict()) + "\n"

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write atomically (temp file, then rename); an existing file needs ``force``."""
        ThresholdTable.from_dict(self.to_dict(), str(path))  # never write what load refuses
        write_atomic(path, self.to_json().encode("utf-8"), force)

    # ---- use ----------------------------------------------------------------------------

    def check(self, loaded) -> None:
        """SparsifyError (one line, what differs) unless the table was made for ``loaded``."""
        why = _fingerprint_mismatch(self.fingerprint, fingerprint(loaded), str(loaded.path))
        if why is not None:
            raise SparsifyError(why, self.source)

    @property
    def names(self) -> list[str]:
        """Tensor names in block, then model order."""
        return projection_names(self.fingerprint)

    def threshold(self, name: str, level: float) -> float:
        """Threshold of ``name`` at ``level``, linear between grid levels.

        Level 1 (zero every input) gives ``inf``; levels between the grid's last and 1 are
        refused, since the text says nothing about them.
        """
        ts = self.thresholds.get(name)
        if ts is None:
            raise SparsifyError(f"table has no tensor {name}", self.source)
        level = float(level)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"sparsity level must lie in [0, 1], got {level}")
        if level >= 1.0:
            return math.inf
        if level > self.levels[-1] + 1e-9:
            raise SparsifyError(f"sparsity {level:g} lies beyond the table's levels (up to "
                                f"{self.levels[-1]:g})", self.source)
        return float(np.interp(level, self.levels, ts))

    def thresholds_at(self, sparsity: float, method: str = "uniform") -> dict[str, float]:
        """Every tensor's threshold for a model-wide ``sparsity``.

        ``uniform``: every tensor at ``sparsity``; otherwise the levels stored in
        ``allocations[method]`` for that target. SparsifyError if the table has none.
        """
        if method == "uniform":
            return {n: self.threshold(n, sparsity) for n in self.thresholds}
        allocs = self.allocations.get(method)
        if allocs is None:
            have = ", ".join(["uniform", *sorted(self.allocations)])
            raise SparsifyError(f"table has no {method!r} allocation (it has: {have})",
                                self.source)
        key = target_key(sparsity)
        if key not in allocs or abs(float(key) - sparsity) > 1e-9:
            have = ", ".join(sorted(allocs)) or "none"
            raise SparsifyError(f"table has no {method} allocation for sparsity {sparsity:g} "
                                f"(targets: {have})", self.source)
        return {n: self.threshold(n, lvl) for n, lvl in allocs[key].items()}

    def with_allocations(self, method: str, allocs: dict[str, dict[str, float]]
                         ) -> ThresholdTable:
        """A copy with ``allocations[method]`` replaced by ``allocs`` (target -> name -> level).

        Targets may be floats or strings; they are stored as ``"0.50"``. Raises ValueError if a
        name or level does not fit the table.
        """
        if not isinstance(method, str) or not method or method == "uniform":
            raise ValueError(f"allocation method must be a non-empty name other than "
                             f"'uniform', got {method!r}")
        clean: dict[str, dict[str, float]] = {}
        for target, per in allocs.items():
            key = target_key(float(target))
            clean[key] = {}
            for name, lvl in per.items():
                if name not in self.thresholds:
                    raise ValueError(f"allocation {method} {key} names unknown tensor {name}")
                lvl = float(lvl)
                if not 0.0 <= lvl <= 1.0:
                    raise ValueError(f"allocation {method} {key}: level {lvl} of {name} is "
                                     f"outside [0, 1]")
                clean[key][name] = lvl
        return dataclasses.replace(self, allocations={**self.allocations, method: clean})


def target_key(sparsity: float) -> str:
    """How a model-wide target is written in ``allocations``: two decimals, ``"0.50"``."""
    return f"{float(sparsity):.2f}"


def write_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename.

    Nothing is left behind if writing fails or is interrupted; an existing file is kept unless
    ``force``. SparsifyError for a missing directory or an existing file.
    """
    p = Path(path)
    if p.is_dir():
        raise SparsifyError("is a directory", p)
    if p.exists() and not force:
        raise SparsifyError("exists; pass --force to overwrite it", p)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SparsifyError(f"directory {parent} does not exist", p)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(obj: Any, indent: int = 0) -> str:
    """Deterministic JSON: sorted keys; a container whose one-line form fits 100 columns (or
    a list of numbers, however long) stays on one line, others open one item per line."""
    flat = json.dumps(obj, sort_keys=True, allow_nan=False, ensure_ascii=False)
    scalars = isinstance(obj, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in obj)
    if not isinstance(obj, (dict, list)) or scalars or indent + len(flat) <= 100 or not obj:
        return flat
    pad = " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dumps(obj[k], indent + 1)}"
                 for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _dumps(x, indent + 1) for x in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


# ---- validation --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _keys(obj: Any, what: str, required: tuple[str, ...] | list[str] | set[str],
          optional: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, dict):
        raise _Invalid(f"{what} must be a JSON object")
    missing = sorted(set(required) - set(obj))
    if missing:
        raise _Invalid(f"{what} lacks {missing[0]!r} (truncated or hand-edited?)")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _Invalid(f"{what} has unknown key {unknown[0]!r}")


def _validate(data: Any, source: str | None) -> ThresholdTable:
    if not isinstance(data, dict):
        raise _Invalid("not a threshold table (not a JSON object)")
    if "schema_version" not in data:
        raise _Invalid("not a threshold table (no schema_version)")
    version = data["schema_version"]
    if version != SCHEMA_VERSION or not _is_int(version):
        raise _Invalid(f"unsupported schema_version {version!r} (this sparsify reads "
                       f"{SCHEMA_VERSION})")
    _keys(data, "table", _TOP_KEYS)

    fp = data["fingerprint"]
    _keys(fp, "fingerprint", ("architecture", "name", "file_type", "dims", "tensors",
                              "data_sha256"))
    for k in ("architecture", "name", "file_type"):
        if not isinstance(fp[k], str):
            raise _Invalid(f"fingerprint.{k} must be a string")
    if not (isinstance(fp["data_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}",
                                                                fp["data_sha256"])):
        raise _Invalid("fingerprint.data_sha256 must be 64 lowercase hex digits")
    _keys(fp["dims"], "fingerprint.dims", _DIM_KEYS)
    for k in _DIM_KEYS:
        if not _is_int(fp["dims"][k]) or fp["dims"][k] < 1:
            raise _Invalid(f"fingerprint.dims.{k} must be a positive integer")
    if not isinstance(fp["tensors"], dict) or not fp["tensors"]:
        raise _Invalid("fingerprint.tensors must be a non-empty object")
    for name, t in fp["tensors"].items():
        _keys(t, f"fingerprint.tensors[{name!r}]", ("shape", "type"))
        if (not isinstance(t["shape"], list) or not t["shape"]
                or not all(_is_int(d) and d > 0 for d in t["shape"])):
            raise _Invalid(f"fingerprint.tensors[{name!r}].shape must be a list of positive "
                           f"integers")
        if not isinstance(t["type"], str):
            raise _Invalid(f"fingerprint.tensors[{name!r}].type must be a string")

    prov = data["provenance"]
    _keys(prov, "provenance", tuple(_PROVENANCE_KEYS))
    for k, kind in _PROVENANCE_KEYS.items():
        ok = _is_int(prov[k]) if kind is int else isinstance(prov[k], kind)
        if not ok:
            raise _Invalid(f"provenance.{k} must be {'an integer' if kind is int else 'a string'}")

    criterion = data["criterion"]
    if criterion not in CRITERIA:
        raise _Invalid(f"unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")

    levels = data["levels"]
    if not isinstance(levels, list) or any(_num(x) is None for x in levels):
        raise _Invalid("levels must be a list of numbers")
    levels = [_num(x) for x in levels]
    if not all(math.isfinite(x) for x in levels):
        raise _Invalid("levels must be finite numbers")
    if not levels or levels[0] != 0.0:
        raise _Invalid("levels must start at 0")
    for a, b in itertools.pairwise(levels):
        if not b > a:
            raise _Invalid(f"levels are not ascending ({a:g} then {b:g})")
    if not levels[-1] < 1.0:
        raise _Invalid(f"levels must stay below 1, got {levels[-1]:g}")
    grid = np.asarray(levels)
    for need in REQUIRED_LEVELS:
        if np.abs(grid - need).min() > 1e-9:
            raise _Invalid(f"levels lack {need:.2f} (a table covers at least 0.00 to 0.95 in "
                           f"steps of 0.05)")

    names = projection_names(fp)
    th = data["thresholds"]
    if not isinstance(th, dict):
        raise _Invalid("thresholds must be a JSON object")
    unknown = sorted(set(th) - set(names))
    if unknown:
        raise _Invalid(f"thresholds for {_show(unknown[0])}, which the fingerprint's model "
                       f"lacks")
    thresholds: dict[str, list[float]] = {}
    for name in names:
        ts = th.get(name)
        if ts is None:
            raise _Invalid(f"no thresholds for {name} (truncated or hand-edited?)")
        if not isinstance(ts, list) or len(ts) != len(levels):
            n = len(ts) if isinstance(ts, list) else "no list of"
            raise _Invalid(f"{name} has {n} thresholds for {len(levels)} levels")
        prev = 0.0
        values = []
        for lvl, raw_t in zip(levels, ts):
            t = _num(raw_t)
            if t is None or math.isnan(t):
                raise _Invalid(f"{name}: threshold at level {lvl:.2f} is "
                               f"{_show(repr(raw_t))[:40]}, not a number")
            if not math.isfinite(t) or t < 0:
                raise _Invalid(f"{name}: threshold at level {lvl:.2f} is {t!r}; thresholds "
                               f"are finite and non-negative")
            if t < prev:
                raise _Invalid(f"{name}: threshold decreases at level {lvl:.2f} ({prev!r} "
                               f"then {t!r})")
            prev = t
            values.append(t)
        thresholds[name] = values

    allocations = data["allocations"]
    if not isinstance(allocations, dict):
        raise _Invalid("allocations must be a JSON object")
    for method, per_target in allocations.items():
        if method == "uniform" or not method:
            raise _Invalid(f"allocation method may not be named {method!r}")
        if not isinstance(per_target, dict):
            raise _Invalid(f"allocations.{_show(method)} must be a JSON object")
        for target, per in per_target.items():
            try:
                ok = target == target_key(float(target)) and 0.0 <= float(target) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                raise _Invalid(f"allocations.{_show(method)}: target {target!r} is not a level "
                               f"written like \"0.50\"")
            if not isinstance(per, dict):
                raise _Invalid(f"allocations.{_show(method)}.{target} must be a JSON object")
            for name, lvl in per.items():
                if name not in thresholds:
                    raise _Invalid(f"allocations.{_show(method)}.{target} names unknown tensor "
                                   f"{_show(name)}")
                v = _num(lvl)
                if v is None or not 0.0 <= v <= 1.0:
                    raise _Invalid(f"allocations.{_show(method)}.{target}: level of "
                                   f"{_show(name)} is {_show(repr(lvl))[:40]}, not in [0, 1]")
    return ThresholdTable(schema_version=version, fingerprint=fp, provenance=prov,
                          criterion=criterion, levels=levels, thresholds=thresholds,
                          allocations=allocations, source=source)


# ---- commands ----------------------------------------------------------------------------

def _block_rows(table: ThresholdTable, sparsity: float) -> list[str]:
    """Thresholds at ``sparsity`` as a text table: one row per block, one column per projection."""
    at = table.thresholds_at(sparsity)
    blocks: dict[int, dict[str, float]] = {}
    for name, t in at.items():
        _, i, proj = name.split(".")
        blocks.setdefault(int(i), {})[proj] = t
    cols = [p for p in PROJECTIONS if any(p in b for b in blocks.values())]
    width = max(11, *(len(c) + 1 for c in cols))
    head = "block" + "".join(c.rjust(width) for c in cols)
    rows = [head]
    for i in sorted(blocks):
        cells = [f"{blocks[i][c]:.4g}" if c in blocks[i] else "-" for c in cols]
        rows.append(f"{i:5d}" + "".join(x.rjust(width) for x in cells))
    return rows


def describe(table: ThresholdTable, sparsity: float) -> str:
    """Human-readable summary: model, provenance, levels, allocations, thresholds per block."""
    fp, pv, d = table.fingerprint, table.provenance, table.fingerprint["dims"]
    lv = table.levels
    steps = sorted({round(b - a, 6) for a, b in itertools.pairwise(lv)})
    grid = (f"{len(lv)}: {lv[0]:.2f} to {lv[-1]:.2f} step {steps[0]:g}" if len(steps) == 1
            else f"{len(lv)}: {', '.join(f'{x:g}' for x in lv)}")
    allocs = "; ".join(f"{m}: {' '.join(sorted(per))}" for m, per in sorted(
        table.allocations.items())) or "none"
    lines = [
        f"model        {fp['name'] or '(unnamed)'}",
        (f"             {fp['architecture']}, {fp['file_type']}; {d['n_layer']} blocks, "
         f"d_model {d['d_model']}, d_ff {d['d_ff']}, heads {d['n_head']}/{d['n_head_kv']}, "
         f"vocab {d['vocab_size']}; tensor data sha256 {fp['data_sha256'][:16]}…"),
        f"criterion    {table.criterion}",
        f"corpus       {pv['corpus']} (sha256 {pv['corpus_sha256'][:16]}…)",
        (f"calibration  {pv['tokens']} tokens in sequences of {pv['seq_len']}, seed "
         f"{pv['seed']}; sparsify {pv['sparsify_version']}"),
        f"levels       {grid}",
        f"allocations  {allocs}",
        "",
        f"thresholds at sparsity {sparsity:.2f} ({len(table.thresholds)} tensors)",
        *_block_rows(table, sparsity),
    ]
    return "\n".join(lines)


def plot(table: ThresholdTable, sparsity: float) -> bytes:
    """PNG bytes: threshold at ``sparsity`` per block, one line per projection (log scale)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    at = table.thresholds_at(sparsity)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = ["-", "--", ":", "-", "-", "--", "-"]
    for proj, style in zip(PROJECTIONS, styles):
        pts = sorted((int(n.split(".")[1]), t) for n, t in at.items() if n.endswith("." + proj))
        if pts:
            ax.plot([i for i, _ in pts], [t for _, t in pts], style, marker=".", label=proj)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    score = "|x|" if table.criterion == "magnitude" else "|x|·‖W[:, i]‖"
    ax.set_ylabel(f"threshold on {score}")
    name = table.fingerprint["name"] or table.fingerprint["architecture"]
    ax.set_title(f"{name}: thresholds at sparsity {sparsity:.2f} ({table.criterion})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_show(table_path: str, sparsity: float, plot_path: str | None, force: bool) -> None:
    """``sparsify table show``: summary to stdout, optional PNG plot to ``plot_path``."""
    import click

    table = ThresholdTable.load(table_path)
    if plot_path is not None and Path(plot_path).exists() and not force:
        raise SparsifyError("exists; pass --force to overwrite it", plot_path)
    text = describe(table, sparsity)
    click.echo(text)
    if plot_path is not None:
        write_atomic(plot_path, plot(table, sparsity), force)
        click.echo(f"wrote {plot_path}", err=True)


def run_check(table_path: str, model: str) -> None:
    """``sparsify table check``: returns (exit 0) only if the table fits the model."""
    import click

    from .loader import load

    table = ThresholdTable.load(table_path)
    loaded = load(model)
    table.check(loaded)
    click.echo(f"ok: {table_path} fits {loaded.path}")
