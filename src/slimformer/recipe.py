"""A recipe: the ordered passes (with their settings) that turn a model into a candidate.

Serialized as YAML beside every saved model; `slimformer apply RECIPE MODEL` replays it. A step
also records what the pass decided (`resolved`, e.g. which layers it dropped) so a reader can
see it, but replay recomputes those decisions from the same calibration data and seed.

Data only: this module reads and writes recipes and checks their shape, never the passes they
name (it imports no pass). `slimformer.pipeline` validates a recipe against the pass registry
(names, settings, requirements, conflicts, groups) and applies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimformer.errors import SlimformerError
from slimformer.files import read_yaml
from slimformer.taskspec import TaskSpec, check_seed

FORMAT = "slimformer-recipe/1"


@dataclass(frozen=True)
class Step:
    pass_name: str
    config: dict[str, Any]
    resolved: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()
    task: TaskSpec | None = None  # the calibration data's source; None = the model's default
    seed: int = 0

    def describe(self) -> str:
        if not self.steps:
            return "baseline"
        parts = []
        for step in self.steps:
            settings = ",".join(
                f"{k}={_short(v)}" for k, v in step.config.items() if v not in ([], ())
            )
            parts.append(f"{step.pass_name}({settings})" if settings else step.pass_name)
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "seed": self.seed,
            "task": self.task.to_dict() if self.task else None,
            "steps": [
                {"pass": s.pass_name, "config": plain(s.config), "resolved": plain(s.resolved)}
                for s in self.steps
            ],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> Recipe:
        """The recipe `data` describes, its shape checked (not its passes: see
        `pipeline.check_recipe`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SlimformerError(
                f"{origin} is not a slimformer recipe (expected 'format: {FORMAT}'); "
                "use a recipe.yaml written by slimformer"
            )
        steps_data = data.get("steps") or []
        if not isinstance(steps_data, list):
            raise SlimformerError(f"{origin}: 'steps' must be a list of passes")
        steps = []
        for index, item in enumerate(steps_data):
            if not isinstance(item, dict) or "pass" not in item:
                raise SlimformerError(f"{origin}: step {index + 1} needs a 'pass' name")
            config = item.get("config") or {}
            resolved = item.get("resolved") or {}
            for part, value in (("config", config), ("resolved", resolved)):
                if not isinstance(value, dict):
                    raise SlimformerError(f"{origin}: step {index + 1} '{part}' must be a mapping")
            steps.append(Step(str(item["pass"]), config, resolved))
        task = data.get("task")
        seed = data.get("seed", 0)
        check_seed(seed, f"{origin}: 'seed'")
        return cls(
            steps=tuple(steps),
            task=TaskSpec.from_dict(task, origin) if task else None,
            seed=seed,
        )

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe.yaml (or the one in a folder); `pipeline.load_recipe` also validates."""
        path = Path(path)
        if path.is_dir():
            path = path / "recipe.yaml"
        if not path.is_file():
            raise SlimformerError(f"recipe not found: {path}")
        try:
            data = read_yaml(path)
        except ValueError as error:
            raise SlimformerError(f"recipe {path} {error}") from None
        return cls.from_dict(data, origin=str(path))


def plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists, dataclasses become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
