"""The Wikipedia sample that ships in the gensim wheel: articles as plain text, and sentences
(the perplexity task's text and the general corpus distillation may mix in)."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

from slimformer.assets.cache import data_dir, package_dir
from slimformer.errors import AssetMissing
from slimformer.files import write_atomic

WIKIPEDIA_INSTALL = "pip install gensim"
_GENSIM_MISSING = (
    "the Wikipedia sample ships with gensim, which is not installed: run `pip install gensim` "
    "(or `make demo`)"
)
_WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _wikipedia_cache() -> Path:
    return data_dir() / "wikipedia.jsonl"


def _wikipedia_sample() -> Path:
    pkg = package_dir("gensim")
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


def install_wikipedia() -> Path:
    """Parse the sample once into the cache; returns the cache file."""
    wikipedia_articles()
    return _wikipedia_cache()


def wikipedia_status() -> tuple[bool, str]:
    if _wikipedia_cache().is_file():
        return True, str(_wikipedia_cache())
    try:
        sample = _wikipedia_sample()
    except AssetMissing:
        return False, ""
    return True, f"{sample} (not parsed yet)"
