"""Shared test set-up.

`tests/` is on sys.path (pytest's default rootdir-less conftest import), so test modules can
`import tiny` for the tiny random-model builders.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run torch on one thread for the module's tests, then restore the setting.

    Tiny models spend their time in OpenMP start-up and spinning, not arithmetic: on a shared
    2-core machine one thread is tens of times faster than two.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def fault_pass(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`test.fault` (faulty_passes.py) registered in this process and importable in the study's
    children (tests/ on their PYTHONPATH); unregistered afterwards, so no other test sees it."""
    from slimformer.passes import base

    paths = [_TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    importlib.import_module("faulty_passes")
    try:
        yield
    finally:
        base._REGISTRY.pop("test.fault", None)
        sys.modules.pop("faulty_passes", None)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT saved as a checkpoint folder (an embedding model), its embedding
    task's reference arrays already in the cache (as for any model studied before), so that
    a study's set-up takes the same few seconds in every test."""
    import tiny

    from slimformer.checkpoint import save_model
    from slimformer.tasks import TaskSpec, reference_state

    model = save_model(tiny.tiny_bert(), tmp_path_factory.mktemp("models") / "tiny-bert")
    reference_state(model, TaskSpec("embedding"))
    return model
