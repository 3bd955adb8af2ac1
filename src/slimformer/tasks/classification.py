"""Text classification accuracy of a sequence-classification checkpoint on the user's data."""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimformer.errors import SlimformerError
from slimformer.files import parse_json
from slimformer.tasks.base import Score, State, Task, batches_by_length, collate, seeded_shuffle
from slimformer.tasks.staging import Paired, Staged, subset

if TYPE_CHECKING:
    from slimformer.model import SlimModel

MAX_CALIBRATION = 256


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SlimformerError(f"data file not found: {path}")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = parse_json(line)
                except ValueError as error:
                    raise SlimformerError(f"{path}: line {number} {error}") from None
                if not isinstance(row, dict):
                    raise SlimformerError(f"{path}: line {number} is not a JSON object")
                rows.append(row)
            return rows
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise SlimformerError(f"{path} is not UTF-8 text; save it as UTF-8 CSV or JSONL") from None


class ClassificationTask(Task):
    name = "classification"
    head = "sequence-classification"
    metric = "accuracy"

    @cached_property
    def _rows(self) -> list[tuple[str, str]]:
        path = Path(self.spec.data or "")
        rows = read_rows(path)
        if not rows:
            raise SlimformerError(f"data file {path} has no rows")
        columns = list(rows[0]) if isinstance(rows[0], dict) else []
        label_column = self.spec.label_column or "label"
        for wanted, option in (
            (self.spec.text_column, "--text-column"),
            (label_column, "--label-column"),
        ):
            if wanted not in columns:
                raise SlimformerError(
                    f"column '{wanted}' not found in {path}; columns are: "
                    f"{', '.join(map(str, columns))} — choose one with {option}"
                )
        text, label = self.spec.text_column, label_column
        for number, row in enumerate(rows, 1):
            if text not in row or label not in row:
                raise SlimformerError(f"row {number} of {path} lacks '{text}' or '{label}'")
        return [(str(r[self.spec.text_column]), str(r[label_column])) for r in rows]

    @cached_property
    def _splits(self) -> dict[str, list[tuple[str, str]]]:
        rows = seeded_shuffle(self._rows, self.spec.seed)
        if len(rows) < 20:
            raise SlimformerError(
                f"data file {self.spec.data} has {len(rows)} rows; at least 20 are needed "
                "(some calibrate, the rest score)"
            )
        cut = min(MAX_CALIBRATION, len(rows) // 10)
        return {"calibration": rows[:cut], "test": rows[cut:]}

    def texts(self, split: str) -> list[str]:
        return [text for text, _ in self._splits[self.split_name(split)]]

    def label_ids(self, model: SlimModel) -> np.ndarray:
        config = model.config
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        ids = []
        for _, label in self._splits["test"]:
            if label in label2id:
                ids.append(label2id[label])
            elif label.lstrip("-").isdigit() and 0 <= int(label) < config.num_labels:
                ids.append(int(label))
            else:
                raise SlimformerError(
                    f"label '{label}' is not one of the model's labels "
                    f"({', '.join(label2id) or config.num_labels}); fix --label-column or the data"
                )
        return np.array(ids)

    # v2: the original's predictions, which staged scoring pairs a candidate's against.
    state_version = 2

    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        examples = self.examples(reference, "test")
        return {
            "labels": self.label_ids(reference),
            "reference_predicted": self._predict(reference, examples, range(len(examples))),
        }

    @torch.inference_mode()
    def score(self, model: SlimModel, state: State) -> Score:
        self.check_model(model)
        examples = self.examples(model, "test")
        predicted = self._predict(model, examples, range(len(examples)))
        return self.make_score(float(np.mean(predicted == state["labels"])))

    def score_staged(self, model: SlimModel, state: State) -> Staged | None:
        """Accuracy on a seeded subset, paired against the original's predictions."""
        if "reference_predicted" not in state:
            return None
        self.check_model(model)
        examples = self.examples(model, "test")
        picked = subset(len(examples), self.spec.seed, self.stage_minimum)
        if picked is None:
            return None
        predicted = self._predict(model, examples, picked)
        labels = state["labels"][picked]
        original = (state["reference_predicted"][picked] == labels).astype(np.float64)
        drops = original - (predicted == labels).astype(np.float64)
        return Staged({self.metric: Paired(drops, len(examples))})

    @staticmethod
    @torch.inference_mode()
    def _predict(model: SlimModel, examples: list[list[int]], which: Any) -> np.ndarray:
        """The predicted label ids of the examples at `which`, in that order."""
        chosen = [examples[i] for i in which]
        predicted = np.zeros(len(chosen), dtype=np.int64)
        if not chosen:
            return predicted
        for indices, batch in batches_by_length(chosen, 64):
            predicted[indices] = model(**collate(model, batch)).logits.argmax(-1).numpy()
        return predicted
