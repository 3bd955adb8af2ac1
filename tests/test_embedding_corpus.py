"""The embedding task on the user's own corpus and on the built-in data, with tiny models.

Label-free neighbour recall, a probe on the user's labels, STS-style pairs; the splits (fixed by
seed, deduplicated, scored sentences never trained on); the figures each mode reports (which
guards may name); the transfer domain's figures on the built-in data; bad corpora.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks import TaskSpec, make_task
from slimformer.tasks.base import DROP_SE
from slimformer.tasks.corpus import MIN_SENTENCES
from slimformer.tasks.embedding import GEOMETRY_GUARD, TRANSFER_DOMAINS, embed
from slimformer.tasks.geometry import neighbour_recall, normalize

pytestmark = pytest.mark.usefixtures("single_thread")

# 400 distinct real sentences, as a corpus file holds them (one a line, trimmed).
SENTENCES = list(dict.fromkeys(text.strip() for text, _ in assets.rated_sentences("amazon")))[:400]


def perturbed(model, scale: float = 0.05):
    """A copy whose weights moved a little: its embeddings drift, not collapse."""
    copy = model.copy()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in copy.module.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * parameter.std().clamp(min=1e-3) * noise)
    return copy


def text_file(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def csv_file(path: Path, header: list[str], rows: list[tuple]) -> str:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# --- label-free: neighbour recall ----------------------------------------------------------------
def test_the_original_keeps_every_neighbour_and_a_perturbed_model_loses_some(tmp_path):
    model = tiny.tiny_bert()
    task = make_task(TaskSpec("embedding", data=text_file(tmp_path / "corpus.txt", SENTENCES)))
    state = task.prepare(model)

    original = task.score(model, state)
    assert original.metric == "recall@10" and original.value == 1.0
    assert original.details["cosine_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert original.details["pairwise_spearman"] == pytest.approx(1.0, abs=1e-6)

    moved = task.score(perturbed(model), state)
    assert 0.0 < moved.value < 1.0
    assert moved.details["cosine_fidelity"] < 1.0
    assert moved.details["pairwise_spearman"] < 1.0
    assert set(moved.details) | {moved.metric} == set(task.reported_figures())


def test_neighbour_recall_counts_shared_neighbours():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 8))
    assert neighbour_recall(points, points) == 1.0
    assert neighbour_recall(points, points * 3.0) == 1.0  # cosine: scale does not matter
    shuffled = points[rng.permutation(40)]
    assert neighbour_recall(points, shuffled) < 0.5  # unrelated geometry keeps few


def test_corpus_splits_are_deduplicated_disjoint_and_fixed_by_seed(tmp_path):
    lines = SENTENCES + SENTENCES[:50]  # repeats are dropped, not scored twice
    data = text_file(tmp_path / "corpus.txt", lines)
    task = make_task(TaskSpec("embedding", data=data))
    test, training = task.texts("test"), task.texts("training")
    assert len(test) == len(set(test)) == len(SENTENCES) // 2
    assert not set(test) & set(training)
    assert set(test) | set(training) == set(SENTENCES)
    assert set(task.texts("calibration")) <= set(training)
    assert task.texts("timing") == test
    again = make_task(TaskSpec("embedding", data=data))
    assert again.texts("test") == test
    other_seed = make_task(TaskSpec("embedding", data=data, seed=1))
    assert other_seed.texts("test") != test


def test_a_jsonl_corpus_reads_its_text_column(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"body": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES))
    )
    task = make_task(TaskSpec("embedding", data=str(path), text_column="body"))
    assert set(task.texts("test")) | set(task.texts("training")) == set(SENTENCES)


# --- with labels: a probe; with pairs: Spearman against the gold ---------------------------------
def test_a_label_column_scores_a_probe_fitted_on_the_original(tmp_path):
    rows = [
        (text, "pos" if score > 0 else "neg") for text, score in assets.rated_sentences("amazon")
    ]
    data = csv_file(tmp_path / "labelled.csv", ["text", "mood"], rows[:600])
    task = make_task(TaskSpec("embedding", data=data, label_column="mood"))
    model = tiny.tiny_bert()
    state = task.prepare(model)
    score = task.score(model, state)
    assert score.metric == "probe_accuracy" and 0.5 <= score.value <= 1.0
    assert score.details["recall@10"] == 1.0
    assert set(score.details) | {score.metric} == set(task.reported_figures())
    # The probe is the original's: a drifted model scores it as it is, not refitted.
    assert task.score(perturbed(model, 0.5), state).details["recall@10"] < 1.0
    assert score.details[DROP_SE] == 0.0  # the original against itself


def test_sentence_pairs_score_the_spearman_correlation_with_the_gold(tmp_path):
    model = tiny.tiny_bert()
    firsts, seconds = SENTENCES[:150], SENTENCES[150:300]
    # Gold = the original's own cosine similarity, so the original ranks the pairs perfectly.
    a, b = (normalize(embed(model, half, 128)) for half in (firsts, seconds))
    gold = np.sum(a * b, axis=1)
    rows = [(x, y, f"{g:.9f}") for x, y, g in zip(firsts, seconds, gold, strict=True)]
    data = csv_file(tmp_path / "pairs.csv", ["a", "b", "similarity"], rows)
    spec = TaskSpec(
        "embedding", data=data, text_column="a", pair_column="b", score_column="similarity"
    )
    task = make_task(spec)
    state = task.prepare(model)
    original = task.score(model, state)
    assert original.metric == "pair_spearman" and original.value == pytest.approx(1.0, abs=1e-9)
    assert task.score(perturbed(model), state).value < original.value
    scored = set(task.texts("test"))
    assert not scored & set(task.texts("training"))  # no scored sentence is trained on


# --- the built-in data: the transfer domain ---------------------------------------------------
def test_the_built_in_task_reports_the_transfer_domain_beside_the_probe():
    task = make_task(TaskSpec("embedding"))
    model = tiny.tiny_bert()
    state = task.prepare(model)
    score = task.score(model, state)
    assert score.metric == "probe_accuracy"
    assert list(score.details) == list(task.reported_figures()[1:])
    assert 0.0 < score.details["transfer_probe_accuracy"] <= 1.0
    assert score.details["transfer_recall@10"] == 1.0
    # No pass calibrates or trains on the transfer domain, nor on the scored movie reviews
    # (but for the sentences the movie set holds twice).
    transfer = {text for domain in TRANSFER_DOMAINS for text, _ in assets.rated_sentences(domain)}
    trained = set(task.texts("training")) | set(task.texts("calibration"))
    counts = Counter(text for text, _ in assets.movie_reviews())
    repeated = {text for text, count in counts.items() if count > 1}
    assert not trained & transfer and trained & set(task.texts("test")) <= repeated
    assert "transfer" in task.describe_score() and "tweets" in task.describe_score()


def test_default_guards_follow_the_data():
    assert make_task(TaskSpec("embedding")).default_guards(0.01) == (
        GEOMETRY_GUARD,
        "drop(transfer_probe_accuracy)<=0.01",
    )
    corpus = make_task(TaskSpec("embedding", data="corpus.txt"))
    assert corpus.default_guards(0.02) == ()  # recall@10 is its score already
    probe = make_task(TaskSpec("embedding", data="x.csv", label_column="y"))
    assert probe.default_guards(0.02) == (GEOMETRY_GUARD,)


# --- bad corpora ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (SENTENCES[:50], f"has 50 sentences; the neighbour score needs at least {MIN_SENTENCES}"),
        (["the same line"] * 500, "has 500 sentences but only 1 distinct"),
        ([], "has 0 sentences"),
    ],
    ids=["too_few", "duplicates_only", "empty"],
)
def test_a_corpus_too_small_for_the_neighbour_score_is_refused(tmp_path, lines, message):
    task = make_task(TaskSpec("embedding", data=text_file(tmp_path / "c.txt", lines)))
    with pytest.raises(SlimformerError, match=message):
        task.texts("test")


def test_a_probe_needs_two_labels_and_a_table(tmp_path):
    one_label = csv_file(tmp_path / "one.csv", ["text", "y"], [(s, "a") for s in SENTENCES])
    with pytest.raises(SlimformerError, match="at least two labels"):
        make_task(TaskSpec("embedding", data=one_label, label_column="y")).texts("test")
    plain = text_file(tmp_path / "plain.txt", SENTENCES)
    with pytest.raises(SlimformerError, match="CSV or JSONL"):
        make_task(TaskSpec("embedding", data=plain, label_column="y")).texts("test")


def test_pairs_need_numeric_scores(tmp_path):
    rows = [(a, b, "high") for a, b in zip(SENTENCES[:150], SENTENCES[150:300], strict=True)]
    data = csv_file(tmp_path / "pairs.csv", ["a", "b", "s"], rows)
    spec = TaskSpec("embedding", data=data, text_column="a", pair_column="b", score_column="s")
    with pytest.raises(SlimformerError, match="row 1 needs a second sentence and a numeric"):
        make_task(spec).texts("test")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pair_column": "b"}, "need both --pair-column"),
        ({"label_column": "y"}, "built-in embedding task has none"),
        (
            {"data": "x.csv", "label_column": "y", "pair_column": "b", "score_column": "s"},
            "not both",
        ),
    ],
)
def test_conflicting_embedding_columns_are_refused(options, message):
    with pytest.raises(SlimformerError, match=message):
        TaskSpec("embedding", **options)


def test_specs_saved_by_earlier_versions_still_load():
    old = {"name": "embedding", "text_column": "text", "label_column": "label", "seed": 0}
    assert TaskSpec.from_dict(old) == TaskSpec("embedding")
