"""Writing files so that a crash leaves the old content or the new, never a half; reading
files a user or a crash may have damaged, with the reason when they cannot be read."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


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
