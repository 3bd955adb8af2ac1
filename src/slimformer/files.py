"""Writing files and folders so that a crash leaves the old content or the new, never a half.

Every write a reader may see half-done goes through here: a file's text (`write_atomic`), a
folder swapped in for another (`replace_dir`), a folder published once into a shared cache
(`publish_dir`). And where the user's cache lives (`cache_dir`), which modules below `assets`
(the GEMM timings of `factorize.lowrank`) use too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; ours are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap `tmp` into `out` so readers see the old folder or the new one, never half."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder `tmp` to `target` unless another process published one first
    (theirs is as good as ours: cache entries are built the same way everywhere)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
