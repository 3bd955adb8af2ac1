"""Bad input to `--task embedding --data` and `--guard` on the command line: one `error:` line,
exit 2, no traceback, no run folder left behind.

Each case runs the real CLI in a subprocess; they start together on a small pool (each spends
its time importing torch and loading MiniLM) and every test waits for its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from slimformer import assets

CLI = [sys.executable, "-m", "slimformer.cli"]
SENTENCES = list(dict.fromkeys(t.strip() for t, _ in assets.rated_sentences("tweets")))[:300]


def cases(root: Path) -> dict[str, list[str]]:
    few = root / "few.txt"
    few.write_text("\n".join(SENTENCES[:50]) + "\n")
    repeated = root / "repeated.txt"
    repeated.write_text("the same sentence, again\n" * 500)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")

    def optimize(name: str, *options: str) -> list[str]:
        return [
            "optimize",
            "default",
            "--trials",
            "2",
            "--out",
            str(root / "runs" / name),
            *options,
        ]

    return {
        "too_few": optimize("too-few", "--task", "embedding", "--data", str(few)),
        "duplicates_only": ["bench", "default", "--task", "embedding", "--data", str(repeated)],
        "unknown_figure": optimize("unknown-figure", "--guard", "fidelity>=0.95"),
        "no_transfer_on_a_corpus": optimize(
            "corpus-transfer",
            *("--task", "embedding", "--data", str(corpus)),
            *("--guard", "transfer_probe_accuracy>=0.7"),
        ),
        "guard_syntax": optimize("guard-syntax", "--guard", "recall@10 at least 0.9"),
        "labels_in_a_text_file": optimize(
            "labels", "--task", "embedding", "--data", str(corpus), "--label-column", "mood"
        ),
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("embedding-cli")
    env = dict(os.environ)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {
            name: pool.submit(
                subprocess.run,
                [*CLI, *args],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            for name, args in cases(root).items()
        }
        yield root, futures


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    return lines[0]


@pytest.mark.parametrize(
    ("case", "keywords"),
    [
        ("too_few", ("few.txt has 50 sentences", "needs at least 200 distinct")),
        ("duplicates_only", ("has 500 sentences but only 1 distinct",)),
        ("unknown_figure", ("reports no figure 'fidelity'", "cosine_fidelity")),
        ("no_transfer_on_a_corpus", ("reports no figure 'transfer_probe_accuracy'",)),
        ("guard_syntax", ("--guard must look like", "drop(FIGURE)<=AMOUNT")),
        ("labels_in_a_text_file", ("CSV or JSONL",)),
    ],
)
def test_bad_embedding_input_exits_2_with_one_line_and_no_run_folder(cli, case, keywords):
    root, futures = cli
    message = error_line(futures[case].result())
    for keyword in keywords:
        assert keyword in message, message
    assert not any((root / "runs").glob("*/run.json"))
