"""Property-based tests (Hypothesis): no input yields a traceback or a half-written folder.

Recipe YAML (random text, random structures, random pass names, settings and values: NaN,
infinities, huge and negative numbers, wrong types), `slimformer.json` of a saved model, run
folders (run.json, trials.jsonl, best/metrics.json damaged) and command-line options. Every
input is either accepted or refused with a SlimformerError, which the CLI prints as one
`error:` line with exit code 2; a refused command leaves no --out folder, and `show` writes
nothing into the run it reads.

The library is driven in this process, and the CLI through its console entry point
(`inprocess.run_cli`); where an accepted command would start real work (a study, a benchmark)
that work is replaced by a stand-in that only records that the input got through.

Bounded for `make test` (a fixed set of examples, seconds per property); `make bench-fuzz`
runs many more random ones (SLIMFORMER_FUZZ=long). No example database is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tiny
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import assert_one_error_line, run_cli

from slimformer.checkpoint import (
    load_model,
    natural_head,
    save_model,
    source_of,
    weights_size_bytes,
)
from slimformer.cpu import fingerprint
from slimformer.engines import registered_served
from slimformer.errors import SlimformerError
from slimformer.figures import OBJECTIVES
from slimformer.layers import registered_codecs
from slimformer.model import HEADS
from slimformer.passes import get_pass, registered_passes
from slimformer.passes.base import Interval, valid_values
from slimformer.pipeline import apply_recipe, load_recipe
from slimformer.recipe import FORMAT, Recipe, Step
from slimformer.search.records import STATES
from slimformer.search.run_folder import read_facts, read_settings
from slimformer.search.settings import StudySettings
from slimformer.taskspec import TASK_NAMES, TaskSpec

LONG = os.environ.get("SLIMFORMER_FUZZ") == "long"
settings.register_profile(
    "slimformer-suite",
    deadline=None,
    database=None,
    derandomize=True,  # the suite sees the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slimformer-long",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("slimformer-long" if LONG else "slimformer-suite")


def examples(suite: int) -> int:
    """Examples per property: `suite` in the test suite, 50 times as many in the long run."""
    return suite * 50 if LONG else suite


# --- values of every kind ----------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**64, 10**400, 5e-324, 1e-300, 1e308]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)

PASS_NAMES = [cls.name for cls in registered_passes()]
# Passes quick on a tiny model (no distillation, no export to another engine, no compiling).
FAST_PASSES = [
    name
    for name in PASS_NAMES
    if name != "recover.distill"
    and name not in ("runtime.onnxruntime", "runtime.openvino")
    and name != "runtime.compiled"
]


def edge_values(setting: dataclasses.Field) -> list[Any]:
    """Values at and around a setting's declared ranges: its options, bounds, the default."""
    values: list[Any] = [setting.default]
    space, valid = setting.metadata.get("space"), valid_values(setting)
    values += list(getattr(space, "options", ()))
    if isinstance(valid, Interval):
        for bound in (valid.low, valid.high):
            if isinstance(bound, (int, float)):
                values += [bound, bound + 1, bound - 1, bound * 0.999999, bound + 1e-9]
    return values


def setting_value(setting: dataclasses.Field | None) -> st.SearchStrategy[Any]:
    if setting is None:
        return JSON_VALUES
    return st.one_of(st.sampled_from(edge_values(setting)), SCALARS, JSON_VALUES)


@st.composite
def steps(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    name = draw(st.one_of(st.sampled_from(names), TEXT))
    known = {}
    if name in PASS_NAMES:
        known = {f.name: f for f in dataclasses.fields(get_pass(name).config_class)}
    keys = draw(st.lists(st.sampled_from([*known, "bogus"]), unique=True, max_size=4))
    step: dict[str, Any] = {"pass": name}
    if keys or draw(st.booleans()):
        step["config"] = {key: draw(setting_value(known.get(key))) for key in keys}
    if draw(st.integers(0, 7)) == 0:
        step["resolved"] = draw(JSON_VALUES)
    return step


TASKS = st.one_of(
    st.none(),
    st.sampled_from(TASK_NAMES),
    st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(TASK_NAMES), TEXT)},
        optional={"seq_len": SCALARS, "seed": SCALARS, "data": SCALARS, "bogus": SCALARS},
    ),
    JSON_VALUES,
)


