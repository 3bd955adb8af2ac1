"""Where offline assets are cached, and how installed packages that ship them are found."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """$SLIMFORMER_CACHE, else $XDG_CACHE_HOME/slimformer, else ~/.cache/slimformer (created)."""
    if env := os.environ.get("SLIMFORMER_CACHE"):
        root = Path(env).expanduser()
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        root = Path(xdg).expanduser() / "slimformer"
    else:
        root = Path.home() / ".cache" / "slimformer"
    root.mkdir(parents=True, exist_ok=True)
    return root


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
