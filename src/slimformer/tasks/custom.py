"""The user's own score: `module:function` takes the model and returns a float."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from slimformer import assets
from slimformer.errors import SlimformerError
from slimformer.tasks.base import Score, State, Task

if TYPE_CHECKING:
    from slimformer.model import SlimModel


class CustomTask(Task):
    name = "custom"
    head = None
    metric = "custom"
    bounded = False

    def __init__(self, spec):
        super().__init__(spec)
        self.direction = spec.direction

    @cached_property
    def function(self) -> Callable[[SlimModel], float]:
        module_name, _, attr = (self.spec.function or "").partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # so a score function beside the user works
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise SlimformerError(
                f"cannot import '{module_name}' for --function: {error}"
            ) from None
        function = getattr(module, attr, None)
        if not callable(function):
            raise SlimformerError(f"'{module_name}' has no function '{attr}'")
        return function

    def texts(self, split: str) -> list[str]:
        """Calibration and timing texts: the user's text file (one per line) or Wikipedia."""
        if self.spec.data:
            path = Path(self.spec.data)
            if not path.is_file():
                raise SlimformerError(f"text file not found: {path}")
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not lines:
                raise SlimformerError(f"text file {path} is empty")
        else:
            lines = assets.wikipedia_sentences()
        half = len(lines) // 2
        return lines[:half][:256] if split in ("calibration", "training") else lines[half:][:256]

    def prepare(self, reference: SlimModel) -> State:
        self.function  # noqa: B018  (import now so a typo fails before any work)
        return {}

    def score(self, model: SlimModel, state: State) -> Score:
        value = self.function(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SlimformerError(
                f"{self.spec.function} returned {type(value).__name__}; it must return a float"
            ) from None
        if not math.isfinite(value):
            raise SlimformerError(f"{self.spec.function} returned {value}; it must be finite")
        return self.make_score(value)
