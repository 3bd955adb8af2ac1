"""Tasks: how quality is scored. `make_task(spec)` builds one from its serializable spec."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from slimformer.tasks.base import Score, State, Task, quality_drop
from slimformer.taskspec import TASK_NAMES, TaskSpec

if TYPE_CHECKING:
    from slimformer.model import SlimModel


def make_task(spec: TaskSpec) -> Task:
    from slimformer.tasks.classification import ClassificationTask
    from slimformer.tasks.custom import CustomTask
    from slimformer.tasks.embedding import EmbeddingTask
    from slimformer.tasks.image_classification import ImageClassificationTask
    from slimformer.tasks.perplexity import PerplexityTask

    classes = {
        cls.name: cls
        for cls in (
            EmbeddingTask,
            ClassificationTask,
            PerplexityTask,
            CustomTask,
            ImageClassificationTask,
        )
    }
    return classes[spec.name](spec)


def default_task_for(head: str) -> str:
    return {
        "embedding": "embedding",
        "causal-lm": "perplexity",
        "sequence-classification": "classification",
        "image-classification": "image-classification",
    }.get(head, "embedding")


def save_state(state: State, path: Path) -> None:
    """Write atomically: a crash leaves no half-written state that later runs would trust."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def load_state(path: Path) -> State:
    return load_file(str(path))


def _data_fingerprint(data: Path) -> list | None:
    """The user's data file, or every file of a data folder (image classes), by path, size
    and mtime."""
    if data.is_file():
        return [str(data.resolve()), data.stat().st_size, data.stat().st_mtime_ns]
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file())
        listing = [
            (str(p.relative_to(data)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
        ]
        return [str(data.resolve()), hashlib.sha256(json.dumps(listing).encode()).hexdigest()]
    return None


def reference_state(reference_dir: Path, spec: TaskSpec, loaded: SlimModel | None = None) -> Path:
    """The task's arrays from the reference (original) model, computed once per machine.

    Keyed by the checkpoint's path and weight files (size, mtime), the task spec, the user's
    data file (size, mtime) and the task's state version, so a re-saved model, edited data or
    another task gets its own entry.
    """
    from slimformer import assets
    from slimformer.checkpoint import load_model

    reference_dir = Path(reference_dir).resolve()
    weights = sorted(p for p in reference_dir.iterdir() if p.suffix == ".safetensors")
    data = Path(spec.data) if spec.data else None
    task = make_task(spec)
    fingerprint = json.dumps(
        [
            str(reference_dir),
            [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
            spec.to_dict(),
            _data_fingerprint(data) if data is not None else None,
            task.state_version,
        ]
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    path = assets.cache_dir() / "task-state" / f"{spec.name}-{digest}.safetensors"
    if not path.is_file():
        model = loaded or load_model(reference_dir, head=task.head)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(task.prepare(model), path)
    return path


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
    "reference_state",
    "save_state",
]
