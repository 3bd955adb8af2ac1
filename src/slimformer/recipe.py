"""A recipe: the ordered passes (with their settings) that turn a model into a candidate.

Serialized as YAML beside every saved model; `slimformer apply RECIPE MODEL` replays it. A step
also records what the pass decided (`resolved`, e.g. which layers it dropped) so a reader can
see it, but replay recomputes those decisions from the same calibration data and seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimformer.errors import SlimformerError
from slimformer.passes import get_pass
from slimformer.tasks.spec import TaskSpec

FORMAT = "slimformer-recipe/1"


@dataclass(frozen=True)
class Step:
    pass_name: str
    config: dict[str, Any]
    resolved: dict[str, Any] = field(default_factory=dict)

    def pass_config(self) -> Any:
        return get_pass(self.pass_name).make_config(self.config)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()
    task: TaskSpec | None = None  # the calibration data's source; None = the model's default
    seed: int = 0

    def sorted_steps(self) -> tuple[Step, ...]:
        return tuple(sorted(self.steps, key=lambda s: get_pass(s.pass_name).stage))

    def check_requirements(self) -> None:
        """Every pass that needs another (e.g. smoothing needs static int8) has it."""
        names = {step.pass_name for step in self.steps}
        for step in self.steps:
            missing = [r for r in get_pass(step.pass_name).requires if r not in names]
            if missing:
                raise SlimformerError(
                    f"{step.pass_name} needs {', '.join(missing)} in the same recipe; add it"
                )
        for step in self.steps:
            for other, reason in get_pass(step.pass_name).conflicts.items():
                if any(_matches(earlier, other) for earlier in self.steps):
                    raise SlimformerError(f"{step.pass_name} cannot follow {other}: {reason}")
        by_group: dict[str, list[str]] = {}
        for step in self.steps:
            group = get_pass(step.pass_name).group
            if group:
                by_group.setdefault(group, []).append(step.pass_name)
        for group, members in by_group.items():
            if len(members) > 1:
                raise SlimformerError(
                    f"a recipe takes one {group} pass, this one has {', '.join(members)}; keep one"
                )

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
                {"pass": s.pass_name, "config": _plain(s.config), "resolved": _plain(s.resolved)}
                for s in self.steps
            ],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> Recipe:
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
            if not isinstance(config, dict):
                raise SlimformerError(f"{origin}: step {index + 1} 'config' must be a mapping")
            step = Step(str(item["pass"]), config, item.get("resolved") or {})
            step.pass_config()  # validates the pass name and its settings now, not mid-run
            steps.append(step)
        task = data.get("task")
        seed = data.get("seed", 0)
        if not isinstance(seed, int):
            raise SlimformerError(f"{origin}: 'seed' must be an integer")
        recipe = cls(
            steps=tuple(steps),
            task=TaskSpec.from_dict(task, origin) if task else None,
            seed=seed,
        )
        recipe.check_requirements()
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if path.is_dir():
            path = path / "recipe.yaml"
        if not path.is_file():
            raise SlimformerError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise SlimformerError(f"recipe {path} is not valid YAML{where}") from None
        return cls.from_dict(data, origin=str(path))


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists, dataclasses become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def apply_recipe(
    model: Any,
    recipe: Recipe,
    calibration: Any = (),
    progress: Any = None,
    training: Any = (),
) -> Any:
    """Replay `recipe` on a copy of `model` (a SlimModel); the input model is left untouched."""
    import torch

    from slimformer.passes import PassContext

    recipe.check_requirements()
    result = model.copy()
    applied = []
    for step in recipe.sorted_steps():
        pass_class = get_pass(step.pass_name)
        config = step.pass_config()
        torch.manual_seed(recipe.seed)
        ctx = PassContext(
            calibration=calibration,
            training=training,
            teacher=model,
            seed=recipe.seed,
            progress=progress or (lambda message: None),
        )
        if progress:
            progress(step.pass_name)
        resolved = pass_class().apply(result, config, ctx)
        applied.append(Step(step.pass_name, _plain(config), resolved))
    result.recipe = Recipe(
        steps=model.recipe.steps + tuple(applied),
        task=recipe.task or model.recipe.task,
        seed=recipe.seed,
    )
    return result


def _matches(step: Step, pattern: str) -> bool:
    """Whether `step` is `pass` or `pass:setting=value` (a setting the step sets explicitly)."""
    name, _, setting = pattern.partition(":")
    if step.pass_name != name:
        return False
    key, _, value = setting.partition("=")
    return not setting or str(step.config.get(key)) == value
