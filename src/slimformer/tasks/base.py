"""What a task is: how quality is scored, and which real inputs calibrate and time a model.

A task is rebuilt from its `TaskSpec` in any process. `prepare` runs once on the reference
(original) model and returns arrays (e.g. a fitted probe, reference embeddings) that `score`
needs to judge a candidate; they are saved with safetensors, so a child process can score too.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from slimformer.errors import SlimformerError
from slimformer.tasks.staging import Staged
from slimformer.taskspec import TaskSpec

if TYPE_CHECKING:
    from slimformer.model import SlimModel

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Score:
    value: float
    metric: str
    direction: str  # maximize | minimize
    bounded: bool  # a fraction in [0, 1]: budgets like "1%" then mean percentage points
    details: dict[str, float] = field(default_factory=dict)


# The detail a task reports, where it can, beside its score: the standard error of the score's
# drop against the original, from per-example paired differences on the scored split, so a drop
# reads with how much of it is the sample (tasks/staging.py: paired_standard_error).
DROP_SE = "drop_se"


def drop_se_of(figure: str) -> str:
    """The detail holding the standard error of another reported figure's drop."""
    return f"{figure}_{DROP_SE}"


def quality_drop(baseline: float, value: float, direction: str, bounded: bool) -> float:
    """How much worse `value` is than `baseline`: points for fractions, relative otherwise."""
    worse = baseline - value if direction == "maximize" else value - baseline
    if bounded:
        return worse
    return worse / abs(baseline) if baseline else worse