@st.composite
def recipe_data(draw: st.DrawFn, names: list[str] = PASS_NAMES) -> Any:
    """A recipe as YAML would hold it: mostly well-formed around a damaged part."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    data: dict[str, Any] = {
        "format": draw(st.one_of(st.just(FORMAT), SCALARS)),
        "steps": draw(st.one_of(st.lists(steps(names), max_size=4), JSON_VALUES)),
    }
    if draw(st.booleans()):
        data["seed"] = draw(st.one_of(st.integers(0, 10), SCALARS))
    if draw(st.booleans()):
        data["task"] = draw(TASKS)
    return data


RECIPE_TEXT = st.one_of(
    recipe_data().map(yaml.safe_dump),
    TEXT,
    st.sampled_from(
        [
            "!!python/object:os.system {}",
            "format: &a [*a]",
            "{" * 3000,
            "- " * 3000,
            "format: slimformer-recipe/1\nsteps: !!binary AAAA",
            "format: slimformer-recipe/1\nsteps: {? [a] : b}",
            "\ufeffformat: slimformer-recipe/1",
        ]
    ),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(root: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


# --- recipes -------------------------------------------------------------------------------------
@settings(max_examples=examples(150))
@given(text=RECIPE_TEXT)
def test_any_recipe_file_is_read_or_refused_with_a_user_error(scratch: Path, text: str) -> None:
    path = fresh(scratch, "recipe-") / "recipe.yaml"
    path.write_text(text)
    try:
        recipe = load_recipe(path)
    except SlimformerError as error:
        assert str(error).strip()
    else:
        assert isinstance(recipe, Recipe)
        Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))  # what it reads, it can write


@pytest.fixture(scope="module")
def tiny_bert_and_batches() -> tuple[Any, Any]:
    model = tiny.tiny_bert()
    return model, tiny.calibration(model)


@settings(max_examples=examples(40))
@given(data=recipe_data(FAST_PASSES))
def test_an_accepted_recipe_applies_to_a_model_or_is_refused(
    scratch: Path, tiny_bert_and_batches: tuple[Any, Any], data: Any
) -> None:
    model, batches = tiny_bert_and_batches
    path = fresh(scratch, "apply-") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        recipe = load_recipe(path)
        result = apply_recipe(model, Recipe(steps=recipe.steps, seed=recipe.seed), batches)
    except SlimformerError:
        return
    result(**batches[0])  # the model it built runs


@settings(max_examples=examples(12))
@given(data=recipe_data(FAST_PASSES))
def test_slimformer_apply_saves_a_whole_model_or_prints_one_error_line_and_writes_nothing(
    scratch: Path, saved_tiny: Path, data: Any
) -> None:
    folder = fresh(scratch, "cli-apply-")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(data))
    out = folder / "out"
    result = run_cli(["apply", str(folder / "recipe.yaml"), str(saved_tiny), "--out", str(out)])
    if result.code == 0:
        load_model(out)
    else:
        assert_one_error_line(result)
        assert not out.exists() and sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]


# --- slimformer.json -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT in slimformer form: pruned FFN (resized shapes) and int8 attention (codec
    modules), so slimformer.json has every kind of entry."""
    model = tiny.tiny_bert()
    steps_ = (
        Step("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}),
        Step("quantize.dynamic_int8", {"scope": "attention"}),
    )
    pruned = apply_recipe(model, Recipe(steps=steps_))
    return save_model(pruned, tmp_path_factory.mktemp("saved") / "tiny")


def _replace_somewhere(
    draw: st.DrawFn, value: Any, leaves: st.SearchStrategy[Any], depth: int = 0
) -> Any:
    """`value` (JSON data) with one entry somewhere inside it replaced, dropped or added."""
    if isinstance(value, dict) and value and depth < 4 and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(value)))
        changed = dict(value)
        action = draw(st.sampled_from(["replace", "drop", "descend", "add"]))
        if action == "drop":
            del changed[key]
        elif action == "replace":
            changed[key] = draw(leaves)
        elif action == "add":
            changed[draw(st.one_of(TEXT, st.sampled_from(sorted(value))))] = draw(leaves)
        else:
            changed[key] = _replace_somewhere(draw, value[key], leaves, depth + 1)
        return changed
    if isinstance(value, list) and value and depth < 4 and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        changed = list(value)
        changed[index] = _replace_somewhere(draw, value[index], leaves, depth + 1)
        return changed
    return draw(leaves)


