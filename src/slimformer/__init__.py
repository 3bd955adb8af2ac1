"""slimformer: make trained transformers faster and lighter, with every candidate measured."""

import os

# Offline by design: no hub look-ups, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slimformer.api import BenchResult, apply, benchmark, load, optimize, worker  # noqa: E402
from slimformer.errors import SlimformerError  # noqa: E402
from slimformer.model import SlimModel  # noqa: E402
from slimformer.recipe import Recipe  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BenchResult",
    "Recipe",
    "SlimModel",
    "SlimformerError",
    "apply",
    "benchmark",
    "load",
    "optimize",
    "worker",
]
