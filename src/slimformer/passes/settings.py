"""A pass's config fields: the search space they declare and the values they accept.

A config field made with `searchable(default, space, help)` is one the study samples within
`space` (a `Choice`, an `IntRange` or a `FloatRange`); one made with `fixed(default, help)` the
user may set but the study leaves alone. The space is also what a recipe may set, unless the
field declares a wider valid range (`valid=Interval(...)`) for values users legitimately choose
beyond it. `checked_values` turns a recipe's raw values into typed ones or one clear error;
`check_model_bounds` checks the bounds that depend on the model (its number of layers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimformer.adapters import ModelFacts
from slimformer.errors import SlimformerError

Bound = int | Callable[[ModelFacts], int]


@dataclass(frozen=True)
class Choice:
    """Options the study samples. `only=False` (numbers): a user may also set any other
    positive value. `scale`: numbers whose right size depends on the model (a model whose
    training step is cheap affords more distillation steps); the study samples the options
    times `scale(facts)`, `scale_label` says how (e.g. "x 384/width")."""

    options: tuple[Any, ...]
    only: bool = True
    scale: Callable[[ModelFacts], float] | None = None
    scale_label: str = ""

    def __post_init__(self) -> None:
        if self.scale is not None and self.only:
            raise ValueError("a scaled Choice must accept other values too (only=False)")

    def resolve(self, facts: ModelFacts | None) -> tuple[Any, ...]:
        """The options the study samples for this model (without facts: as declared)."""
        if self.scale is None or facts is None:
            return self.options
        factor = self.scale(facts)
        return tuple(_scaled(option, factor) for option in self.options)

    def scaled_value(self, value: Any, facts: ModelFacts | None) -> Any:
        """`value` written for the model the options were declared on, for the model of
        `facts` (an option becomes the option in its place; any other value scales alike)."""
        if self.scale is None or facts is None:
            return value
        return _scaled(value, self.scale(facts))

    def describe(self) -> str:
        options = " | ".join(str(o) for o in self.options)
        return f"({options}) {self.scale_label}" if self.scale_label else options


def _scaled(option: Any, factor: float) -> Any:
    """An option times `factor`: an integer stays one; a float keeps two significant digits,
    so recipes read 0.0003, not 0.00030000000000000003."""
    if isinstance(option, int):
        return round(option * factor)
    return float(f"{option * factor:.2g}")


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

    def as_interval(self) -> Interval:
        low, _, high = self.describe().partition("..")
        return Interval(self.low, self.high, label=f"[{low}, {high}]")


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None

    def describe(self) -> str:
        step = f" step {self.step}" if self.step else ""
        return f"{self.low}..{self.high}{step}"


Space = Choice | IntRange | FloatRange
ModelBound = float | Callable[[ModelFacts], float] | None


@dataclass(frozen=True)
class Interval:
    """Numbers from `low` to `high` (None: unbounded), `low` itself excluded when `open_low`.

    A setting's valid values: declared with `valid=` where users legitimately go beyond the
    searched range (any fraction of FFN neurons in (0, 1], not only the searched 0.3..0.95).
    A bound may depend on the model, like IntRange's; `label` says how the interval reads then.
    """

    low: ModelBound = None
    high: ModelBound = None
    open_low: bool = False
    label: str = ""

    def depends_on_model(self) -> bool:
        return callable(self.low) or callable(self.high)

    def resolve(self, facts: ModelFacts | None) -> tuple[float | None, float | None]:
        """The bounds for `facts`; without facts a model-dependent bound is left open (None)."""

        def bound(value: ModelBound) -> float | None:
            if callable(value):
                return value(facts) if facts is not None else None
            return value

        return bound(self.low), bound(self.high)

    def contains(self, value: float, facts: ModelFacts | None = None) -> bool:
        low, high = self.resolve(facts)
        if low is not None and (value <= low if self.open_low else value < low):
            return False
        return high is None or value <= high

    def positive_only(self) -> bool:
        return self.low == 0 and self.open_low and self.high is None

    def describe(self, facts: ModelFacts | None = None) -> str:
        if self.label and (facts is None or not self.depends_on_model()):
            return self.label
        low, high = self.resolve(facts)
        left = "(" if self.open_low or low is None else "["
        right = "inf)" if high is None else f"{high:g}]"
        return f"{left}{'-inf' if low is None else f'{low:g}'}, {right}"


# Numbers whose field declares no range of its own (a fixed setting such as a temperature, or
# a Choice the user may leave): any positive value.
POSITIVE = Interval(0, None, open_low=True)


def searchable(
    default: Any,
    space: Space,
    help: str,
    valid: Interval | None = None,
    when: tuple[str, tuple[Any, ...]] | None = None,
    cheaper: str | None = None,
    recovers: str | None = None,
    faster_depends_on_cpu: bool = False,
) -> Any:
    """A config field the study may vary within `space`. The space is also what a recipe may
    set, unless `valid` declares a wider range of accepted numbers. `when=(setting, values)`:
    the setting matters only while another (declared earlier) has one of `values`; the study
    varies it only then, and leaves it at its default otherwise. `cheaper` / `recovers`
    ("lower" or "higher", along the space's order): which way makes the model cheaper to
    serve / wins back quality; the study's local search moves them (search/neighbours.py).
    `faster_depends_on_cpu`: a serving setting whose faster option differs between CPUs; the
    local search serves the best recipe with each other option (search/neighbours.py)."""
    for name, way in (("cheaper", cheaper), ("recovers", recovers)):
        if way not in (None, "lower", "higher"):
            raise ValueError(f"{name} must be 'lower' or 'higher', not {way!r}")
    metadata = {"space": space, "help": help} | ({"valid": valid} if valid else {})
    metadata |= {"when": when} if when else {}
    metadata |= {"cheaper": cheaper} if cheaper else {}
    metadata |= {"recovers": recovers} if recovers else {}
    metadata |= {"faster_depends_on_cpu": True} if faster_depends_on_cpu else {}
    return field(default=default, metadata=metadata)


def searched_now(config_class: type, name: str, values: dict[str, Any]) -> bool:
    """Whether the study varies setting `name` given the values chosen for the settings before
    it (see `searchable`'s `when`; one not in `values` counts at its default)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    when = fields[name].metadata.get("when")
    if when is None:
        return True
    other, allowed = when
    value = values[other] if other in values else fields[other].default
    return value in allowed and searched_now(config_class, other, values)


def fixed(default: Any, help: str, valid: Choice | Interval | None = None) -> Any:
    """A config field the user may set but the study leaves alone (numbers: `valid`, else any
    positive value)."""
    return field(default=default, metadata={"help": help} | ({"valid": valid} if valid else {}))


def valid_values(setting: dataclasses.Field) -> Choice | Interval | None:
    """What a config field accepts: its declared `valid` range, else its search space (the
    options of a Choice, the bounds of a range), else any positive number (None: any value of
    the field's type)."""
    if "valid" in setting.metadata:
        return setting.metadata["valid"]
    space = setting.metadata.get("space")
    if isinstance(space, Choice) and space.only:
        return space
    if isinstance(space, IntRange):
        return space.as_interval()
    if isinstance(space, FloatRange):
        return Interval(space.low, space.high)
    if _kind(setting.default) in (int, float):
        return POSITIVE
    return None


def _kind(default: Any) -> type | None:
    """The type a setting's values must have, read from its default."""
    for kind in (bool, int, float, str, tuple):  # bool before int: True is an int too
        if isinstance(default, kind):
            return kind
    return None


def _expected(kind: type | None, valid: Choice | Interval | None, facts: Any = None) -> str:
    """What a setting accepts, as the end of 'SETTING must be ...'."""
    if kind is bool:
        return "true or false"
    if kind is tuple:
        return "a list of names"
    if isinstance(valid, Choice):
        return f"one of {valid.describe()}"
    noun = {int: "an integer", float: "a number", str: "a text"}.get(kind, "a value")
    if isinstance(valid, Interval) and valid.positive_only():
        return f"a positive {noun.split()[-1]}"
    if isinstance(valid, Interval):
        return f"{noun} in {valid.describe(facts)}"
    return noun


def _shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: its repr, cut short (a recipe may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _typed(kind: type | None, value: Any) -> Any:
    """`value` as a value of `kind`, or raise ValueError when it is not one (no conversion
    between text and numbers, no bool for a number, no NaN or infinity)."""
    if isinstance(value, list):
        value = tuple(value)
    if kind is tuple:
        if not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            raise ValueError
        return value
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError
    if kind is int and not isinstance(value, int):
        raise ValueError
    if kind is float:
        try:
            value = float(value)  # an int where a float is expected: 1 reads as 1.0
        except OverflowError:
            raise ValueError from None
        if not math.isfinite(value):
            raise ValueError
    if kind in (bool, str) and not isinstance(value, kind):
        raise ValueError
    return value


# --- checking a recipe's values -----------------------------------------------------------------
def checked_values(owner: str, config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` typed for `config_class`'s fields, each checked against its field's type and
    valid values (`valid_values`); `owner` (the pass's name) starts every error. Bounds that
    depend on the model are left to `check_model_bounds`."""
    values = dict(values)
    known = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise SlimformerError(
            f"{owner}: unknown setting(s) {', '.join(unknown)}; settings are: {', '.join(known)}"
        )
    for key, value in values.items():
        setting = known[key]
        kind, valid = _kind(setting.default), valid_values(setting)
        try:
            values[key] = typed = _typed(kind, value)
            if isinstance(valid, Interval) and not valid.contains(typed):
                raise ValueError
        except ValueError:
            raise SlimformerError(
                f"{owner}: {key} must be {_expected(kind, valid)}, got {_shown(value)}"
            ) from None
        if isinstance(valid, Choice) and typed not in valid.options:
            raise SlimformerError(
                f"{owner}: {key}={_shown(typed)} is not one of {valid.describe()}"
            )
    return values


def check_model_bounds(owner: str, config: Any, facts: ModelFacts) -> None:
    """Refuse a setting of `config` outside a valid range whose bounds depend on the model
    (e.g. at most layers-1 blocks dropped)."""
    for setting in dataclasses.fields(config):
        valid = valid_values(setting)
        if not (isinstance(valid, Interval) and valid.depends_on_model()):
            continue
        value = getattr(config, setting.name)
        if not valid.contains(value, facts):
            expected = _expected(_kind(setting.default), valid, facts)
            raise SlimformerError(
                f"{owner}: {setting.name} must be {expected} for this model "
                f"({valid.describe()}), got {_shown(value)}"
            )


def bounds_depend_on_model(config_class: type) -> bool:
    """Whether a field's valid range depends on the model (see `check_model_bounds`)."""
    return any(
        isinstance(valid, Interval) and valid.depends_on_model()
        for valid in map(valid_values, dataclasses.fields(config_class))
    )
