"""Tasks: how quality is scored. `make_task(spec)` builds one from its serializable spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from slimformer.tasks.base import Score, State, Task, quality_drop
from slimformer.tasks.spec import TASK_NAMES, TaskSpec


def make_task(spec: TaskSpec) -> Task:
    from slimformer.tasks.classification import ClassificationTask
    from slimformer.tasks.custom import CustomTask
    from slimformer.tasks.embedding import EmbeddingTask
    from slimformer.tasks.perplexity import PerplexityTask

    classes = {
        cls.name: cls for cls in (EmbeddingTask, ClassificationTask, PerplexityTask, CustomTask)
    }
    return classes[spec.name](spec)


def default_task_for(head: str) -> str:
    return {
        "embedding": "embedding",
        "causal-lm": "perplexity",
        "sequence-classification": "classification",
    }.get(head, "embedding")


def save_state(state: State, path: Path) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


def load_state(path: Path) -> State:
    return load_file(str(path))


__all__ = [
    "TASK_NAMES",
    "Score",
    "State",
    "Task",
    "TaskSpec",
    "default_task_for",
    "load_state",
    "make_task",
    "quality_drop",
    "save_state",
]
