"""What a study is asked to do: its settings, the parsing of budgets and `--passes` entries,
and which settings of the passes it withholds on a CPU that would not profit from them (or
with a task that gives them nothing to act on)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from slimformer.cpu import CpuFingerprint
from slimformer.errors import SlimformerError
from slimformer.figures import BY_NAME, OBJECTIVES
from slimformer.measure import MeasureSettings
from slimformer.passes import Choice, Pass, get_pass, registered_passes
from slimformer.passes.base import setting_default
from slimformer.search.guards import check_guards
from slimformer.tasks import TaskSpec, make_task
from slimformer.taskspec import check_seed

# (setting, value) pairs of a pass the study does not offer on this CPU, by pass name.
Withheld = Mapping[str, Collection[tuple[str, str]]]


def split_pass_names(entries: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """`--passes` entries are pass names, or `pass:setting=value` to search that pass and
    offer that setting even where this CPU would not profit from it (bf16 without bf16
    instructions, say). Returns the pass names and the requested `pass:setting=value`s."""
    names: list[str] = []
    requested = set()
    for entry in entries:
        name, colon, setting = entry.partition(":")
        if colon:
            if "=" not in setting:
                raise SlimformerError(
                    f"--passes: '{entry}' must look like pass:setting=value, e.g. "
                    "runtime.openvino:precision=bf16"
                )
            key, _, value = setting.partition("=")
            get_pass(name).make_config({key: _typed(get_pass(name), key, value)})
            requested.add(f"{name}:{key}={value}")
        if name not in names:
            names.append(name)
    return tuple(names), frozenset(requested)


def _typed(cls: type[Pass], key: str, text: str) -> Any:
    """A `--passes pass:setting=value` value as the setting's own type, for validation."""
    space = cls.search_space().get(key)
    for option in space.options if isinstance(space, Choice) else ():
        if str(option) == text:
            return option
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def parse_max_drop(text: str | float) -> float:
    """'1%' -> 0.01. For fraction scores (accuracy) that is one percentage point; for other
    scores (perplexity, custom) it is 1% relative to the baseline."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SlimformerError(f"--max-drop must look like 1% or 0.01, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise SlimformerError(f"--max-drop must be a finite, non-negative amount, got '{text}'")
    return value


def parse_duration(text: str | None, option: str = "--time-budget") -> float | None:
    """'90s', '10m', '1.5h' or plain seconds -> seconds; `option` names it in errors."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:])
    try:
        seconds = float(raw[:-1]) * scale if scale else float(raw)
    except ValueError:
        raise SlimformerError(f"{option} must look like 10m, 90s or 1h, got '{text}'") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise SlimformerError(f"{option} must be a positive, finite duration, got '{text}'")
    return seconds


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class StudySettings:
    model: str
    task: TaskSpec
    max_drop: float = 0.01
    objective: str = "latency"
    trials: int | None = 12
    time_budget_s: float | None = None
    passes: tuple[str, ...] = ()  # empty = every registered pass
    seed: int = 0
    # Recipes (as dicts) tried first, before the sampler explores: known-good starting points.
    starts: tuple[dict[str, Any], ...] = ()
    # Measure each engine's int8 alone before the starts (portfolio.py); api/CLI default: on.
    warm_start: bool = False
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    # Alternating fresh-process timings of baseline and chosen model when the study ends.
    confirm_rounds: int = 3
    # Conditions on the task's figures a trial must meet beside max_drop (guards.py), the
    # task's defaults already merged in (api.optimize), so run.json holds all that applied.
    guards: tuple[str, ...] = ()
    # Multi-fidelity trials: a candidate shown over budget on a subset of the scored split
    # (tasks/staging.py), or whose distillation falls behind (search/early_stop.py), stops
    # early as pruned. Off: every candidate is timed and scored in full.
    early_stop: bool = True
    # A recipe's model as it stood after its training passes is kept in the run folder, and a
    # later trial that starts with the same steps loads it instead of training again
    # (trained_prefix.py). Off: every trial builds from the original.
    reuse_trained: bool = True
    # Every other trial, a one-edit neighbour of the best recipes so far (neighbours.py);
    # api/CLI default: on.
    local_search: bool = False

    def __post_init__(self) -> None:
        if not _number(self.max_drop) or not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise SlimformerError(
                f"--max-drop must be a finite, non-negative amount, got {self.max_drop!r}"
            )
        if self.time_budget_s is not None and not (
            _number(self.time_budget_s)
            and math.isfinite(self.time_budget_s)
            and self.time_budget_s > 0
        ):
            raise SlimformerError(
                f"--time-budget must be a positive, finite duration, got {self.time_budget_s!r}"
            )
        check_seed(self.seed, "--seed")
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise SlimformerError(
                f"unknown objective '{self.objective}'; choose one of: {', '.join(OBJECTIVES)}"
            )
        if self.trials is not None and self.trials < 1:
            raise SlimformerError("--trials must be at least 1")
        if self.trials is None and self.time_budget_s is None:
            raise SlimformerError("give --trials N or --time-budget (e.g. 10m)")
        if self.confirm_rounds < 0:
            raise SlimformerError("--confirm-rounds must be 0 (off) or more")
        if not all(isinstance(entry, str) for entry in self.passes):
            raise SlimformerError("--passes must be pass names")
        if not all(isinstance(start, dict) for start in self.starts):
            raise SlimformerError("a start recipe must be a mapping")
        names, _ = split_pass_names(self.passes)
        for name in names:
            missing = [r for r in get_pass(name).requires if r not in names]
            if missing:
                raise SlimformerError(
                    f"--passes: {name} needs {', '.join(missing)}; add it to the list"
                )
        task = make_task(self.task)
        if BY_NAME[self.objective].causal_only and task.name != "perplexity":
            raise SlimformerError(
                f"--objective {self.objective} is a decoder's figure (task perplexity); for "
                f"the {task.name} task choose latency, throughput or memory"
            )
        check_guards(self.guards, task.reported_figures(), task.name)

    @property
    def cost_field(self) -> str:
        """The measurement field the objective minimizes or maximizes."""
        return OBJECTIVES[self.objective][0]

    @property
    def cost_direction(self) -> str:
        return OBJECTIVES[self.objective][1]

    def pass_classes(self) -> list[type[Pass]]:
        names, _ = split_pass_names(self.passes)
        if not names:
            return [p for p in registered_passes() if p.searched_by_default]
        return sorted((get_pass(n) for n in names), key=lambda c: (c.stage, c.name))

    def requested_settings(self) -> frozenset[str]:
        """`pass:setting=value`s the user asked for by name: in --passes, or set explicitly
        by a --start recipe (its settings are the user's own choice)."""
        _, requested = split_pass_names(self.passes)
        from_starts = {
            f"{step['pass']}:{key}={value}"
            for start in self.starts
            for step in start.get("steps") or ()
            for key, value in (step.get("config") or {}).items()
        }
        return requested | from_starts

    def withheld(self, cpu: CpuFingerprint) -> tuple[dict[str, set[tuple[str, str]]], list[str]]:
        """What the study does not offer on `cpu` (by pass: (setting, value) pairs; a pass
        withheld whole is left out of `pass_classes` by the caller through the "" key), and
        one note per setting kept only because the user named it. Settings that act on a
        general corpus are left at their default for a task that has none."""
        named, _ = split_pass_names(self.passes)
        requested = self.requested_settings()
        withheld: dict[str, set[tuple[str, str]]] = {}
        notes = []
        for cls in self.pass_classes():
            for setting, capability in cls.without_payoff(cpu).items():
                asked = (
                    (cls.name in named) if setting == "" else (f"{cls.name}:{setting}" in requested)
                )
                label = cls.name if setting == "" else f"{cls.name}:{setting}"
                if asked:
                    notes.append(
                        f"{label} is searched as asked, though this CPU lacks {capability} "
                        "and it is unlikely to pay off here"
                    )
                else:
                    key, _, value = setting.partition("=")
                    withheld.setdefault(cls.name, set()).add((key, value))
        if not make_task(self.task).has_general_corpus:
            for cls in self.pass_classes():
                for setting in cls.general_corpus_settings:
                    default = setting_default(cls.config_class, setting)
                    space = cls.search_space()[setting]
                    options = space.options if isinstance(space, Choice) else ()
                    withheld.setdefault(cls.name, set()).update(
                        (setting, str(o)) for o in options if o != default
                    )
        return withheld, notes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.to_dict()
        data["passes"] = list(self.passes)
        data["starts"] = list(self.starts)
        data["guards"] = list(self.guards)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        """From `run.json`, which also holds facts about the run (its CPU) beside them."""
        own = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in own}
        data["task"] = TaskSpec.from_dict(data["task"])
        data["passes"] = tuple(data.get("passes") or ())
        data["starts"] = tuple(data.get("starts") or ())
        data["guards"] = tuple(data.get("guards") or ())
        data["measure"] = MeasureSettings(**data.get("measure") or {})
        return cls(**data)
