"""Silence transformers' logs, warnings and progress bars around a load, save or conversion."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(capture_output: bool = False) -> Iterator[None]:
    """Within the block, transformers logs errors only and draws no progress bars; Python
    warnings are ignored. `capture_output` also holds back stdout/stderr (some bars, such as
    GGUF de-quantization's, are bare tqdm that no switch turns off) and replays them if the
    block fails, so the error keeps its context."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as redirect:
            warnings.simplefilter("ignore")
            if capture_output:
                redirect.enter_context(contextlib.redirect_stderr(captured))
                redirect.enter_context(contextlib.redirect_stdout(captured))
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
