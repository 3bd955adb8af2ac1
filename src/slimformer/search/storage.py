"""Where a study's trials are kept: an Optuna storage named by a URL.

sqlite:///PATH           the default, `study.db` in the run folder (one machine)
postgresql://USER@HOST:PORT/DB   (or mysql://…) a database server every worker reaches
journal:///PATH          Optuna's JournalStorage on a file, for a filesystem the workers
                         share (NFS and the like: it appends, with a lock file beside it)

The same URL is what `slimformer worker` is given to join the study from another machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from slimformer.errors import SlimformerError

SCHEMES = ("sqlite", "postgresql", "mysql", "journal")
JOURNAL = "journal://"


def is_url(text: str) -> bool:
    return "://" in str(text)


def shown(url: str) -> str:
    """The URL without its password, for messages and run.json."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def check_url(url: str) -> str:
    """`url` if its scheme is one a study can live in, else the one-line error."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if is_url(url) else ""
    if scheme not in SCHEMES:
        raise SlimformerError(
            f"--storage {shown(url)!r} is not a storage URL; give sqlite:///PATH, "
            "postgresql://USER@HOST/DB or journal:///PATH"
        )
    if scheme == "journal" and not url[len(JOURNAL) :]:
        raise SlimformerError("--storage journal:// needs a file, e.g. journal:///shared/study.log")
    return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage behind `url`, connected: a server that cannot be reached is said here, in
    one line, before anything of a study is written."""
    check_url(url)
    try:
        if url.startswith(JOURNAL):
            # journal:///abs/path has the path after the two slashes; journal://rel/path too.
            path = Path(url[len(JOURNAL) :])
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        # pool_pre_ping: a worker that waited long on a trial finds its connection dropped by
        # the server; it reconnects instead of failing the trial's tell.
        kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as error:
        # Optuna wraps the driver's ModuleNotFoundError, which names the module.
        missing = getattr(error.__cause__, "name", None) or error.name or "its database driver"
        raise SlimformerError(
            f"the storage {shown(url)} needs {missing}, which is not installed; "
            "pip install 'slimformer[distributed]'"
        ) from None
    except Exception as error:  # sqlalchemy's and the drivers' own errors, without a base
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimformerError(
            f"cannot open the storage {shown(url)}: {reason[:200]}; check that it is "
            "reachable and the URL is right"
        ) from None