def damaged_json(draw: st.DrawFn, sound: Any, words: tuple[str, ...] = ()) -> str:
    """`sound` (JSON data) damaged somewhere, or replaced by other JSON or text; `words` are
    values the reader gives a meaning to, drawn beside random ones."""
    leaves = st.recursive(
        st.one_of(SCALARS, st.sampled_from(words or ("",))),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)
        ),
        max_leaves=8,
    )
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(TEXT)
    if kind == 1:
        return json.dumps(draw(JSON_VALUES))
    return json.dumps(_replace_somewhere(draw, sound, leaves))


# What slimformer.json's entries may name: heads, weight forms, runtimes, dtypes, codec kinds,
# batching modes, files, and the saved model's own module names.
META_WORDS = (
    *HEADS,
    "slimformer",
    "hf",
    "runtime",
    *registered_served(),
    "float32",
    "float16",
    "bfloat16",
    "int8",
    *(codec.kind for codec in registered_codecs()),
    "padded",
    "bucketed",
    "unpadded",
    "model.onnx",
    "model.xml",
    "slimformer.safetensors",
    "config.json",
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.intermediate.dense",
    "encoder",
    "",
)


@settings(max_examples=examples(40))
@given(data=st.data())
def test_a_damaged_slimformer_json_loads_or_is_refused(
    scratch: Path, saved_tiny: Path, data: st.DataObject
) -> None:
    sound = json.loads((saved_tiny / "slimformer.json").read_text())
    folder = fresh(scratch, "meta-") / "model"
    shutil.copytree(saved_tiny, folder)
    damaged = data.draw(st.composite(lambda draw: damaged_json(draw, sound, META_WORDS))())
    (folder / "slimformer.json").write_text(damaged)
    for read in (natural_head, source_of, weights_size_bytes, load_model):
        try:
            read(folder)
        except SlimformerError as error:
            assert str(error).strip()


# --- run folders --------------------------------------------------------------------------------
MEASUREMENT = {
    "latency_ms_median": 2.5,
    "latency_ms_p90": 3.0,
    "throughput_per_s": 400.0,
    "peak_memory_mb": 120.0,
    "size_mb": 1.5,
    "parameters": 12345,
    "gflops_per_input": 0.01,
    "threads": 1,
    "batch_size": 8,
    "mean_tokens": 12.0,
    "runtime": "eager",
    "batching": "bucketed",
}


