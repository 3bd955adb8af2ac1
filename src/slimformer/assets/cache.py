"""Where offline assets are cached, and how installed packages that ship them are found."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimformer.files import cache_dir


def data_dir() -> Path:
    return cache_dir() / "data"


def package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
