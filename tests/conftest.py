"""Shared test set-up.

`tests/` is on sys.path (pytest's default rootdir-less conftest import), so test modules can
`import tiny` for the tiny random-model builders.
"""

from __future__ import annotations

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
