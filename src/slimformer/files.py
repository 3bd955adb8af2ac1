"""Writing files and folders so that a crash leaves the old content or the new, never a half,
and reading files a user or a crash may have damaged, with the reason when they cannot be read.

Every write a reader may see half-done goes through here: a file's text (`write_atomic`), a
folder swapped in for another (`replace_dir`), a folder published once into a shared cache
(`publish_dir`). And where the user's cache lives (`cache_dir`), which modules below `assets`
(the GEMM timings of `factorize.lowrank`) use too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml


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


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) so readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
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


def read_text(path: Path) -> str:
    """The text of `path`; ValueError with a reason that reads after the path ("... is not
    UTF-8 text") when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or type(error).__name__})") from None


def parse_json(text: str) -> Any:
    """JSON; ValueError with a reason (as `read_text`'s) for text that is not JSON or is
    nested too deeply to parse (which would otherwise raise RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError:
        raise ValueError("is not valid JSON") from None


def read_json(path: Path) -> Any:
    return parse_json(read_text(path))


def read_yaml(path: Path) -> Any:
    """YAML (safe tags only); ValueError with a reason, as `read_text`'s."""
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"is not valid YAML{where}") from None
