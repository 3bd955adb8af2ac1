"""The `slimformer` command line run in this process: its console entry point (`cli.main`, the
one that turns a SlimformerError into one `error:` line and exit code 2) with captured output.

Much faster than a subprocess per call (no torch import each time), so bad-input tests and
fuzzing can run many commands. An exception that escapes `main` (which a user would see as a
traceback) propagates to the test.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from slimformer import cli


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(args: Sequence[str]) -> CliResult:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["slimformer", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def assert_one_error_line(result: CliResult, *keywords: str) -> str:
    """Exit 2, nothing on stdout, one `error:` line on stderr holding every keyword."""
    shown = f"exit {result.code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.code == 2, shown
    assert "Traceback" not in result.stderr, shown
    assert result.stdout.strip() == "", shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for keyword in keywords:
        assert keyword in lines[0], f"{keyword!r} not in the message\n{shown}"
    return lines[0]