def sound_run_files() -> dict[str, str]:
    settings_ = StudySettings(model="default", task=TaskSpec("embedding"), trials=3)
    cpu = fingerprint(1).to_dict()
    run = settings_.to_dict() | {"cpu": cpu, "withheld": {"cast.half": [["dtype", "bfloat16"]]}}
    baseline = {
        "number": 0,
        "state": "complete",
        "description": "baseline",
        "recipe": None,
        "quality": 0.8,
        "drop": 0.0,
        "feasible": True,
        "details": {"cosine_fidelity": 1.0},
        "measurement": MEASUREMENT,
        "cpu": cpu,
    }
    pruned = baseline | {
        "number": 1,
        "description": "prune.ffn(keep=0.5)",
        "recipe": Recipe(steps=(Step("prune.ffn", {"keep": 0.5}),)).to_dict(),
        "quality": 0.79,
        "drop": 0.01,
        "measurement": MEASUREMENT | {"latency_ms_median": 2.0},
    }
    failed = {"number": 2, "state": "failed", "description": "x", "error": "it broke"}
    metrics = {"trial": 1, "met_max_drop": True, "quality": 0.79}
    return {
        "run.json": json.dumps(run),
        "trials.jsonl": "\n".join(json.dumps(r) for r in (baseline, pruned, failed)) + "\n",
        "best/metrics.json": json.dumps(metrics),
    }


SOUND_RUN = sound_run_files()


# What run.json, trials.jsonl and metrics.json entries may name, and rich markup (the tables
# print what the files hold).
RUN_WORDS = (
    *STATES,
    *TASK_NAMES,
    *OBJECTIVES,
    "baseline",
    "maximize",
    "minimize",
    "eager",
    "[/red]",
    "[bold]x",
    "default",
    "/nonexistent",
)


@st.composite
def damaged_run(draw: st.DrawFn) -> dict[str, str]:
    files = dict(SOUND_RUN)
    name = draw(st.sampled_from(sorted(files)))
    if name == "trials.jsonl":
        lines = files[name].splitlines()
        index = draw(st.integers(0, len(lines)))
        if index == len(lines):
            lines.append(draw(TEXT))
        else:
            lines[index] = damaged_json(draw, json.loads(lines[index]), RUN_WORDS)
        files[name] = "\n".join(lines) + "\n"
    else:
        files[name] = damaged_json(draw, json.loads(files[name]), RUN_WORDS)
    return files


def write_run(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_the_sound_run_folder_shows_its_trials(scratch: Path) -> None:
    folder = fresh(scratch, "run-")
    write_run(folder, SOUND_RUN)
    result = run_cli(["show", str(folder)])
    assert result.code == 0, result.stderr
    assert "3 trials" in result.stdout and "best: trial 1 (meets the budget)" in result.stdout


@settings(max_examples=examples(60))
@given(files=damaged_run())
def test_show_on_a_damaged_run_folder_prints_it_or_one_error_line_and_writes_nothing(
    scratch: Path, files: dict[str, str]
) -> None:
    folder = fresh(scratch, "run-")
    write_run(folder, files)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = run_cli(["show", str(folder)])
    if result.code != 0:
        assert_one_error_line(result)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    for read in (read_settings, read_facts):  # what --resume reads
        try:
            read(folder / "run.json")
        except SlimformerError as error:
            assert str(error).strip()


# --- command-line options -----------------------------------------------------------------------
class Accepted(Exception):
    """Raised where an accepted command would start its real work (a study, a benchmark)."""


OPTION_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-1",
            "1",
            "3",
            "nan",
            "inf",
            "-inf",
            "1e999",
            "0x10",
            "10m",
            "-5s",
            "infm",
            "nanh",
            "1%",
            "nan%",
            "-1%",
            "100%",
            "2%%",
            "4294967296",
            "-0",
            "1.5",
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    TEXT,
)
PASSES_OPTION = st.lists(
    st.one_of(
        st.sampled_from(PASS_NAMES),
        st.tuples(st.sampled_from(PASS_NAMES), TEXT, OPTION_VALUES).map(
            lambda t: f"{t[0]}:{t[1]}={t[2]}"
        ),
        st.sampled_from(["prune.ffn:keep=0.5", "runtime.openvino:precision=bf16", "cast.half"]),
        TEXT,
    ),
    max_size=3,
).map(",".join)
STUDY_OPTIONS = {
    "--trials": OPTION_VALUES,
    "--time-budget": OPTION_VALUES,
    "--max-drop": OPTION_VALUES,
    "--seed": OPTION_VALUES,
    "--batch-size": OPTION_VALUES,
    "--threads": OPTION_VALUES,
    "--seq-len": OPTION_VALUES,
    "--confirm-rounds": OPTION_VALUES,
    "--objective": st.one_of(st.sampled_from(["latency", "throughput", "memory"]), TEXT),
    "--task": st.one_of(st.sampled_from(TASK_NAMES), TEXT),
    "--passes": PASSES_OPTION,
    "--direction": st.one_of(st.sampled_from(["maximize", "minimize"]), TEXT),
    "--function": st.one_of(st.just("json:loads"), TEXT),
}
FLAGS = ["--resume", "--overwrite", "--allow-other-cpu"]


