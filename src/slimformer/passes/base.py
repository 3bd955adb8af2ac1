"""What a pass is, how its config declares its search space, and the registry.

A pass is one technique with a frozen config dataclass. Each config field may carry a search
space in its metadata (`searchable(...)`), so the config *is* the search space: the study
samples it, `slimformer passes` prints it, and a recipe stores one point of it. The space is
also what a recipe may set (`make_config` refuses anything else), unless a field declares a
wider valid range (`valid=Interval(...)`) for values users legitimately choose beyond it.

A pass declares where it runs in a recipe (its `Phase`, and its `order` inside the phase) and
what the runner must give or guarantee it (`needs_calibration`, `needs_training`, `terminal`);
`slimformer.pipeline` checks those before any pass runs. Passes register with `@register_pass`
when their module is imported; `slimformer.passes` imports every built-in one.

How a config field declares its space and its valid values, and the checks of a recipe's
values against them, live in `passes.settings` (re-exported here for the passes).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from slimformer.adapters import ModelFacts
from slimformer.errors import SlimformerError

# Re-exported: every pass declares its config with these.
from slimformer.passes.settings import Choice as Choice
from slimformer.passes.settings import FloatRange as FloatRange
from slimformer.passes.settings import Interval as Interval
from slimformer.passes.settings import IntRange as IntRange
from slimformer.passes.settings import Space as Space
from slimformer.passes.settings import (
    bounds_depend_on_model,
    check_model_bounds,
    checked_values,
)
from slimformer.passes.settings import fixed as fixed
from slimformer.passes.settings import searchable as searchable
from slimformer.passes.settings import valid_values as valid_values

if TYPE_CHECKING:
    import torch

    from slimformer.cpu import CpuFingerprint
    from slimformer.model import SlimModel

# The deadline of the passes this process runs (epoch seconds), set by the study's build child
# around `apply_recipe` (`passes_deadline`): every PassContext made meanwhile carries it.
_DEADLINE: ContextVar[float | None] = ContextVar("passes_deadline", default=None)
# Where a training pass's intermediate figures go (step, value), set by the study's build child
# around `apply_recipe` when the study stops trials early (search/early_stop.py); None: nobody
# listens, and the passes compute none.
_INTERMEDIATE: ContextVar[Callable[[int, float], None] | None] = ContextVar(
    "intermediate", default=None
)
T = TypeVar("T")


@contextmanager
def passes_deadline(at: float | None) -> Iterator[None]:
    """Passes run inside this block must be done by `at` (epoch seconds; None: no limit)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@contextmanager
def intermediate_values(report: Callable[[int, float], None] | None) -> Iterator[None]:
    """Passes run inside this block report their intermediate figures to `report`."""
    token = _INTERMEDIATE.set(report)
    try:
        yield
    finally:
        _INTERMEDIATE.reset(token)


