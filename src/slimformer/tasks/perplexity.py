"""Causal-LM perplexity on held-out text (the Wikipedia sample, or the user's text file).

Articles (not windows) are split by seed, so calibration text never overlaps scored text.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks.base import Score, State, Task, seeded_shuffle, tokenizer_of
from slimformer.tasks.staging import Paired, Staged, subset

if TYPE_CHECKING:
    from slimformer.model import SlimModel

CALIBRATION_ARTICLES = 10
EVAL_WINDOWS = 24


class PerplexityTask(Task):
    name = "perplexity"
    head = "causal-lm"
    metric = "perplexity"
    direction = "minimize"
    bounded = False
    default_seq_len = 256
    calibration_size = 16  # windows of 256 tokens: 4k tokens keep decoder calibration short
    # Small steps: a decoder's step on 32 windows of 256 tokens takes about a minute on 2 cores.
    training_batch_size = 4

    @cached_property
    def _documents(self) -> list[str]:
        if self.spec.data:
            path = Path(self.spec.data)
            if not path.is_file():
                raise SlimformerError(f"text file not found: {path}")
            paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
            if not paragraphs:
                raise SlimformerError(f"text file {path} is empty")
            return paragraphs
        return assets.wikipedia_articles()

    @cached_property
    def _splits(self) -> dict[str, list[str]]:
        documents = seeded_shuffle(self._documents, self.spec.seed)
        cut = max(1, min(CALIBRATION_ARTICLES, len(documents) // 5))
        if len(documents) < 2:
            raise SlimformerError("perplexity needs at least two paragraphs of text")
        return {"calibration": documents[:cut], "test": documents[cut:]}

    def texts(self, split: str) -> list[str]:
        return self._splits[self.split_name(split)]

    def examples(self, model: SlimModel, split: str) -> list[list[int]]:
        """Full windows of `seq_len` tokens cut from the split's running text."""
        tokenizer = tokenizer_of(model)
        stream: list[int] = []
        windows: list[list[int]] = []
        for document in self.texts(split):
            stream += tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"]
            while len(stream) >= self.seq_len:
                windows.append(stream[: self.seq_len])
                stream = stream[self.seq_len :]
            if len(windows) >= EVAL_WINDOWS * 4:
                break
        if not windows:
            raise SlimformerError(f"not enough text for one {self.seq_len}-token window")
        return windows

    # v2: the original's per-window losses, which staged scoring pairs a candidate's against.
    state_version = 2
    # Windows, not tokens, are the unit of staging (a window's tokens are not independent).
    stage_minimum = 8

    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        windows = self.examples(reference, "test")[:EVAL_WINDOWS]
        return {"reference_window_nll": _window_nll(reference, windows)}

    def score(self, model: SlimModel, state: State) -> Score:
        self.check_model(model)
        windows = self.examples(model, "test")[:EVAL_WINDOWS]
        return self._perplexity(windows, _window_nll(model, windows))

    def score_staged(self, model: SlimModel, state: State) -> Staged | None:
        """Perplexity on a seeded subset of the windows: per window, the candidate's mean
        log-loss minus the original's (every window has as many tokens, so the relative drop
        of the perplexity is exp of their mean − 1)."""
        reference = state.get("reference_window_nll")
        if reference is None:
            return None
        self.check_model(model)
        windows = self.examples(model, "test")[:EVAL_WINDOWS]
        picked = subset(len(windows), self.spec.seed, self.stage_minimum)
        if picked is None or len(reference) != len(windows):
            return None
        nll = _window_nll(model, [windows[i] for i in picked])
        tokens = len(windows[0]) - 1
        drops = (nll - reference[picked]) / tokens
        figure = Paired(drops, len(windows), relative=True)
        return Staged({self.metric: figure})

    def _perplexity(self, windows: list[list[int]], nll: np.ndarray) -> Score:
        tokens = sum(len(w) - 1 for w in windows)
        perplexity = float(np.exp(float(nll.sum()) / tokens))
        return self.make_score(perplexity, tokens=float(tokens))


@torch.inference_mode()
def _window_nll(model: SlimModel, windows: list[list[int]]) -> np.ndarray:
    """Each window's summed next-token log-loss."""
    out = np.zeros(len(windows), dtype=np.float64)
    for start in range(0, len(windows), 4):
        ids = torch.tensor(windows[start : start + 4], dtype=torch.long)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        out[start : start + len(ids)] = nll.double().sum(1).numpy()
    return out
