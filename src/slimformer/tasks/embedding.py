"""Sentence embeddings: a candidate must stay a drop-in replacement for the original.

What is scored depends on the data:
- built-in (no --data): the movie-review sentences. The score is the accuracy of a
  logistic-regression sentiment probe fitted on the *original* model's embeddings of a train
  split and applied unchanged to the candidate's embeddings of the test split, so a candidate
  whose embeddings drift scores lower even if they are still "good". A transfer check scores
  the same way on a domain no search tunes on (tweets and New York Times editorial
  sentences: short informal text and formal news prose, both unlike film reviews), with a
  probe of its own; its figures are reported as `transfer_*` details.
- --data FILE (the user's corpus, corpus.py): label-free by default, the score is recall@10
  of the original's nearest neighbours among the held-out sentences; with --label-column a
  probe as above on the user's labels; with --pair-column and --score-column the Spearman
  correlation of the pairs' cosine similarities with their gold scores.
Every mode also reports how far the embeddings moved (geometry.py: cosine fidelity,
recall@10, Spearman of pairwise similarities) on the scored sentences. Splits are fixed by
seed and disjoint: what is scored is never calibrated or trained on. Distillation may mix in
a general corpus (Wikipedia sentences), which no score reads.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks.base import (
    DROP_SE,
    Score,
    State,
    Task,
    batches_by_length,
    collate,
    drop_se_of,
    encode,
    seeded_shuffle,
)
from slimformer.tasks.corpus import Splits, read_splits
from slimformer.tasks.geometry import (
    NEIGHBOURS,
    fit_probe,
    geometry,
    geometry_names,
    pair_spearman,
    probe_correct,
)
from slimformer.tasks.staging import Paired, Staged, paired_standard_error, subset
from slimformer.taskspec import TaskSpec

if TYPE_CHECKING:
    from slimformer.model import SlimModel

CALIBRATION_SIZE = 256
TEST_SIZE = 2000
TRAIN_SIZE = 4000
TRANSFER_DOMAINS = ("tweets", "editorials")
TRANSFER_TEST_SIZE = 2000
TRANSFER_TRAIN_SIZE = 4000
GENERAL_SIZE = 8192  # Wikipedia sentences distillation may mix in
RECALL = f"recall@{NEIGHBOURS}"
# The guard every embedding study gets beside its score unless told otherwise: the probe alone
# let pruned and distilled models through whose embeddings had moved far from the original's.
# Measured on the movie-review test split (bench/results/embedding_transfer.json; Zen 4):
# the int8 engines keep 0.83 (ONNX Runtime) and 0.91 (OpenVINO NNCF) of each sentence's 10
# nearest neighbours; FFN and heads halved keep 0.44-0.53 however long they are distilled
# (400-1000 steps) and lose 1.6-2.1 points on the transfer domain; 30% of the FFN removed,
# distilled 200 steps and served int8 keeps 0.69-0.70 and loses 0.65-0.8 point there. 0.6 lies
# between.
GEOMETRY_GUARD = f"{RECALL}>=0.6"

Rows = list[tuple[str, int]]
METRICS = {
    "built-in": "probe_accuracy",
    "probe": "probe_accuracy",
    "neighbours": RECALL,
    "pairs": "pair_spearman",
}


def score_mode(spec: TaskSpec) -> str:
    """What the task scores, from its spec: one of METRICS' keys."""
    if not spec.data:
        return "built-in"
    if spec.pair_column:
        return "pairs"
    return "probe" if spec.label_column else "neighbours"