class DeadlineReached(SlimformerError):
    """A long pass stopped at the study's deadline; its trial fails with this reason."""


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: calibration batches, a seed, a progress callback,
    and the deadline long passes stop at."""

    calibration: Sequence[dict[str, torch.Tensor]] = ()
    # Unlabeled task inputs for training passes (distillation), disjoint from scored data.
    training: Sequence[dict[str, torch.Tensor]] = ()
    # General-domain inputs a training pass may mix in (the task's `general_texts`); unscored.
    general: Sequence[dict[str, torch.Tensor]] = ()
    teacher: Any = None  # the model before this recipe ran (a SlimModel)
    seed: int = 0
    progress: Callable[[str], None] = lambda message: None
    # Epoch seconds by which the pass must be done (the study's time budget); None: no limit.
    deadline: float | None = field(default_factory=_DEADLINE.get)
    # A training pass's intermediate figure (step, value; lower is better: a held-out loss),
    # which a study may stop it on (the pass is then killed with its process); None: nobody
    # listens, so the pass need not compute one.
    report_value: Callable[[int, float], None] | None = field(default_factory=_INTERMEDIATE.get)

    def time_left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - time.time()

    def check_deadline(self, what: str) -> None:
        """Raise `DeadlineReached` once the deadline has passed."""
        if self.time_left() <= 0:
            raise DeadlineReached(f"{what} stopped at the study's deadline")

    def until_deadline(self, items: Iterable[T], what: str) -> Iterator[T]:
        """`items`, the deadline checked before each (a long calibration stops at it)."""
        for item in items:
            self.check_deadline(what)
            yield item


class Phase(enum.IntEnum):
    """Where a pass runs in a recipe, in this order (a recipe keeps its passes sorted by it)."""

    STRUCTURE = 1  # remove blocks, neurons, heads
    RECOVERY = 2  # train the smaller model back towards the original
    QUANTIZATION = 3  # integer weights and activations
    PRECISION = 4  # float width of what is left
    BATCHING = 5  # how batches of variable-length inputs are formed and run
    RUNTIME = 6  # the engine that serves the model


# The groups of mutually exclusive passes, each with the reason a recipe takes only one.
GROUPS = {
    "runtime": "one engine serves a model",
    "quantizer": (
        "a layer is quantized once; a second quantizer cannot take the first one's int8 or "
        "int4 layers"
    ),
}


class Pass(ABC):
    """One technique. Subclasses set the class attributes and implement `apply`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type]
    phase: ClassVar[Phase]
    # Position among the passes of the same phase (e.g. layers are dropped before FFN neurons
    # are scored); passes with equal phase and order keep the recipe's order.
    order: ClassVar[int] = 0
    # The sort key of passes in a recipe, (phase, order): set for every subclass.
    stage: ClassVar[tuple[Phase, int]]
    # Uses calibration batches: the runner prepares them (see also `calibration_required`).
    needs_calibration: ClassVar[bool] = False
    # Trains the model on unlabeled task inputs: the runner prepares training batches.
    needs_training: ClassVar[bool] = False
    # Hands the model to another engine: nothing can follow it in a recipe.
    terminal: ClassVar[bool] = False
    # False for passes that only pay off on other hardware: searched only when named.
    searched_by_default: ClassVar[bool] = True
    # Passes that must be in the same recipe for this one to make sense.
    requires: ClassVar[tuple[str, ...]] = ()
    # Passes of one group (a key of GROUPS) exclude each other: the study picks at most one of
    # them per recipe, and a recipe with two is refused.
    group: ClassVar[str | None] = None
    # Passes (`name`, or `name:setting=value` for one setting of it) that cannot come before
    # this one in a recipe, with the reason: checked before any pass runs, so a doomed recipe
    # costs nothing.
    conflicts: ClassVar[dict[str, str]] = {}
    # Settings (`setting=value`, or "" for the whole pass) that only pay off on CPUs with a
    # capability (`cpu.CAPABILITIES`: "native_bf16", "vnni"). Elsewhere the study does not
    # offer them unless the user names them; `slimformer passes` shows which this CPU offers.
    pays_off_only_with: ClassVar[dict[str, str]] = {}
    # Settings that act only on a general corpus the task provides (`Task.general_texts`):
    # with a task that has none, the study offers only their defaults.
    general_corpus_settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def conflicts_for(cls, facts: Any) -> dict[str, str]:
        """`conflicts`, plus those that depend on the model (`ModelFacts`): the search space
        leaves these passes out of recipes with this one."""
        return cls.conflicts

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "phase" in cls.__dict__ or "order" in cls.__dict__:
            cls.stage = (cls.phase, cls.order)

    @classmethod
    def calibration_required(cls, config: Any) -> bool:
        """Whether this config cannot run without calibration batches (checked by the runner
        before any pass runs); passes that only sometimes use them narrow this."""
        return cls.needs_calibration

    @classmethod
    def normalize(cls, config: Any) -> Any:
        """The canonical config among those that build the same model (settings the others
        make irrelevant set to their defaults), so one model is never measured twice."""
        return config

    @classmethod
    def changes_nothing(cls, config: Any, facts: ModelFacts) -> bool:
        """Whether `config` would leave a model of these sizes as it is (keeping 0.75 of 2
        heads keeps both): the search leaves such a step out, so that the model is not
        measured again under another name."""
        return False

    @classmethod
    def as_applied(cls, config: Any, resolved: dict[str, Any]) -> Any:
        """The config that rebuilds what this run of the pass built, recorded in the model's
        recipe: the config itself, unless the pass stopped early (distillation at a deadline
        records the steps it trained), so that replaying a saved recipe gives the saved model."""
        return config

    @classmethod
    def work(cls, config: Any) -> float | None:
        """How much work a run with `config` does, in units its time grows in proportion to
        (a distillation's steps), so the study's time budget can estimate a run of 50 steps
        from one of 200; None: its time is estimated from earlier runs as a whole."""
        return None

    @classmethod
    def applies_to(cls, model: SlimModel) -> bool:
        """Whether the study should offer this pass for `model` at all."""
        return True

    @abstractmethod
    def apply(self, model: SlimModel, config: Any, ctx: PassContext) -> dict[str, Any]:
        """Transform `model` in place; return the decisions made (e.g. which layers went)."""

    # --- config helpers -----------------------------------------------------------------
    @classmethod
    def make_config(cls, values: dict[str, Any] | None = None) -> Any:
        """The config `values` set (the rest at their defaults), normalized. Every value is
        checked against its field's type and valid values (`valid_values`); bounds that
        depend on the model are checked by `check_for_model` before the pass runs."""
        values = checked_values(cls.name, cls.config_class, values or {})
        try:
            config = cls.config_class(**values)
        except (TypeError, ValueError) as error:
            raise SlimformerError(f"{cls.name}: invalid settings: {error}") from None
        return cls.normalize(config)

    @classmethod
    def check_for_model(cls, config: Any, facts: ModelFacts) -> None:
        """Refuse a setting outside a valid range whose bounds depend on the model (e.g. at
        most layers-1 blocks dropped); `make_config` checked everything else."""
        check_model_bounds(cls.name, config, facts)

    @classmethod
    def depends_on_model(cls) -> bool:
        """Whether a setting's valid range depends on the model (see `check_for_model`)."""
        return bounds_depend_on_model(cls.config_class)

    @classmethod
    def search_space(cls) -> dict[str, Space]:
        return {
            f.name: f.metadata["space"]
            for f in dataclasses.fields(cls.config_class)
            if "space" in f.metadata
        }

    @classmethod
    def without_payoff(cls, cpu: CpuFingerprint) -> dict[str, str]:
        """The settings (`setting=value`, "" = the whole pass) that `cpu` lacks the capability
        to profit from, each with the capability it would need."""
        from slimformer.cpu import CAPABILITIES

        return {
            setting: capability
            for setting, capability in cls.pays_off_only_with.items()
            if not CAPABILITIES[capability](cpu)
        }


def setting_default(config: Any, setting: str) -> Any:
    """The declared default of one setting of a config."""
    return next(f.default for f in dataclasses.fields(config) if f.name == setting)


# Filled as pass modules are imported; `slimformer.passes` imports every built-in one, so the
# registry is complete wherever `get_pass` is reachable from outside this package.
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name} registered twice")
    if not isinstance(getattr(cls, "phase", None), Phase):
        raise ValueError(f"pass {cls.name} declares no Phase")
    if cls.group is not None and cls.group not in GROUPS:
        raise ValueError(f"pass {cls.name} declares an unknown group {cls.group!r}")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SlimformerError(
            f"unknown pass '{name}'; registered passes: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_passes() -> list[type[Pass]]:
    return sorted(_REGISTRY.values(), key=lambda cls: (cls.stage, cls.name))