class Task(ABC):
    name: ClassVar[str]
    head: ClassVar[str | None]  # the model head the task needs; None = whatever the model has
    metric: ClassVar[str]
    direction: ClassVar[str] = "maximize"
    bounded: ClassVar[bool] = True
    default_seq_len: ClassVar[int] = 128
    # Generic split names every task answers to, mapped onto the task's own splits.
    split_aliases: ClassVar[dict[str, str]] = {"timing": "test", "training": "calibration"}
    calibration_size: ClassVar[int] = 128  # inputs the passes calibrate on
    training_batch_size: ClassVar[int] = 32  # inputs per distillation step
    # Bump when `prepare` returns other arrays: reference states cached earlier are redone.
    state_version: ClassVar[int] = 1
    # Whether `general_texts` has a corpus for training passes to mix in.
    has_general_corpus: ClassVar[bool] = False
    # Whether inputs are token sequences that --seq-len can cut to one length.
    takes_seq_len: ClassVar[bool] = True

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.seq_len = spec.seq_len or self.default_seq_len

    # --- inputs -------------------------------------------------------------------------
    @abstractmethod
    def texts(self, split: str) -> list[str]:
        """Real texts of a split: 'calibration', 'timing' (and task-specific ones)."""

    def split_name(self, split: str) -> str:
        return self.split_aliases.get(split, split)

    def check_data(self) -> None:
        """Read the task's data, so a bad file fails before any work starts."""
        self.texts("calibration")

    def calibration_batches(
        self, model: SlimModel, count: int | None = None, batch_size: int = 32
    ) -> list[dict[str, torch.Tensor]]:
        examples = self.examples(model, "calibration")[: count or self.calibration_size]
        return [
            collate(model, examples[i : i + batch_size])
            for i in range(0, len(examples), batch_size)
        ]

    def training_batches(
        self, model: SlimModel, batch_size: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Unlabeled inputs a pass may train on (distillation); never the scored split."""
        examples = self.examples(model, "training")
        batch_size = batch_size or self.training_batch_size
        return [
            collate(model, examples[i : i + batch_size])
            for i in range(0, len(examples), batch_size)
        ]

    def general_texts(self) -> list[str]:
        """General-domain text a training pass may mix into the task's own (distillation that
        should generalize beyond the task's domain); never scored. None by default."""
        return []

    def general_batches(
        self, model: SlimModel, batch_size: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        texts = self.general_texts()
        if not texts:  # also: a model without a tokenizer (a ViT) is never asked for one
            return []
        examples = encode(model, texts, self.seq_len)
        batch_size = batch_size or self.training_batch_size
        return [
            collate(model, examples[i : i + batch_size])
            for i in range(0, len(examples), batch_size)
        ]

    def examples(self, model: SlimModel, split: str) -> list[list[int]]:
        """Token ids, one list per input, unpadded, truncated to the task's sequence length."""
        return encode(model, self.texts(split), self.seq_len)

    # --- quality ------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, reference: SlimModel) -> State:
        """Arrays computed once on the original model that `score` compares against."""

    @abstractmethod
    def score(self, model: SlimModel, state: State) -> Score: ...

    # Examples the subset of staged scoring holds at least (tasks/staging.py).
    stage_minimum: ClassVar[int] = 300

    def score_staged(self, model: SlimModel, state: State) -> Staged | None:
        """Score a seeded subset of the scored split, paired against the original's values
        in `state` (tasks/staging.py); None where the task cannot (its own score function,
        a split too small to save anything, a reference state from before staging)."""
        return None

    def reported_figures(self) -> tuple[str, ...]:
        """The figures `score` reports (the score, then its details), which guards may name."""
        return (self.metric,)

    def default_guards(self, max_drop: float) -> tuple[str, ...]:
        """Guards (search/guards.py syntax) a study on this task gets beside --max-drop
        unless the user switches them off."""
        return ()

    def describe_score(self) -> str:
        """What the score measures, in a sentence, for the model card."""
        return f"the {self.metric} of the {self.name} task."

    def make_score(self, value: float, **details: float) -> Score:
        return Score(float(value), self.metric, self.direction, self.bounded, details)

    def check_model(self, model: SlimModel) -> None:
        if self.head is not None and model.head != self.head:
            raise SlimformerError(
                f"the {self.name} task needs a {self.head} model, but this checkpoint is a "
                f"{model.head} model; choose another --task"
            )
        if model.tokenizer is None:
            raise SlimformerError(
                f"the {self.name} task needs a tokenizer, and the model folder has none"
            )


def tokenizer_of(model: SlimModel) -> Any:
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def encode(model: SlimModel, texts: Sequence[str], max_length: int) -> list[list[int]]:
    tokenizer = tokenizer_of(model)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def collate(model: SlimModel, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest input, as sentence-transformers and HF pipelines do; images
    (pixel tensors of one size) are stacked."""
    if isinstance(examples[0], torch.Tensor):
        return {"pixel_values": torch.stack(list(examples))}
    tokenizer = tokenizer_of(model)
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example, dtype=torch.long)
        mask[row, : len(example)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def input_tokens(model: SlimModel, example: Any) -> int:
    """The tokens the model sees for one input: its token ids, or an image's patches and the
    class token."""
    if isinstance(example, torch.Tensor):
        patch = int(model.config.patch_size)
        return (example.shape[-2] // patch) * (example.shape[-1] // patch) + 1
    return len(example)


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """How many inputs a collated batch holds."""
    return next(iter(batch.values())).shape[0]


def fixed_length_examples(
    model: SlimModel, texts: Sequence[str], length: int, count: int
) -> list[list[int]]:
    """`count` inputs of exactly `length` real tokens, cut from the running text."""
    tokenizer = tokenizer_of(model)
    prefix, suffix = _special_tokens(tokenizer)
    body = length - len(prefix) - len(suffix)
    stream: list[int] = []
    examples: list[list[int]] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(stream) >= body and len(examples) < count:
            examples.append(prefix + stream[:body] + suffix)
            stream = stream[body:]
        if len(examples) >= count:
            return examples
    if not examples:
        raise SlimformerError(f"the task's texts are too short to make {length}-token inputs")
    return examples


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text (e.g. [CLS] ... [SEP])."""
    marked = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start], marked[start + len(plain) :]
    return [], []


def batches_by_length(
    examples: Sequence[Sequence[int]], batch_size: int
) -> list[tuple[list[int], list[Sequence[int]]]]:
    """Sort by length and cut into batches (less padding); returns (original indices, batch)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [
        (order[i : i + batch_size], [examples[j] for j in order[i : i + batch_size]])
        for i in range(0, len(order), batch_size)
    ]


def seeded_shuffle(items: list[Any], seed: int) -> list[Any]:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled
