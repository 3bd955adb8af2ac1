"""What a pass is, how its config declares its search space, and the registry.

A pass is one technique with a frozen config dataclass. Each config field may carry a search
space in its metadata (`searchable(...)`), so the config *is* the search space: the study
samples it, `slimformer passes` prints it, and a recipe stores one point of it.

A pass declares where it runs in a recipe (its `Phase`, and its `order` inside the phase) and
what the runner must give or guarantee it (`needs_calibration`, `needs_training`, `terminal`);
`slimformer.pipeline` checks those before any pass runs. Passes register with `@register_pass`
when their module is imported; `slimformer.passes` imports every built-in one.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from slimformer.adapters import ModelFacts
from slimformer.errors import SlimformerError

if TYPE_CHECKING:
    import torch

    from slimformer.cpu import CpuFingerprint
    from slimformer.model import SlimModel

Bound = int | Callable[[ModelFacts], int]


@dataclass(frozen=True)
class Choice:
    """Options the study samples. `only=False` (numbers): a user may also set other values."""

    options: tuple[Any, ...]
    only: bool = True

    def describe(self) -> str:
        return " | ".join(str(o) for o in self.options)


@dataclass(frozen=True)
class IntRange:
    """An integer range; a bound may depend on the model (e.g. its number of layers)."""

    low: Bound
    high: Bound
    label: str = ""  # how the bounds read when they are functions, e.g. "1..layers/2"

    def resolve(self, facts: ModelFacts) -> tuple[int, int]:
        low = self.low(facts) if callable(self.low) else self.low
        high = self.high(facts) if callable(self.high) else self.high
        return low, max(low, high)

    def describe(self) -> str:
        return self.label or f"{self.low}..{self.high}"


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None

    def describe(self) -> str:
        step = f" step {self.step}" if self.step else ""
        return f"{self.low}..{self.high}{step}"


Space = Choice | IntRange | FloatRange


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def searchable(default: Any, space: Space, help: str) -> Any:
    """A config field the study may vary within `space`."""
    return field(default=default, metadata={"space": space, "help": help})


def fixed(default: Any, help: str) -> Any:
    """A config field the user may set but the study leaves alone."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: calibration batches, a seed, a progress callback."""

    calibration: Sequence[dict[str, torch.Tensor]] = ()
    # Unlabeled task inputs for training passes (distillation), disjoint from scored data.
    training: Sequence[dict[str, torch.Tensor]] = ()
    # General-domain inputs a training pass may mix in (the task's `general_texts`); unscored.
    general: Sequence[dict[str, torch.Tensor]] = ()
    teacher: Any = None  # the model before this recipe ran (a SlimModel)
    seed: int = 0
    progress: Callable[[str], None] = lambda message: None


class Phase(enum.IntEnum):
    """Where a pass runs in a recipe, in this order (a recipe keeps its passes sorted by it)."""

    STRUCTURE = 1  # remove blocks, neurons, heads
    RECOVERY = 2  # train the smaller model back towards the original
    QUANTIZATION = 3  # integer weights and activations
    PRECISION = 4  # float width of what is left
    BATCHING = 5  # how batches of variable-length inputs are formed and run
    RUNTIME = 6  # the engine that serves the model


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
    # Passes of one group exclude each other (one runtime serves a model): the study picks at
    # most one of them per recipe.
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
    def applies_to(cls, model: SlimModel) -> bool:
        """Whether the study should offer this pass for `model` at all."""
        return True

    @abstractmethod
    def apply(self, model: SlimModel, config: Any, ctx: PassContext) -> dict[str, Any]:
        """Transform `model` in place; return the decisions made (e.g. which layers went)."""

    # --- config helpers -----------------------------------------------------------------
    @classmethod
    def make_config(cls, values: dict[str, Any] | None = None) -> Any:
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SlimformerError(
                f"{cls.name}: unknown setting(s) {', '.join(unknown)}; "
                f"settings are: {', '.join(known)}"
            )
        for key, value in values.items():
            space = known[key].metadata.get("space")
            if isinstance(value, list):
                values[key] = value = tuple(value)
            if isinstance(space, Choice) and space.only and value not in space.options:
                raise SlimformerError(
                    f"{cls.name}: {key}={value!r} is not one of {space.describe()}"
                )
            if isinstance(space, Choice) and not space.only and not _positive_number(value):
                raise SlimformerError(
                    f"{cls.name}: {key} must be a positive number (searched: "
                    f"{space.describe()}), got {value!r}"
                )
            # Range bounds may depend on the model, so only the type is checked here.
            if isinstance(space, IntRange) and (
                not isinstance(value, int) or isinstance(value, bool)
            ):
                raise SlimformerError(f"{cls.name}: {key} must be an integer, got {value!r}")
            if isinstance(space, FloatRange) and (
                not isinstance(value, (int, float)) or isinstance(value, bool)
            ):
                raise SlimformerError(f"{cls.name}: {key} must be a number, got {value!r}")
            default = known[key].default
            if isinstance(default, tuple) and not (
                isinstance(value, tuple) and all(isinstance(v, str) for v in value)
            ):
                raise SlimformerError(f"{cls.name}: {key} must be a list of names, got {value!r}")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise SlimformerError(f"{cls.name}: {key} must be true or false, got {value!r}")
        try:
            config = cls.config_class(**values)
        except (TypeError, ValueError) as error:
            raise SlimformerError(f"{cls.name}: invalid settings: {error}") from None
        return cls.normalize(config)

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
