"""Human-rated sentences from VADER's evaluation sets (Hutto & Gilbert, ICWSM 2014), fetched
once from the vaderSentiment sdist with pip: movie-review snippets (the embedding task's
scored domain), and Amazon review snippets, tweets and New York Times editorial snippets (the
transfer domains no search tunes on). Each sentence carries its mean human sentiment in
[-4, 4]."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from slimformer.assets.cache import data_dir
from slimformer.errors import AssetMissing, SlimformerError
from slimformer.files import publish_dir

REVIEWS_INSTALL = "slimformer assets install movie-reviews"
_REVIEWS_MISSING = (
    "the rated sentences are not installed: run `slimformer assets install` (or `make demo`)"
)
_VADER_REQ = "vaderSentiment==3.3.2"
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
_INNER_DIR = "hutto_ICWSM_2014"
DOMAIN_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "editorials": "nytEditorialSnippets_GroundTruth.txt",
}


def _vader_dir() -> Path:
    return data_dir() / "vader"


def _domain_file(domain: str) -> Path:
    return _vader_dir() / _INNER_DIR / DOMAIN_FILES[domain]


def rated_sentences(domain: str = "movies") -> list[tuple[str, float]]:
    """One domain's sentences with their mean human sentiment in [-4, 4], in file order
    (movies: 10,605; amazon: 3,708; tweets: 4,200; editorials: 5,190)."""
    if domain not in DOMAIN_FILES:
        raise SlimformerError(
            f"unknown rated-sentence domain {domain!r}: choose from {', '.join(DOMAIN_FILES)}"
        )
    path = _domain_file(domain)
    if not path.is_file():
        raise AssetMissing(_REVIEWS_MISSING)
    raw = path.read_bytes()
    # The files are documented as latin-1 but are in fact UTF-8 ("clichés"); latin-1 only as
    # a fallback, since it decodes anything.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        _id, score, sentence = line.split("\t", 2)
        rows.append((sentence, float(score)))
    return rows


def movie_reviews() -> list[tuple[str, float]]:
    """The 10,605 movie-review sentences (`rated_sentences("movies")`)."""
    return rated_sentences("movies")


def reviews_status() -> tuple[bool, str]:
    path = _domain_file("movies")
    return (True, str(path.parent)) if path.is_file() else (False, "")


def _safe_member(member: tarfile.TarInfo) -> bool:
    parts = PurePosixPath(member.name).parts
    return (
        member.isfile()
        and not member.name.startswith(("/", "\\"))
        and ".." not in parts
        and member.name.endswith(".txt")
    )


def _extract_txt(inner: tarfile.TarFile, dest: Path) -> None:
    members = [m for m in inner.getmembers() if _safe_member(m)]
    if hasattr(tarfile, "data_filter"):
        inner.extractall(dest, members=members, filter="data")
    else:  # Python < 3.11.4: the member checks above are all we have.
        inner.extractall(dest, members=members)


def install_rated_sentences() -> Path:
    """Fetch the vaderSentiment sdist with pip and cache its rated sentences; returns the
    movie-review file's path."""
    if _domain_file("movies").is_file():
        return _domain_file("movies")
    dest = _vader_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vader-dl-", dir=dest.parent) as work:
        work_dir = Path(work)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            _VADER_REQ, "-d", str(work_dir / "dl"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = sorted((work_dir / "dl").glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise SlimformerError(
                f"pip could not download {_VADER_REQ} (the movie-review sentences ship in its "
                "sdist); check that PyPI is reachable and retry `slimformer assets install`"
            )
        staged = work_dir / "vader"
        staged.mkdir()
        with tarfile.open(sdists[0], "r:gz") as outer:
            member = next(
                (m for m in outer.getmembers() if m.isfile() and m.name.endswith(_VADER_INNER)),
                None,
            )
            blob = outer.extractfile(member) if member is not None else None
            if blob is None:
                raise SlimformerError(f"{sdists[0].name} does not contain {_VADER_INNER}")
            with tarfile.open(fileobj=io.BytesIO(blob.read()), mode="r:gz") as inner:
                _extract_txt(inner, staged)
        missing = [f for f in DOMAIN_FILES.values() if not (staged / _INNER_DIR / f).is_file()]
        if missing:
            raise SlimformerError(f"{_VADER_REQ} does not contain {', '.join(missing)}")
        publish_dir(staged, dest)
    return _domain_file("movies")
