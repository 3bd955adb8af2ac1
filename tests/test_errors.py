"""Bad input on the command line: one line on stderr, exit code 2, no traceback, nothing lost.

Every case runs the CLI's console entry point (`cli.main`, the one that turns an error into
one line and exit code 2) with the user's SLIMFORMER_CACHE. A few cases, one per kind of
input, run it as the real program (`python -m slimformer.cli`) in a subprocess, started at
once on a small thread pool; the rest run in this process (tests/inprocess.py), which saves
the few seconds of importing torch that each subprocess pays. All errors here trigger before
any optimization trial runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from inprocess import run_cli

from slimformer import assets
from slimformer.search.cores import release_cores

CLI = [sys.executable, "-m", "slimformer.cli"]
WORKERS = 2
# Run as the real program: a model folder, a rich-markup path, damaged weights, a recipe, a
# run folder and data, so the subprocess's own stderr and exit code are checked for each kind.
AS_PROGRAM = (
    "missing_model",
    "brackets_in_path",
    "truncated_weights",
    "recipe_invalid_yaml",
    "existing_run_without_resume",
    "classification_too_few_rows",
)
TIMEOUT_S = 300
MISSING_MODEL = "/nonexistent/slimformer-model"

RECIPE_FORMAT = "format: slimformer-recipe/1\n"
RECIPES = {
    "invalid_yaml": "format: [unclosed\n  steps: {\n",
    "no_format": "steps: []\n",
    "unknown_pass": RECIPE_FORMAT + "steps:\n  - pass: prune.nonexistent\n",
    "unknown_setting": RECIPE_FORMAT
    + "steps:\n  - pass: quantize.dynamic_int8\n    config: {bits: 4}\n",
    "choice_outside_options": RECIPE_FORMAT
    + "steps:\n  - pass: quantize.dynamic_int8\n    config: {scope: everything}\n",
    "count_out_of_range": RECIPE_FORMAT
    + "steps:\n  - pass: prune.layers\n    config: {count: 100}\n",
    "count_not_a_number": RECIPE_FORMAT
    + "steps:\n  - pass: prune.layers\n    config: {count: abc}\n",
    "skip_not_a_list": RECIPE_FORMAT
    + "steps:\n  - pass: quantize.dynamic_int8\n    config: {skip: 5}\n",
    "steps_not_positive": RECIPE_FORMAT
    + "steps:\n  - pass: recover.distill\n    config: {steps: -3}\n",
    "smooth_without_static_int8": RECIPE_FORMAT
    + "steps:\n  - pass: quantize.smooth\n    config: {alpha: 0.5}\n",
}
ROWS = [(f"a film worth seeing, number {i}", f"LABEL_{i % 2}") for i in range(40)]
RUN_JSON = '{"model": "default", "note": "written by test_errors"}\n'


# --- the workspace: every file the commands read ---------------------------------------------
def _write_csv(path: Path, header: list[str], rows: list[tuple[str, str]]) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _minilm_copy(root: Path, name: str, weights: bytes) -> Path:
    """MiniLM's config and tokenizer files beside a damaged model.safetensors."""
    source = assets.minilm_path()
    folder = root / name
    folder.mkdir()
    for item in source.iterdir():
        if item.name == "config.json" or item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, folder / item.name)
    shutil.copy2(source / "vocab.txt", folder / "vocab.txt")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def _tiny_classifier(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier (labels LABEL_0/LABEL_1), MiniLM's tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(
        folder, safe_serialization=True
    )
    transformers.AutoTokenizer.from_pretrained(assets.minilm_path()).save_pretrained(folder)
    return folder


