"""The user's own sentences for the embedding task, read and split.

A text file (one sentence a line), or a CSV/JSONL file whose `--text-column` holds the
sentences; optionally with a `--label-column` (the score is then a probe on those labels) or a
`--pair-column` and `--score-column` (sentence pairs with a gold similarity, STS style).
Exact repeats are dropped, then the splits are fixed by the seed and disjoint: the scored
sentences (or the sentences of the scored pairs) are never calibrated or trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import SlimformerError
from slimformer.tasks.base import seeded_shuffle

# read_rows lives with the first task that read user files; both tasks read the same formats.
from slimformer.tasks.classification import read_rows
from slimformer.tasks.geometry import NEIGHBOURS
from slimformer.taskspec import TaskSpec

# Distinct sentences a corpus needs: half of them (up to TEST_SIZE) are scored, and recall@10
# among fewer than 100 scored sentences says little about a model's neighbourhoods.
MIN_SENTENCES = 200
MIN_PAIRS = 100  # sentence pairs with a gold score; half (up to TEST_PAIRS) are scored
TEST_SIZE = 2000
TEST_PAIRS = 1500
PROBE_TRAIN_SIZE = 4000
TABLE_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class Splits:
    test: list[str]  # the scored sentences
    training: list[str]  # calibration and distillation; disjoint from `test`
    test_labels: list[str] | None = None  # probe: the scored sentences' labels
    probe_train: list[tuple[str, str]] | None = None  # probe: (sentence, label) to fit it on
    pairs: list[tuple[int, int]] | None = None  # STS: scored pairs as indices into `test`
    gold: list[float] | None = None  # STS: their gold similarity


def read_splits(spec: TaskSpec) -> Splits:
    path = Path(spec.data or "")
    if spec.pair_column and spec.score_column:
        rows = _columns(path, spec.text_column, spec.pair_column, spec.score_column)
        return _pair_splits(path, rows, spec.seed)
    if spec.label_column:
        rows = _columns(path, spec.text_column, spec.label_column)
        return _probe_splits(path, rows, spec.seed)
    return _sentence_splits(path, _sentences(path, spec.text_column), spec.seed)


# --- reading ------------------------------------------------------------------------------------
def _sentences(path: Path, text_column: str) -> list[str]:
    if path.suffix.lower() in TABLE_SUFFIXES:
        return [row[0] for row in _columns(path, text_column)]
    if not path.is_file():
        raise SlimformerError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SlimformerError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    return [line.strip() for line in lines if line.strip()]


def _columns(path: Path, *columns: str) -> list[tuple[str, ...]]:
    """The named columns of every row with a non-empty first column, as text."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise SlimformerError(
            f"{path}: labels, pairs and scores are read from named columns of a CSV or JSONL "
            "file; a text file holds only sentences (one a line)"
        )
    rows = read_rows(path)
    if not rows:
        raise SlimformerError(f"data file {path} has no rows")
    present = list(rows[0]) if isinstance(rows[0], dict) else []
    for wanted in columns:
        if wanted not in present:
            raise SlimformerError(
                f"column '{wanted}' not found in {path}; columns are: "
                f"{', '.join(map(str, present))}"
            )
    table = [
        tuple(str(row.get(c) or "").strip() for c in columns)
        for row in rows
        if isinstance(row, dict)
    ]
    return [row for row in table if row[0]]


# --- splitting ----------------------------------------------------------------------------------
def _check_count(path: Path, total: int, distinct: int) -> None:
    if distinct >= MIN_SENTENCES:
        return
    repeats = f" but only {distinct} distinct" if distinct < total else ""
    raise SlimformerError(
        f"{path} has {total} sentences{repeats}; the neighbour score needs at least "
        f"{MIN_SENTENCES} distinct sentences (half are scored, the rest calibrate and train)"
    )


def _sentence_splits(path: Path, sentences: list[str], seed: int) -> Splits:
    distinct = list(dict.fromkeys(sentences))
    _check_count(path, len(sentences), len(distinct))
    shuffled = seeded_shuffle(distinct, seed)
    cut = min(TEST_SIZE, len(shuffled) // 2)
    return Splits(test=shuffled[:cut], training=shuffled[cut:])


def _probe_splits(path: Path, rows: list[tuple[str, ...]], seed: int) -> Splits:
    labelled = {}
    for text, label in rows:
        if label:
            labelled.setdefault(text, label)  # a repeated sentence keeps its first label
    _check_count(path, len(rows), len(labelled))
    shuffled = seeded_shuffle(list(labelled.items()), seed)
    cut = min(TEST_SIZE, len(shuffled) // 2)
    test, rest = shuffled[:cut], shuffled[cut:]
    probe_train = rest[:PROBE_TRAIN_SIZE]
    classes = sorted({label for _, label in probe_train})
    if len(classes) < 2:
        raise SlimformerError(
            f"{path}: the probe needs at least two labels to tell apart; the label column "
            f"holds only {classes[0]!r}"
        )
    return Splits(
        test=[text for text, _ in test],
        training=[text for text, _ in rest],
        test_labels=[label for _, label in test],
        probe_train=probe_train,
    )


def _pair_splits(path: Path, rows: list[tuple[str, ...]], seed: int) -> Splits:
    pairs: dict[tuple[str, str], float] = {}
    for number, (first, second, score) in enumerate(rows, 1):
        try:
            gold = float(score)
        except ValueError:
            gold = math.nan
        if not second or not math.isfinite(gold):
            raise SlimformerError(
                f"{path}: row {number} needs a second sentence and a numeric score, got "
                f"{second!r} and {score!r}"
            )
        pairs.setdefault((first, second), gold)
    if len(pairs) < MIN_PAIRS:
        raise SlimformerError(
            f"{path} has {len(pairs)} distinct sentence pairs; the similarity score needs at "
            f"least {MIN_PAIRS} (half are scored, the rest calibrate and train)"
        )
    shuffled = seeded_shuffle(list(pairs.items()), seed)
    cut = min(TEST_PAIRS, len(shuffled) // 2)
    scored, rest = shuffled[:cut], shuffled[cut:]
    test = list(dict.fromkeys(s for (a, b), _ in scored for s in (a, b)))
    if len(test) <= NEIGHBOURS or len({g for _, g in scored}) < 2:
        raise SlimformerError(
            f"{path}: the scored pairs need more than {NEIGHBOURS} distinct sentences and "
            "gold scores that are not all equal"
        )
    index = {sentence: i for i, sentence in enumerate(test)}
    held = set(test)
    training = list(dict.fromkeys(s for (a, b), _ in rest for s in (a, b) if s not in held))
    if not training:
        raise SlimformerError(
            f"{path}: every sentence of the unscored pairs is also in a scored pair; nothing "
            "is left to calibrate and train on without touching the scored sentences"
        )
    return Splits(
        test=test,
        training=training,
        pairs=[(index[a], index[b]) for (a, b), _ in scored],
        gold=[g for _, g in scored],
    )
