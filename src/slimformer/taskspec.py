"""The serializable description of a task: enough to rebuild it in another process.

Plain data below recipes (a recipe names the task its calibration data comes from), so it lives
outside the `tasks` package, which loads models and data; `slimformer.tasks` re-exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from slimformer.errors import SlimformerError

TASK_NAMES = ("embedding", "classification", "perplexity", "custom", "image-classification")
# Seeds reach numpy's generators (Optuna's sampler), which take 0 .. 2**32-1.
SEED_LIMIT = 2**32
# The type of each TaskSpec field (None: may be left unset), checked when a spec is built from
# a recipe or run.json, whose values can be anything.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "data": (str, type(None)),
    "text_column": (str,),
    "label_column": (str, type(None)),
    "pair_column": (str, type(None)),
    "score_column": (str, type(None)),
    "function": (str, type(None)),
    "direction": (str, type(None)),
    "seq_len": (int, type(None)),
    "seed": (int,),
}


def check_seed(seed: Any, what: str = "seed") -> None:
    """Refuse a seed that is not an integer from 0 to 2**32-1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise SlimformerError(
            f"{what} must be an integer from 0 to {SEED_LIMIT - 1}, got {str(seed)[:40]}"
        )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data: str | None = None  # a user data file; None = the task's built-in offline data
    text_column: str = "text"
    # None: classification reads a "label" column; embedding then scores label-free (how the
    # candidate keeps the original's neighbours) instead of fitting a probe on labels.
    label_column: str | None = None
    # Embedding on sentence pairs with a gold similarity (STS style): the second sentence's
    # column and the score's; the score is then the Spearman correlation with the gold.
    pair_column: str | None = None
    score_column: str | None = None
    function: str | None = None  # custom task: "module:function" returning a float
    direction: str | None = None  # custom task: maximize | minimize
    seq_len: int | None = None  # max tokens per input; None = the task's default
    seed: int = 0

    def __post_init__(self) -> None:
        for name, types in _FIELD_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, types):
                kind = "an integer" if int in types else "a text"
                raise SlimformerError(f"task: {name} must be {kind}, got {str(value)[:40]!r}")
        check_seed(self.seed)
        if self.name not in TASK_NAMES:
            raise SlimformerError(
                f"unknown task '{self.name}'; choose one of: {', '.join(TASK_NAMES)}"
            )
        if self.name == "custom":
            if not self.function or ":" not in self.function:
                raise SlimformerError(
                    "the custom task needs --function module:function (a function that takes "
                    "the model and returns a float)"
                )
            if self.direction not in ("maximize", "minimize"):
                raise SlimformerError(
                    "the custom task needs --direction maximize or --direction minimize"
                )
        if self.name == "classification" and not self.data:
            raise SlimformerError(
                "the classification task needs --data FILE (CSV or JSONL with text and label "
                "columns)"
            )
        self._check_embedding_columns()
        if self.seq_len is not None and self.seq_len < 8:
            raise SlimformerError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.name == "image-classification" and self.seq_len is not None:
            raise SlimformerError(
                "--seq-len cuts text inputs; images keep the model's size (image-classification)"
            )

    def _check_embedding_columns(self) -> None:
        pairs = (self.pair_column, self.score_column)
        if any(pairs) and self.name != "embedding":
            raise SlimformerError("--pair-column and --score-column are for --task embedding")
        if any(pairs) and not all(pairs):
            raise SlimformerError(
                "sentence pairs need both --pair-column (the second sentence) and "
                "--score-column (their gold similarity)"
            )
        if self.name == "embedding" and not self.data and (self.label_column or any(pairs)):
            raise SlimformerError(
                "--label-column, --pair-column and --score-column name columns of your --data "
                "file; the built-in embedding task has none to choose"
            )
        if self.name == "embedding" and self.label_column and any(pairs):
            raise SlimformerError(
                "choose one embedding score: --label-column (a probe) or --pair-column with "
                "--score-column (similarity correlation), not both"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "task") -> TaskSpec:
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, dict) or "name" not in data:
            raise SlimformerError(f"{origin}: 'task' must be a mapping with a 'name'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise SlimformerError(f"{origin}: unknown task setting(s): {', '.join(unknown)}")
        if data["name"] == "embedding" and not data.get("data"):
            # Written by earlier versions, which stored classification's default column in
            # every spec; the built-in embedding task has no columns.
            data = {k: v for k, v in data.items() if k != "label_column"}
        return cls(**data)
