"""One study per run folder: an exclusive lock that a second `optimize` on the folder meets.

The lock is `fcntl.flock` on the run folder itself (a directory can be flocked on Linux),
held for the study's whole life. The kernel releases it when its process dies however it
dies, so a lock left by a killed study is simply taken over, and a refused command leaves no
file behind. While a study runs, `study.pid` names its process for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from slimformer.errors import SlimformerError

PID_FILE = "study.pid"


class RunLock:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the folder if needed and take its lock, or say which process holds it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise SlimformerError(
                f"--out {self.folder} is a file, not a folder; choose another --out"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise SlimformerError(
                f"cannot create the run folder {self.folder}: {error.strerror}; "
                "choose another --out"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SlimformerError(
                f"{self.folder} is in use by a running study (pid {self.holder()}); wait for "
                "it to finish, or choose another --out"
            ) from None
        self._fd = fd

    def holder(self) -> str:
        try:
            return (self.folder / PID_FILE).read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def announce(self) -> None:
        """Name this process as the folder's study (once the folder is known to be ours)."""
        (self.folder / PID_FILE).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.folder / PID_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def clear_folder(folder: Path) -> None:
    """Empty a run folder for --overwrite. The folder itself stays: it is what is locked."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