def _commands(root: Path) -> dict[str, list[str]]:
    """Build every file the cases read; return each case's CLI arguments by name."""
    minilm = assets.minilm_path()
    real_weights = (minilm / "model.safetensors").read_bytes()
    models = root / "models"
    models.mkdir()
    (models / "no-config").mkdir()
    (models / "bad-config").mkdir()
    (models / "bad-config" / "config.json").write_text("{ this is not json")
    (models / "no-weights").mkdir()
    shutil.copy2(minilm / "config.json", models / "no-weights" / "config.json")
    (models / "a-file").write_text("not a folder")
    truncated = _minilm_copy(models, "truncated", real_weights[: len(real_weights) // 50])
    garbage = _minilm_copy(models, "garbage", bytes(range(256)) * 40)
    pickle_only = models / "pickle-only"
    pickle_only.mkdir()
    shutil.copy2(minilm / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04junk, not a real pickle" * 10)
    for model_type in ("gpt2", "notamodel"):
        (models / model_type).mkdir()
        config = {"model_type": model_type}
        if model_type == "gpt2":
            config["architectures"] = ["GPT2LMHeadModel"]
        (models / model_type / "config.json").write_text(json.dumps(config))
    tiny = str(_tiny_classifier(models / "tiny-classifier"))

    data = root / "data"
    data.mkdir()
    empty_csv = _write_csv(data / "empty.csv", ["text", "label"], [])
    review_csv = _write_csv(data / "review.csv", ["review", "label"], ROWS)
    sentiment_csv = _write_csv(data / "sentiment.csv", ["text", "sentiment"], ROWS)
    words_csv = _write_csv(
        data / "words.csv", ["text", "label"], [(t, "positive") for t, _ in ROWS]
    )
    few_csv = _write_csv(data / "few.csv", ["text", "label"], ROWS[:5])

    recipes = root / "recipes"
    recipes.mkdir()
    for name, text in RECIPES.items():
        (recipes / f"{name}.yaml").write_text(text)

    runs = root / "runs"
    runs.mkdir()
    existing = runs / "existing"
    existing.mkdir()
    (existing / "run.json").write_text(RUN_JSON)
    (existing / "keep-me.txt").write_text("finished trials live here\n")
    (runs / "empty").mkdir()
    for name, text in (("corrupt", "not json at all"), ("incomplete", '{"model": "default"}')):
        (runs / name).mkdir()
        (runs / name / "run.json").write_text(text)
    occupied_out = root / "out" / "occupied"
    occupied_out.mkdir(parents=True)
    (occupied_out / "keep-me.txt").write_text("an earlier result\n")

    def apply(recipe: str) -> list[str]:
        return [
            "apply",
            str(recipes / f"{recipe}.yaml"),
            "default",
            "--out",
            str(root / out(recipe)),
        ]

    def optimize_out(name: str, *options: str) -> list[str]:
        return ["optimize", "default", "--out", str(runs / name), *options]

    def classify(*options: str) -> list[str]:
        return ["bench", tiny, "--task", "classification", *options]

    def custom(*options: str) -> list[str]:
        return ["bench", "default", "--task", "custom", *options]

    return {
        # The slow ones first (a benchmark child process; a study set-up) so quick ones fill in.
        "bench_seq_len_2": ["bench", "default", "--seq-len", "2"],
        "optimize_classification_empty_csv": [
            "optimize",
            tiny,
            "--task",
            "classification",
            "--data",
            empty_csv,
            "--trials",
            "2",
            "--out",
            str(runs / "classification"),
        ],
        "classification_unknown_label": classify("--data", words_csv),
        "classification_empty_csv": classify("--data", empty_csv),
        "classification_wrong_text_column": classify("--data", review_csv),
        "classification_wrong_label_column": classify("--data", sentiment_csv),
        "classification_too_few_rows": classify("--data", few_csv),
        "classification_missing_data_file": classify("--data", str(data / "nope.csv")),
        "classification_label_column_option": classify(
            "--data", sentiment_csv, "--label-column", "mood"
        ),
        "data_without_task": ["bench", "default", "--data", empty_csv],
        "classification_without_data": classify(),
        "classification_text_column_option": classify(
            "--data", review_csv, "--text-column", "nope"
        ),
        "missing_model": ["bench", MISSING_MODEL],
        "model_is_a_file": ["bench", str(models / "a-file")],
        "no_config": ["bench", str(models / "no-config")],
        "config_not_json": ["bench", str(models / "bad-config")],
        "no_weights": ["bench", str(models / "no-weights")],
        "truncated_weights": ["bench", str(truncated)],
        "garbage_weights": ["bench", str(garbage)],
        "pickle_only": ["bench", str(pickle_only)],
        "gpt2": ["bench", str(models / "gpt2")],
        "notamodel": ["bench", str(models / "notamodel")],
        "unknown_task": ["bench", "default", "--task", "nonsense"],
        "custom_without_function": custom(),
        "custom_bad_module": custom(
            "--function", "no_such_module_for_slimformer:score", "--direction", "maximize"
        ),
        "custom_without_direction": custom("--function", "json:loads"),
        "custom_bad_direction": custom("--function", "json:loads", "--direction", "sideways"),
        "custom_missing_function": custom(
            "--function", "json:no_such_function", "--direction", "maximize"
        ),
        **{f"recipe_{name}": apply(name) for name in RECIPES},
        "recipe_missing": apply("missing"),
        "recipe_bad_onto_existing_out": [
            "apply",
            str(recipes / "unknown_pass.yaml"),
            "default",
            "--out",
            str(occupied_out),
        ],
        "existing_run_without_resume": optimize_out("existing"),
        "resume_without_run": optimize_out("empty", "--resume"),
        "resume_corrupt_run_json": optimize_out("corrupt", "--resume"),
        "resume_incomplete_run_json": optimize_out("incomplete", "--resume"),
        "show_not_a_run": ["show", "/nonexistent/slimformer-run"],
        "show_corrupt_run_json": ["show", str(runs / "corrupt")],
        "max_drop_abc": optimize_out("max-drop", "--max-drop", "abc"),
        "max_drop_negative": optimize_out("max-drop-negative", "--max-drop", "-1%"),
        "time_budget_xyz": optimize_out("time-budget", "--time-budget", "xyz"),
        "objective_speed": optimize_out("objective", "--objective", "speed"),
        "trials_0": optimize_out("trials", "--trials", "0"),
        "trials_abc": optimize_out("trials-abc", "--trials", "abc"),
        "unknown_pass_option": optimize_out("passes", "--passes", "prune.nonexistent"),
        "pass_without_the_pass_it_needs": optimize_out("requires", "--passes", "quantize.smooth"),
        "bench_batch_size_0": ["bench", "default", "--batch-size", "0"],
        "bench_threads_negative": ["bench", "default", "--threads", "-1"],
        "install_for_xyz": ["assets", "install", "vit-fashion", "--for", "xyz"],
        "brackets_in_path": ["bench", str(root / "model [v2]")],
        "closing_tag_in_path": ["bench", str(root / "[/v2]")],
    }


def out(name: str) -> Path:
    """Where `apply` case NAME was told to save (relative to the workspace root)."""
    return Path("out") / name


class Runner:
    """Starts the AS_PROGRAM cases at once in subprocesses; `runner(name)` returns that case's
    finished result, running an in-process case the first time it is asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.commands = _commands(root)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)
        self.futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {
            name: self.pool.submit(self._run_program, self.commands[name]) for name in AS_PROGRAM
        }
        self.done: dict[str, subprocess.CompletedProcess[str]] = {}

    def _run_program(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            cwd=self.root,  # `optimize` without --out would write runs/ here, not in the repo
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    def _run_here(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        # A command may claim cores or set torch's threads before it fails: give them back so
        # the next case (and test) runs as before.
        threads = torch.get_num_threads()
        try:
            with contextlib.chdir(self.root):
                result = run_cli(args)
        finally:
            release_cores()
            torch.set_num_threads(threads)
        return subprocess.CompletedProcess(args, result.code, result.stdout, result.stderr)

    def __call__(self, name: str) -> subprocess.CompletedProcess[str]:
        if name in self.futures:
            return self.futures[name].result()
        if name not in self.done:
            self.done[name] = self._run_here(self.commands[name])
        return self.done[name]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="session")
def cli(workspace: Path) -> Iterator[Runner]:
    runner = Runner(workspace)
    yield runner
    runner.close()


def assert_user_error(result: subprocess.CompletedProcess[str], *keywords: str) -> str:
    """Exit 2, no traceback, nothing on stdout, one `error:` line holding every keyword."""
    stderr = result.stderr
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in stderr, shown
    assert result.stdout.strip() == "", shown
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n{shown}"
    assert lines[0].startswith("error: "), shown
    for keyword in keywords:
        assert keyword in lines[0], f"{keyword!r} not in the message\n{shown}"
    return lines[0]


# --- the model folder ----------------------------------------------------------------------
def test_missing_model_folder_exits_2_with_one_line(cli: Runner) -> None:
    message = assert_user_error(cli("missing_model"), "model not found", MISSING_MODEL)
    assert "default" in message  # it names the aliases the user could give instead


def test_model_path_that_is_a_file_asks_for_the_folder(cli: Runner) -> None:
    assert_user_error(cli("model_is_a_file"), "is a file", "checkpoint folder")


def test_folder_without_config_json_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("no_config"), "has no config.json", "save_pretrained")


def test_config_json_that_is_not_json_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("config_not_json"), "config.json is not valid JSON")


def test_folder_without_weights_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("no_weights"), "has no model.safetensors")


def test_truncated_weights_are_reported_as_corrupt_or_truncated(cli: Runner) -> None:
    assert_user_error(cli("truncated_weights"), "model.safetensors", "corrupt or truncated")


def test_garbage_weights_are_reported_as_corrupt_or_truncated(cli: Runner) -> None:
    assert_user_error(cli("garbage_weights"), "model.safetensors", "corrupt or truncated")


def test_pickle_only_weights_ask_for_safetensors(cli: Runner) -> None:
    assert_user_error(cli("pickle_only"), "safetensors only", "safe_serialization=True")


def test_gpt2_checkpoint_is_an_unsupported_architecture(cli: Runner) -> None:
    # transformers knows gpt2; slimformer has no adapter for it and lists the families it has.
    assert_user_error(cli("gpt2"), "unsupported architecture 'gpt2'", "supports", "bert")


def test_made_up_model_type_is_an_unsupported_architecture(cli: Runner) -> None:
    assert_user_error(cli("notamodel"), "unsupported architecture 'notamodel'")


def test_brackets_in_a_model_path_are_shown_literally(cli: Runner) -> None:
    # The message is printed through rich: '[v2]' must not be taken for a style tag.
    assert_user_error(cli("brackets_in_path"), "model not found", "model [v2]")


def test_closing_tag_like_model_path_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("closing_tag_in_path"), "model not found", "[/v2]")


# --- the task ------------------------------------------------------------------------------
def test_unknown_task_lists_the_tasks(cli: Runner) -> None:
    assert_user_error(cli("unknown_task"), "unknown task 'nonsense'", "embedding", "custom")


def test_data_without_task_asks_for_task(cli: Runner) -> None:
    assert_user_error(cli("data_without_task"), "--data needs --task")


def test_custom_task_without_function_asks_for_function(cli: Runner) -> None:
    assert_user_error(cli("custom_without_function"), "custom task needs --function")


def test_custom_task_with_unimportable_module_names_the_module(cli: Runner) -> None:
    assert_user_error(cli("custom_bad_module"), "cannot import", "no_such_module_for_slimformer")


def test_custom_task_with_missing_function_names_it(cli: Runner) -> None:
    assert_user_error(cli("custom_missing_function"), "'json' has no function 'no_such_function'")


def test_custom_task_without_direction_asks_for_direction(cli: Runner) -> None:
    assert_user_error(cli("custom_without_direction"), "--direction maximize or --direction")


def test_custom_task_with_unknown_direction_asks_for_maximize_or_minimize(cli: Runner) -> None:
    assert_user_error(cli("custom_bad_direction"), "--direction maximize or --direction minimize")


# --- classification data -------------------------------------------------------------------
def test_classification_without_data_asks_for_data(cli: Runner) -> None:
    assert_user_error(cli("classification_without_data"), "classification task needs --data")


def test_classification_data_file_missing_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("classification_missing_data_file"), "data file not found", "nope.csv")


def test_classification_header_only_csv_has_no_rows(cli: Runner) -> None:
    assert_user_error(cli("classification_empty_csv"), "empty.csv has no rows")


def test_classification_wrong_text_column_lists_the_columns(cli: Runner) -> None:
    assert_user_error(
        cli("classification_wrong_text_column"),
        "column 'text' not found",
        "columns are: review, label",
        "--text-column",
    )


def test_classification_wrong_label_column_lists_the_columns(cli: Runner) -> None:
    assert_user_error(
        cli("classification_wrong_label_column"),
        "column 'label' not found",
        "columns are: text, sentiment",
        "--label-column",
    )


def test_classification_label_column_option_is_used_for_the_lookup(cli: Runner) -> None:
    assert_user_error(
        cli("classification_label_column_option"),
        "column 'mood' not found",
        "columns are: text, sentiment",
    )


def test_classification_text_column_option_is_used_for_the_lookup(cli: Runner) -> None:
    assert_user_error(
        cli("classification_text_column_option"),
        "column 'nope' not found",
        "columns are: review, label",
    )


def test_classification_label_unknown_to_the_model_lists_its_labels(cli: Runner) -> None:
    assert_user_error(
        cli("classification_unknown_label"),
        "label 'positive' is not one of the model's labels",
        "LABEL_0, LABEL_1",
    )


def test_classification_too_few_rows_says_how_many_are_needed(cli: Runner) -> None:
    assert_user_error(cli("classification_too_few_rows"), "has 5 rows", "at least 20")


def test_optimize_with_bad_classification_data_leaves_no_run_folder(
    cli: Runner, workspace: Path
) -> None:
    result = cli("optimize_classification_empty_csv")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "empty.csv has no rows" in result.stderr.strip().splitlines()[-1]
    assert not (workspace / "runs" / "classification" / "run.json").exists()


# --- recipes for `slimformer apply` --------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "keywords"),
    [
        pytest.param("invalid_yaml", ("not valid YAML", "at line"), id="invalid_yaml"),
        pytest.param(
            "no_format", ("not a slimformer recipe", "format: slimformer-recipe/1"), id="no_format"
        ),
        pytest.param(
            "unknown_pass", ("unknown pass 'prune.nonexistent'", "prune.layers"), id="unknown_pass"
        ),
        pytest.param(
            "unknown_setting",
            ("unknown setting(s) bits", "settings are: scope"),
            id="unknown_setting",
        ),
        pytest.param(
            "choice_outside_options",
            ("scope='everything' is not one of", "all_but_ffn_out"),
            id="choice_outside_options",
        ),
        pytest.param(
            "count_out_of_range",
            ("count must be an integer in [1, 5] for this model",),
            id="count_out_of_range",
        ),
        pytest.param(
            "count_not_a_number", ("count must be an integer", "'abc'"), id="count_not_a_number"
        ),
        pytest.param(
            "steps_not_positive",
            ("steps must be an integer in [0, inf)", "-3"),
            id="steps_not_positive",
        ),
        pytest.param(
            "smooth_without_static_int8",
            ("quantize.smooth needs quantize.static_int8",),
            id="smooth_without_static_int8",
        ),
        pytest.param("missing", ("recipe not found", "missing.yaml"), id="missing"),
    ],
)
def test_malformed_recipe_exits_2_and_creates_no_out_folder(
    cli: Runner, workspace: Path, case: str, keywords: tuple[str, ...]
) -> None:
    assert_user_error(cli(f"recipe_{case}"), *keywords)
    assert not (workspace / out(case)).exists()


def test_recipe_with_non_list_skip_exits_2_with_one_line(cli: Runner, workspace: Path) -> None:
    assert_user_error(cli("recipe_skip_not_a_list"), "skip")
    assert not (workspace / out("skip_not_a_list")).exists()


def test_malformed_recipe_leaves_an_existing_out_folder_untouched(
    cli: Runner, workspace: Path
) -> None:
    assert_user_error(cli("recipe_bad_onto_existing_out"), "unknown pass 'prune.nonexistent'")
    occupied = workspace / out("occupied")
    assert sorted(p.name for p in occupied.iterdir()) == ["keep-me.txt"]
    assert (occupied / "keep-me.txt").read_text() == "an earlier result\n"


# --- run folders ---------------------------------------------------------------------------
def test_optimize_on_an_existing_run_without_resume_keeps_the_run(
    cli: Runner, workspace: Path
) -> None:
    assert_user_error(
        cli("existing_run_without_resume"), "already holds a run", "--resume", "--overwrite"
    )
    run = workspace / "runs" / "existing"
    assert sorted(p.name for p in run.iterdir()) == ["keep-me.txt", "run.json"]
    assert (run / "run.json").read_text() == RUN_JSON
    assert (run / "keep-me.txt").read_text() == "finished trials live here\n"


def test_resume_on_a_folder_without_a_run_exits_2_and_writes_nothing(
    cli: Runner, workspace: Path
) -> None:
    assert_user_error(cli("resume_without_run"), "nothing to resume", "holds no run")
    assert list((workspace / "runs" / "empty").iterdir()) == []


@pytest.mark.parametrize("case", ["resume_corrupt_run_json", "resume_incomplete_run_json"])
def test_resume_on_a_damaged_run_json_exits_2_with_one_line(cli: Runner, case: str) -> None:
    assert_user_error(cli(case), "run.json")


def test_show_on_a_folder_that_is_not_a_run_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("show_not_a_run"), "not a slimformer run folder", "run.json")


def test_show_on_a_damaged_run_json_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("show_corrupt_run_json"), "run.json")


# --- option values -------------------------------------------------------------------------
def test_a_training_time_that_is_no_duration_exits_2_before_training(cli: Runner) -> None:
    assert_user_error(cli("install_for_xyz"), "--for must look like 10m", "'xyz'")


@pytest.mark.parametrize(
    ("case", "run_folder", "keywords"),
    [
        pytest.param(
            "max_drop_abc",
            "max-drop",
            ("--max-drop must look like 1% or 0.01", "'abc'"),
            id="max_drop_abc",
        ),
        pytest.param(
            "max_drop_negative",
            "max-drop-negative",
            ("--max-drop", "'-1%'"),
            id="max_drop_negative",
        ),
        pytest.param(
            "time_budget_xyz",
            "time-budget",
            ("--time-budget must look like 10m", "'xyz'"),
            id="time_budget_xyz",
        ),
        pytest.param(
            "objective_speed",
            "objective",
            ("unknown objective 'speed'", "latency"),
            id="objective_speed",
        ),
        pytest.param("trials_0", "trials", ("--trials must be at least 1",), id="trials_0"),
        pytest.param(
            "unknown_pass_option",
            "passes",
            ("unknown pass 'prune.nonexistent'",),
            id="unknown_pass_option",
        ),
        pytest.param(
            "pass_without_the_pass_it_needs",
            "requires",
            ("quantize.smooth needs quantize.static_int8",),
            id="pass_without_the_pass_it_needs",
        ),
    ],
)
def test_bad_optimize_option_exits_2_before_creating_the_run_folder(
    cli: Runner, workspace: Path, case: str, run_folder: str, keywords: tuple[str, ...]
) -> None:
    assert_user_error(cli(case), *keywords)
    assert not (workspace / "runs" / run_folder).exists()


def test_non_integer_trials_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("trials_abc"), "--trials")


def test_bench_batch_size_0_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("bench_batch_size_0"), "--batch-size must be at least 1")


def test_bench_seq_len_2_exits_2_with_one_line(cli: Runner) -> None:
    assert_user_error(cli("bench_seq_len_2"), "--seq-len must be at least 8")


def test_bench_negative_threads_exits_2_naming_the_option(cli: Runner) -> None:
    assert_user_error(cli("bench_threads_negative"), "--threads")
