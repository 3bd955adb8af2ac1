"""Issue 16's bad-input probes, one committed CLI test per row: each answers with one `error:`
line on stderr and exit code 2, no traceback, and writes nothing (no --out folder appears; a
file or folder that was there is left as it was).

The first seven rows are the issue's table (`--out` rows also in test_run_folder.py, there in
real processes); the rest are probes of other options and files. Commands run in this process
through the console entry point (`inprocess.run_cli`); every one fails before a model is
measured.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
from inprocess import assert_one_error_line, run_cli

from slimformer.checkpoint import save_model
from slimformer.cpu import fingerprint
from slimformer.pipeline import apply_recipe
from slimformer.recipe import FORMAT, Recipe, Step
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

HEADER = f"format: {FORMAT}\nsteps:\n"
RECIPES = {
    "keep_5": HEADER + "  - pass: prune.ffn\n    config: {keep: 5}\n",
    "keep_nan": HEADER + "  - pass: prune.ffn\n    config: {keep: .nan}\n",
    "stacked_quantizers": HEADER
    + "  - pass: quantize.smooth\n  - pass: quantize.static_int8\n"
    + "  - pass: quantize.dynamic_int8\n    config: {keep_sensitive: 2}\n",
    "nested_100000_deep": f"format: {FORMAT}\nsteps: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "keep_inf": HEADER + "  - pass: prune.ffn\n    config: {keep: .inf}\n",
    "per_channel_text": HEADER
    + "  - pass: quantize.dynamic_int8\n    config: {per_channel: yes please}\n",
    "seed_negative": f"format: {FORMAT}\nseed: -1\nsteps: []\n",
    "task_seq_len_text": f"format: {FORMAT}\ntask: {{name: embedding, seq_len: long}}\nsteps: []\n",
    "resolved_not_a_mapping": HEADER + "  - pass: prune.ffn\n    resolved: 7\n",
    "not_utf8": None,  # written as bytes below
    "perplexity_task": f"format: {FORMAT}\ntask: perplexity\nsteps: []\n",
    "empty": f"format: {FORMAT}\nsteps: []\n",
}


@dataclass(frozen=True)
class Workspace:
    root: Path
    tiny_model: Path  # a saved tiny BERT (slimformer form: int8 attention, pruned FFN)
    run: Path  # a run folder whose run.json is sound

    def recipe(self, name: str) -> str:
        return str(self.root / "recipes" / f"{name}.yaml")

    def out(self, name: str) -> str:
        return str(self.root / "out" / name)


def _tiny_model(folder: Path) -> Path:
    model = tiny.tiny_bert()
    steps = (
        Step("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}),
        Step("quantize.dynamic_int8", {"scope": "attention"}),
    )
    return save_model(apply_recipe(model, Recipe(steps=steps)), folder)


def _run_folder(folder: Path) -> Path:
    folder.mkdir()
    settings = StudySettings(model="default", task=TaskSpec("embedding"))
    facts = {"cpu": fingerprint(1).to_dict(), "withheld": {}}
    (folder / "run.json").write_text(json.dumps(settings.to_dict() | facts))
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("probes")
    recipes = root / "recipes"
    recipes.mkdir()
    for name, text in RECIPES.items():
        if text is not None:
            (recipes / f"{name}.yaml").write_text(text)
    (recipes / "not_utf8.yaml").write_bytes(b"format: \xff\xfe slimformer\n")
    (root / "out").mkdir()
    (root / "a-file").write_text("keep me\n")
    (root / "occupied").mkdir()
    (root / "occupied" / "notes.txt").write_text("an earlier result\n")
    (root / "rows.csv").write_text(
        "text,label\n" + "".join(f"film {i},LABEL_{i % 2}\n" for i in range(40))
    )
    return Workspace(root, _tiny_model(root / "tiny"), _run_folder(root / "run"))


@dataclass(frozen=True)
class Probe:
    args: Callable[[Workspace], list[str]]
    keywords: tuple[str, ...]
    # Paths (relative to the workspace) that must not exist afterwards; --out folders.
    absent: tuple[str, ...] = ()


def apply(recipe: str, out: str | None = None) -> Callable[[Workspace], list[str]]:
    return lambda ws: [
        "apply",
        ws.recipe(recipe),
        str(ws.tiny_model),
        "--out",
        ws.out(out or recipe),
    ]


def apply_to(out: Callable[[Workspace], Path]) -> Callable[[Workspace], list[str]]:
    """A sound recipe applied with an --out that is the problem."""
    return lambda ws: ["apply", ws.recipe("empty"), str(ws.tiny_model), "--out", str(out(ws))]


def optimize(*options: str, out: str = "run") -> Callable[[Workspace], list[str]]:
    return lambda ws: ["optimize", "default", "--out", ws.out(out), *options]


def optimize_at(out: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["optimize", str(ws.tiny_model), "--out", out(ws)]


PROBES = {
    # --- the table --------------------------------------------------------------------
    "recipe_keep_5": Probe(
        apply("keep_5"), ("prune.ffn: keep must be a number in (0, 1], got 5",), ("out/keep_5",)
    ),
    "recipe_keep_nan": Probe(
        apply("keep_nan"),
        ("prune.ffn: keep must be a number in (0, 1], got nan",),
        ("out/keep_nan",),
    ),
    "recipe_stacking_smooth_static_dynamic_int8": Probe(
        apply("stacked_quantizers"),
        ("one quantizer pass", "quantize.static_int8, quantize.dynamic_int8", "keep one"),
        ("out/stacked_quantizers",),
    ),
    "recipe_nested_100000_deep": Probe(
        apply("nested_100000_deep"), ("nested too deeply",), ("out/nested_100000_deep",)
    ),
    "optimize_out_naming_an_existing_file": Probe(
        optimize_at(lambda ws: str(ws.root / "a-file")), ("is a file",)
    ),
    "optimize_out_proc_nope": Probe(
        optimize_at(lambda ws: "/proc/nope/run"), ("cannot create the run folder",)
    ),
    "bench_perplexity_on_an_encoder": Probe(
        lambda ws: ["bench", "default", "--task", "perplexity"],
        ("embedding model (BertModel) without a causal-lm head", "--task"),
    ),
    # --- a task that does not fit the model ---------------------------------------------------
    "bench_classification_without_a_classification_head": Probe(
        lambda ws: [
            "bench",
            "default",
            "--task",
            "classification",
            "--data",
            str(ws.root / "rows.csv"),
        ],
        ("without a sequence-classification head",),
    ),
    "optimize_perplexity_on_an_encoder": Probe(
        optimize("--task", "perplexity", out="perplexity"), ("causal-lm head",), ("out/perplexity",)
    ),
    "apply_a_perplexity_recipe_to_an_encoder": Probe(
        apply("perplexity_task"), ("causal-lm head",), ("out/perplexity_task",)
    ),
    # --- --out of apply -------------------------------------------------------------------------
    "apply_out_naming_an_existing_file": Probe(
        apply_to(lambda ws: ws.root / "a-file"),
        ("a-file is a file",),
    ),
    "apply_out_folder_holding_other_files": Probe(
        apply_to(lambda ws: ws.root / "occupied"),
        ("holds other files",),
    ),
    "apply_out_under_a_file": Probe(
        apply_to(lambda ws: ws.root / "a-file" / "x"),
        ("is not a writable folder",),
    ),
    # --- recipes --------------------------------------------------------------------------------
    "recipe_keep_inf": Probe(apply("keep_inf"), ("keep must be a number in (0, 1], got inf",)),
    "recipe_bool_setting_given_text": Probe(
        apply("per_channel_text"), ("per_channel must be true or false", "'yes please'")
    ),
    "recipe_negative_seed": Probe(apply("seed_negative", "seed"), ("'seed' must be an integer",)),
    "recipe_task_seq_len_text": Probe(
        apply("task_seq_len_text"), ("task: seq_len must be an integer", "'long'")
    ),
    "recipe_resolved_not_a_mapping": Probe(
        apply("resolved_not_a_mapping"), ("step 1 'resolved' must be a mapping",)
    ),
    "recipe_not_utf8": Probe(apply("not_utf8"), ("is not UTF-8 text",)),
    "start_recipe_nested_100000_deep": Probe(
        optimize("--start", "RECIPE:nested_100000_deep", out="start-deep"),
        ("nested too deeply",),
        ("out/start-deep",),
    ),
    "start_recipe_stacking_quantizers": Probe(
        optimize("--start", "RECIPE:stacked_quantizers", out="start-stack"),
        ("one quantizer pass",),
        ("out/start-stack",),
    ),
    "start_recipe_keep_5": Probe(
        optimize("--start", "RECIPE:keep_5", out="start-keep"),
        ("keep must be",),
        ("out/start-keep",),
    ),
    # --- option values --------------------------------------------------------------------------
    "time_budget_nan": Probe(
        optimize("--time-budget", "nan", out="tb-nan"),
        ("--time-budget must be a positive, finite",),
        ("out/tb-nan",),
    ),
    "time_budget_inf": Probe(
        optimize("--time-budget", "infm", out="tb-inf"), ("--time-budget",), ("out/tb-inf",)
    ),
    "max_drop_nan": Probe(
        optimize("--max-drop", "nan%", out="md-nan"), ("--max-drop",), ("out/md-nan",)
    ),
    "trials_negative": Probe(
        optimize("--trials", "-3", out="tr"), ("--trials must be at least 1",), ("out/tr",)
    ),
    "confirm_rounds_negative": Probe(
        optimize("--confirm-rounds", "-1", out="cr"), ("--confirm-rounds",), ("out/cr",)
    ),
    "seed_negative": Probe(
        optimize("--seed", "-1", out="seed"), ("seed must be an integer from 0",), ("out/seed",)
    ),
    "seed_past_2_to_the_32": Probe(
        optimize("--seed", str(2**32), out="seed-big"),
        ("seed must be an integer from 0",),
        ("out/seed-big",),
    ),
    "passes_empty": Probe(
        optimize("--passes", "", out="p-empty"), ("--passes names no pass",), ("out/p-empty",)
    ),
    "passes_comma_only": Probe(
        optimize("--passes", ",", out="p-comma"), ("unknown pass ''",), ("out/p-comma",)
    ),
    "passes_setting_out_of_range": Probe(
        optimize("--passes", "prune.ffn:keep=5", out="p-keep"),
        ("keep must be a number in (0, 1], got 5",),
        ("out/p-keep",),
    ),
    "batch_size_negative": Probe(
        optimize("--batch-size", "-4", out="bs"), ("--batch-size must be at least 1",), ("out/bs",)
    ),
    "seq_len_zero": Probe(
        lambda ws: ["bench", "default", "--seq-len", "0"], ("--seq-len must be at least 8",)
    ),
    "threads_zero": Probe(
        lambda ws: ["bench", "default", "--threads", "0"], ("--threads must be at least 1",)
    ),
    "trials_not_a_number": Probe(
        optimize("--trials", "1e3", out="tr-text"), ("--trials", "(see --help)")
    ),
    # --- saved files --------------------------------------------------------------------------
    "slimformer_json_damaged": Probe(
        lambda ws: [
            "bench",
            _damaged_copy(ws, "slimformer.json", '{"format_version": 1, "shapes": [1]}'),
        ],
        ("malformed shapes entry", "damaged"),
    ),
    "slimformer_json_nested_too_deeply": Probe(
        lambda ws: ["bench", _damaged_copy(ws, "slimformer.json", "[" * 100_000 + "]" * 100_000)],
        ("nested too deeply", "damaged"),
    ),
    "show_trials_jsonl_damaged": Probe(
        lambda ws: ["show", _damaged_run(ws, "trials.jsonl", '{"number": "one"}\n')],
        ("trials.jsonl is damaged", "line 1"),
    ),
    "show_metrics_json_damaged": Probe(
        lambda ws: ["show", _damaged_run(ws, "best/metrics.json", '{"trial": 0}')],
        ("metrics.json is damaged",),
    ),
    "show_run_json_nested_too_deeply": Probe(
        lambda ws: ["show", _damaged_run(ws, "run.json", "[" * 50_000 + "]" * 50_000)],
        ("run.json is damaged", "nested too deeply"),
    ),
}


def _damaged_copy(ws: Workspace, name: str, text: str) -> str:
    """A copy of the tiny model with file `name` replaced by `text`."""
    folder = ws.root / f"model-damaged-{len(list(ws.root.glob('model-damaged-*')))}"
    shutil.copytree(ws.tiny_model, folder)
    (folder / name).write_text(text)
    return str(folder)


def _damaged_run(ws: Workspace, name: str, text: str) -> str:
    """A copy of the sound run folder with file `name` (written) as `text`."""
    folder = ws.root / f"run-damaged-{len(list(ws.root.glob('run-damaged-*')))}"
    shutil.copytree(ws.run, folder)
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return str(folder)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input_gives_one_error_line_exit_2_and_writes_nothing(ws: Workspace, name: str) -> None:
    probe = PROBES[name]
    args = [
        ws.recipe(arg.removeprefix("RECIPE:")) if arg.startswith("RECIPE:") else arg
        for arg in probe.args(ws)
    ]
    kept = {"a-file": (ws.root / "a-file").read_bytes()} | {
        f"occupied/{k}": v for k, v in _files(ws.root / "occupied").items()
    }
    assert_one_error_line(run_cli(args), *probe.keywords)
    for path in probe.absent:
        assert not (ws.root / path).exists(), path
    assert (ws.root / "a-file").read_bytes() == kept["a-file"]
    assert {f"occupied/{k}": v for k, v in _files(ws.root / "occupied").items()} == {
        k: v for k, v in kept.items() if k.startswith("occupied/")
    }
    assert not any((ws.root / "out").iterdir())