class EmbeddingTask(Task):
    name = "embedding"
    head = "embedding"
    metric = "probe_accuracy"
    state_version = 2  # v2: transfer domain, geometry figures, the user's corpus
    split_aliases = {"timing": "test"}  # it has a real "training" split of its own
    has_general_corpus = True

    def __init__(self, spec: TaskSpec):
        super().__init__(spec)
        self.mode = score_mode(spec)
        self.metric = METRICS[self.mode]

    # --- data -----------------------------------------------------------------------------------
    @cached_property
    def _builtin(self) -> dict[str, Rows]:
        labelled = [(text, int(score > 0)) for text, score in assets.movie_reviews() if score]
        rows = seeded_shuffle(labelled, self.spec.seed)
        cut1, cut2 = CALIBRATION_SIZE, CALIBRATION_SIZE + TEST_SIZE
        transfer = seeded_shuffle(
            [
                (text, int(score > 0))
                for domain in TRANSFER_DOMAINS
                for text, score in assets.rated_sentences(domain)
                if score
            ],
            self.spec.seed,
        )
        return {
            "calibration": rows[:cut1],
            "test": rows[cut1:cut2],
            "train": rows[cut2 : cut2 + TRAIN_SIZE],
            # Unlabeled sentences for distillation: the rest, plus calibration; never test.
            "training": rows[:cut1] + rows[cut2 + TRAIN_SIZE :],
            # Scored only: no pass calibrates or trains on the transfer domain.
            "transfer_test": transfer[:TRANSFER_TEST_SIZE],
            "transfer_train": transfer[
                TRANSFER_TEST_SIZE : TRANSFER_TEST_SIZE + TRANSFER_TRAIN_SIZE
            ],
        }

    @cached_property
    def _corpus(self) -> Splits:
        return read_splits(self.spec)

    def texts(self, split: str) -> list[str]:
        split = self.split_name(split)
        if self.mode == "built-in":
            return [text for text, _ in self._builtin[split]]
        corpus = self._corpus
        return {
            "test": corpus.test,
            "training": corpus.training,
            "calibration": corpus.training[:CALIBRATION_SIZE],
            "train": [text for text, _ in corpus.probe_train or ()],
        }[split]

    def labels(self, split: str) -> np.ndarray:
        if self.mode == "built-in":
            return np.array([label for _, label in self._builtin[split]])
        corpus = self._corpus
        names = corpus.test_labels if split == "test" else [y for _, y in corpus.probe_train or ()]
        classes = sorted({y for _, y in corpus.probe_train or ()} | set(corpus.test_labels or ()))
        return np.array([classes.index(name) for name in names or ()])

    def general_texts(self) -> list[str]:
        return seeded_shuffle(assets.wikipedia_sentences(), self.spec.seed)[:GENERAL_SIZE]

    # --- what it reports ------------------------------------------------------------------------
    def reported_figures(self) -> tuple[str, ...]:
        figures = (self.metric, *(n for n in geometry_names() if n != self.metric))
        if self.mode in ("built-in", "probe"):
            figures += (DROP_SE,)
        if self.mode == "built-in":
            transfer = "transfer_probe_accuracy"
            figures += (transfer, drop_se_of(transfer), *geometry_names("transfer_"))
        return figures

    def default_guards(self, max_drop: float) -> tuple[str, ...]:
        guards = [] if self.metric == RECALL else [GEOMETRY_GUARD]
        if self.mode == "built-in":
            guards.append(f"drop(transfer_probe_accuracy)<={max_drop:.10g}")
        return tuple(guards)

    def describe_score(self) -> str:
        if self.mode == "built-in":
            return (
                "the accuracy of a logistic-regression sentiment probe fitted on the original "
                f"model's embeddings of {TRAIN_SIZE:,} movie-review sentences and applied "
                f"unchanged to this model's embeddings of {TEST_SIZE:,} held-out ones. The "
                "transfer check (the `transfer_*` figures) does the same on "
                f"{' and '.join(TRANSFER_DOMAINS)} sentences ({TRANSFER_TEST_SIZE:,} scored, the "
                f"probe fitted on {TRANSFER_TRAIN_SIZE:,}), a domain no pass calibrates or trains "
                "on."
            )
        corpus, source = self._corpus, Path(self.spec.data or "").name
        if self.mode == "neighbours":
            return (
                f"label-free: for each of {len(corpus.test):,} held-out sentences of {source}, "
                f"the share of its {NEIGHBOURS} nearest neighbours under the original model's "
                "embeddings that this model's embeddings also put among its nearest."
            )
        if self.mode == "probe":
            return (
                f"the accuracy of a logistic-regression probe on the '{self.spec.label_column}' "
                f"column of {source}, fitted on the original model's embeddings of "
                f"{len(corpus.probe_train or ()):,} sentences and applied unchanged to this "
                f"model's embeddings of {len(corpus.test):,} held-out ones."
            )
        return (
            "the Spearman correlation between this model's cosine similarities of "
            f"{len(corpus.pairs or ()):,} held-out sentence pairs of {source} and their "
            f"'{self.spec.score_column}' gold scores."
        )

    # --- scoring --------------------------------------------------------------------------------
    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        state = {"reference_test": embed(reference, self.texts("test"), self.seq_len)}
        if self.mode in ("built-in", "probe"):
            probe = fit_probe(
                embed(reference, self.texts("train"), self.seq_len), self.labels("train")
            )
            state |= {f"probe_{key}": value for key, value in probe.items()}
        if self.mode == "built-in":
            transfer = self._builtin
            texts = [text for text, _ in transfer["transfer_train"]]
            labels = np.array([label for _, label in transfer["transfer_train"]])
            probe = fit_probe(embed(reference, texts, self.seq_len), labels)
            state |= {f"transfer_probe_{key}": value for key, value in probe.items()}
            state["transfer_reference_test"] = embed(
                reference, [text for text, _ in transfer["transfer_test"]], self.seq_len
            )
        return state

    def score_staged(self, model: SlimModel, state: State) -> Staged | None:
        """The probe's accuracy (and on the built-in data the transfer probe's) on a seeded
        subset, paired against the original's right and wrong answers on the same sentences.
        The label-free modes have no per-sentence figure that a subset estimates unbiasedly
        (neighbours among fewer sentences differ): they score in full."""
        if self.mode not in ("built-in", "probe") or "probe_coef" not in state:
            return None
        texts = self.texts("test")
        splits = [("reference_test", "probe_", self.metric, texts, self.labels("test"))]
        if self.mode == "built-in":
            rows = self._builtin["transfer_test"]
            splits.append(
                (
                    "transfer_reference_test",
                    "transfer_probe_",
                    "transfer_probe_accuracy",
                    [text for text, _ in rows],
                    np.array([y for _, y in rows]),
                )
            )
        figures = {}
        for reference, probe, figure, split_texts, labels in splits:
            chosen = subset(len(split_texts), self.spec.seed, self.stage_minimum)
            if chosen is None:
                continue
            vectors = embed(model, [split_texts[i] for i in chosen], self.seq_len)
            original = probe_correct(_probe(state, probe), state[reference][chosen], labels[chosen])
            candidate = probe_correct(_probe(state, probe), vectors, labels[chosen])
            figures[figure] = Paired(original - candidate, len(split_texts))
        return Staged(figures) if figures else None

    def score(self, model: SlimModel, state: State) -> Score:
        self.check_model(model)
        if self.mode == "built-in" and "transfer_reference_test" not in state:
            raise SlimformerError(
                "this run's reference arrays come from an earlier slimformer without the "
                "transfer check; start it again with --overwrite"
            )
        candidate = embed(model, self.texts("test"), self.seq_len)
        details = geometry(state["reference_test"], candidate)
        if self.mode == "neighbours":
            return self.make_score(details.pop(RECALL), **details)
        if self.mode == "pairs":
            corpus = self._corpus
            first, second = (np.array([p[i] for p in corpus.pairs or ()]) for i in (0, 1))
            value = pair_spearman(candidate[first], candidate[second], np.array(corpus.gold))
            return self.make_score(value, **details)
        value, details[DROP_SE] = _paired_probe(
            state, "probe_", state["reference_test"], candidate, self.labels("test")
        )
        if self.mode == "built-in":
            rows = self._builtin["transfer_test"]
            texts = [text for text, _ in rows]
            transfer = embed(model, texts, self.seq_len)
            figure = "transfer_probe_accuracy"
            details[figure], details[drop_se_of(figure)] = _paired_probe(
                state,
                "transfer_probe_",
                state["transfer_reference_test"],
                transfer,
                np.array([y for _, y in rows]),
            )
            details |= geometry(state["transfer_reference_test"], transfer, "transfer_")
        return self.make_score(value, **details)


def _probe(state: State, prefix: str) -> dict[str, np.ndarray]:
    return {key: state[f"{prefix}{key}"] for key in ("coef", "intercept", "classes")}


def _paired_probe(
    state: State, prefix: str, original: np.ndarray, candidate: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    """The probe's accuracy on the candidate's embeddings, and the standard error of its drop
    against the original's embeddings of the same sentences: on 2,000 movie-review sentences
    about 0.65 point for distilled students and 0.35 for int8 ones (bench/results/
    probe_noise.json), as large as the budgets it is judged against."""
    probe = _probe(state, prefix)
    right = probe_correct(probe, candidate, labels)
    error = paired_standard_error(probe_correct(probe, original, labels), right)
    return float(right.mean()), error


@torch.inference_mode()
def embed(model: SlimModel, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states (sentence-transformers' pooling for MiniLM)."""
    examples = encode(model, texts, max_length)
    out = np.zeros((len(examples), model.config.hidden_size), dtype=np.float32)
    for indices, batch in batches_by_length(examples, batch_size):
        inputs = collate(model, batch)
        hidden = model(**inputs).last_hidden_state.float()  # pool in fp32 for 16-bit models
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[indices] = pooled.float().numpy()
    return out
