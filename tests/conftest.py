"""Shared fixtures: seeds, the bundled models (fetched once into the user cache), loaded models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

BUNDLED_NAMES = ("smollm2-135m", "gemma3-270m")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A per-test seed derived from the test's name: fresh data per test, reproducible runs."""
    return _stable_seed(request.node.nodeid)


def _stable_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def one_thread_for_tiny(request: pytest.FixtureRequest):
    """Tests that use a ``tiny`` synthetic model run on one torch thread: its products are too
    small to share among threads, and the thread pool's synchronisation then costs more than
    the work (10x on a busy machine). A module opts in with ``pytest.mark.usefixtures``."""
    if "tiny" not in request.fixturenames:
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def script_module():
    """A file of scripts/ imported as a module by name (scripts/ is not a package)."""

    def get(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return get


@pytest.fixture(scope="session")
def model_path():
    """Path of a bundled model by name, fetched (and sha256-checked) once per machine."""
    from sparsify.bundled import fetch

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = fetch(name, quiet=True)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def loaded(model_path):
    """A :class:`sparsify.loader.Loaded` per bundled model, shared by the whole session."""
    from sparsify.loader import load

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(model_path(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def torch_model(loaded):
    """A dense float32 CPU model per bundled model (weights dequantized once per session)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = loaded(name).model()
        return cache[name]

    return get