@st.composite
def option_lists(draw: st.DrawFn, options: dict[str, st.SearchStrategy[str]]) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=5))
    args = list(itertools.chain.from_iterable((name, draw(options[name])) for name in chosen))
    return args + draw(st.lists(st.sampled_from(FLAGS), unique=True, max_size=1))


@settings(max_examples=examples(80))
@given(options=option_lists(STUDY_OPTIONS), start=st.booleans())
def test_optimize_options_are_accepted_or_refused_in_one_line_before_any_folder_is_made(
    scratch: Path, options: list[str], start: bool
) -> None:
    out = fresh(scratch, "optimize-") / "run"
    args = ["optimize", "default", "--out", str(out), *options]
    if start:
        args += ["--start", str(Path(__file__).parents[1] / "recipes" / "onnxruntime-int8.yaml")]
    with mock.patch("slimformer.api.run_study", side_effect=Accepted):
        try:
            result = run_cli(args)
        except Accepted:
            return
    assert_one_error_line(result)
    assert not out.exists()


BENCH_OPTIONS = {
    name: STUDY_OPTIONS[name]
    for name in ("--batch-size", "--seq-len", "--threads", "--task", "--direction", "--function")
} | {"--data": st.one_of(TEXT, st.just(__file__)), "--text-column": TEXT}


@settings(max_examples=examples(40))
@given(options=option_lists(BENCH_OPTIONS))
def test_bench_options_are_accepted_or_refused_in_one_line(options: list[str]) -> None:
    options = [o for o in options if o not in FLAGS]
    with (
        mock.patch("slimformer.api.reference_state", return_value=Path("state")),
        mock.patch("slimformer.api.evaluate_isolated", side_effect=Accepted),
    ):
        try:
            result = run_cli(["bench", "default", *options])
        except Accepted:
            return
    assert_one_error_line(result)


WORDS = st.one_of(
    st.sampled_from(
        [
            "optimize",
            "bench",
            "show",
            "apply",
            "passes",
            "assets",
            "status",
            "default",
            "--out",
            "--help",
            "--json",
            "--trials",
            "-t",
            "--",
            "-",
            "runs",
            "/proc",
            "/nonexistent",
        ]
    ),
    TEXT,
)


@settings(max_examples=examples(60))
@given(words=st.lists(WORDS, max_size=6))
def test_any_command_line_exits_0_or_2_with_one_error_line(scratch: Path, words: list[str]) -> None:
    if "install" in words:
        return  # `assets install` downloads; not a command to fuzz
    with (
        mock.patch("slimformer.api.run_study", side_effect=Accepted),
        mock.patch("slimformer.api.reference_state", return_value=Path("state")),
        mock.patch("slimformer.api.evaluate_isolated", side_effect=Accepted),
        mock.patch("slimformer.api.apply_recipe", side_effect=Accepted),
    ):
        cwd = os.getcwd()
        os.chdir(fresh(scratch, "argv-"))  # an `optimize` without --out writes under runs/ here
        try:
            result = run_cli(words)
        except Accepted:
            return
        finally:
            os.chdir(cwd)
    if result.code != 0:
        assert_one_error_line(result)
