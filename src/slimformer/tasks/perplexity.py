"""Causal-LM perplexity on held-out text (the Wikipedia sample, or the user's text file).

Articles (not windows) are split by seed, so calibration text never overlaps scored text.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks.base import Score, State, Task, seeded_shuffle, tokenizer_of

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

    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        return {}

    @torch.inference_mode()
    def score(self, model: SlimModel, state: State) -> Score:
        self.check_model(model)
        windows = self.examples(model, "test")[:EVAL_WINDOWS]
        total_nll, total_tokens = 0.0, 0
        for start in range(0, len(windows), 4):
            ids = torch.tensor(windows[start : start + 4], dtype=torch.long)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += targets.numel()
        perplexity = float(torch.exp(torch.tensor(total_nll / total_tokens)))
        return self.make_score(perplexity, tokens=float(total_tokens))
