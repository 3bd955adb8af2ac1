"""The study's pure logic: parsing budgets, quality drops, the Pareto front, the choice of the
best trial, and sampling recipes from the passes' search spaces."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from slimformer.adapters import ModelFacts
from slimformer.errors import SlimformerError
from slimformer.passes import get_pass, registered_passes
from slimformer.passes.settings import searched_now
from slimformer.pipeline import check_recipe
from slimformer.recipe import Recipe, Step
from slimformer.search.records import TrialRecord
from slimformer.search.selection import choose, pareto_front
from slimformer.search.settings import parse_duration, parse_max_drop
from slimformer.search.space import (
    START_VALUES,
    baseline_params,
    recipe_params,
    sample_recipe,
    start_values,
)
from slimformer.tasks import TaskSpec, quality_drop


# --- parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("1%", 0.01), ("0.5%", 0.005), ("0.02", 0.02), (" 2% ", 0.02), ("0", 0.0), (0.03, 0.03)],
)
def test_parse_max_drop(text: Any, value: float) -> None:
    assert parse_max_drop(text) == pytest.approx(value, rel=1e-12, abs=0)


@pytest.mark.parametrize("text", ["abc", "-1%", "-0.01", "%", "", "1%%"])
def test_parse_max_drop_rejects_garbage_and_negatives(text: str) -> None:
    with pytest.raises(SlimformerError, match="--max-drop"):
        parse_max_drop(text)


def test_parse_max_drop_rejects_nan() -> None:
    with pytest.raises(SlimformerError):
        parse_max_drop("nan")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("90s", 90), ("1.5h", 5400), ("2H", 7200), ("45", 45), (" 30s ", 30)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_of_none_is_no_limit() -> None:
    assert parse_duration(None) is None


@pytest.mark.parametrize("text", ["xyz", "10x", "m", "", "0s", "-5m"])
def test_parse_duration_rejects_garbage_and_non_positive(text: str) -> None:
    with pytest.raises(SlimformerError, match="--time-budget"):
        parse_duration(text)


# --- quality drop -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("baseline", "value", "direction", "bounded", "drop"),
    [
        (0.90, 0.88, "maximize", True, 0.02),  # accuracy: percentage points
        (0.90, 0.92, "maximize", True, -0.02),  # better than baseline: negative drop
        (0.10, 0.13, "minimize", True, 0.03),  # error rate: points
        (20.0, 22.0, "minimize", False, 0.10),  # perplexity: relative
        (20.0, 19.0, "minimize", False, -0.05),
        (50.0, 45.0, "maximize", False, 0.10),  # unbounded score: relative
        (-4.0, -5.0, "maximize", False, 0.25),  # relative to |baseline|
        (0.0, -0.5, "maximize", False, 0.5),  # zero baseline: absolute
    ],
)
def test_quality_drop(baseline: float, value: float, direction: str, bounded: bool, drop: float):
    assert quality_drop(baseline, value, direction, bounded) == pytest.approx(drop)


# --- Pareto front and choice --------------------------------------------------------------
def record(
    number: int,
    quality: float | None,
    cost: float | None,
    drop: float | None = None,
    feasible: bool | None = None,
    *,
    baseline: bool = False,
    state: str = "complete",
    duplicate_of: int | None = None,
    metric: str = "latency_ms_median",
) -> TrialRecord:
    return TrialRecord(
        number=number,
        state=state,
        description="baseline" if baseline else f"candidate {number}",
        quality=quality,
        drop=drop,
        feasible=feasible,
        measurement={} if cost is None else {metric: cost},
        duplicate_of=duplicate_of,
    )


def accuracy_latency_trials() -> list[TrialRecord]:
    """Accuracy (maximize, budget 0.01) against latency in ms (minimize)."""
    return [
        record(0, 0.900, 10.0, 0.0, True, baseline=True),
        record(1, 0.895, 6.0, 0.005, True),  # the cheapest within budget
        record(2, 0.850, 3.0, 0.05, False),  # cheapest overall, over budget
        record(3, 0.899, 8.0, 0.001, True),
        record(4, 0.895, 1.0, 0.005, True, duplicate_of=1),  # a re-run: ignored
        record(5, None, None, state="failed"),
        record(6, 0.880, 7.0, 0.02, False),  # dominated by trial 1
        record(7, 0.950, 0.5, state="running"),  # not finished: ignored
        record(8, 0.890, 6.0, 0.01, True),  # same cost as 1, lower quality: dominated
    ]


def test_pareto_front_leaves_out_dominated_duplicate_and_unfinished_trials() -> None:
    front = pareto_front(accuracy_latency_trials(), "maximize", "latency")
    assert front == [0, 1, 2, 3]


def test_pareto_front_keeps_equal_points_of_different_trials() -> None:
    records = [record(0, 0.9, 10.0, baseline=True), record(1, 0.8, 5.0), record(2, 0.8, 5.0)]
    assert pareto_front(records, "maximize", "latency") == [0, 1, 2]


def test_pareto_front_for_a_minimized_quality_and_a_maximized_cost() -> None:
    # Perplexity (lower is better) against throughput (higher is better).
    records = [
        record(0, 20.0, 100.0, baseline=True, metric="throughput_per_s"),
        record(1, 21.0, 150.0, metric="throughput_per_s"),
        record(2, 22.0, 140.0, metric="throughput_per_s"),  # worse on both than 1
        record(3, 19.5, 90.0, metric="throughput_per_s"),
        record(4, 25.0, 300.0, metric="throughput_per_s"),
    ]
    assert pareto_front(records, "minimize", "throughput") == [0, 1, 3, 4]
    # Read as latency (lower is better) the costs rank the other way round.
    as_latency = [
        record(r.number, r.quality, r.cost("throughput"), baseline=r.is_baseline) for r in records
    ]
    assert pareto_front(as_latency, "minimize", "latency") == [3]


def test_choose_picks_the_cheapest_feasible_trial() -> None:
    records = accuracy_latency_trials()
    chosen, met = choose(
        records, pareto_front(records, "maximize", "latency"), "maximize", "latency"
    )
    assert chosen is not None
    assert (chosen.number, met) == (1, True)


def test_choose_breaks_cost_ties_by_the_smaller_drop() -> None:
    records = [
        record(0, 0.90, 10.0, 0.0, True, baseline=True),
        record(1, 0.89, 5.0, 0.01, True),
        record(2, 0.895, 5.0, 0.005, True),
    ]
    chosen, met = choose(
        records, pareto_front(records, "maximize", "latency"), "maximize", "latency"
    )
    assert chosen is not None
    assert (chosen.number, met) == (2, True)


def test_choose_falls_back_to_the_best_quality_optimized_front_point() -> None:
    records = [
        record(0, 0.90, 10.0, 0.0, True, baseline=True),
        record(1, 0.85, 3.0, 0.05, False),
        record(2, 0.88, 6.0, 0.02, False),  # best quality among the optimized front points
        record(3, 0.87, 9.0, 0.03, False),  # dominated by 2
        record(4, 0.89, 12.0, 0.01 + 1e-6, False),  # better quality but dominated by baseline
    ]
    front = pareto_front(records, "maximize", "latency")
    assert front == [0, 1, 2]
    chosen, met = choose(records, front, "maximize", "latency")
    assert chosen is not None
    assert (chosen.number, met) == (2, False)


def test_choose_returns_the_baseline_when_no_optimized_trial_is_on_the_front() -> None:
    records = [
        record(0, 0.90, 10.0, 0.0, True, baseline=True),
        record(1, 0.85, 11.0, 0.05, False),
        record(2, None, None, state="failed"),
    ]
    front = pareto_front(records, "maximize", "latency")
    assert front == [0]
    chosen, met = choose(records, front, "maximize", "latency")
    assert chosen is not None
    assert (chosen.number, met) == (0, False)


def test_choose_without_a_finished_baseline_chooses_nothing() -> None:
    records = [
        record(0, None, None, baseline=True, state="interrupted"),
        record(1, 0.89, 5.0, 0.01, True),
    ]
    assert choose(records, pareto_front(records, "maximize", "latency"), "maximize", "latency") == (
        None,
        False,
    )


def test_choose_maximizes_throughput() -> None:
    def rec(number: int, quality: float, throughput: float, **kwargs: Any) -> TrialRecord:
        drop = round(0.90 - quality, 6)
        return record(
            number, quality, throughput, drop, drop <= 0.01, metric="throughput_per_s", **kwargs
        )

    records = [
        rec(0, 0.90, 100.0, baseline=True),
        rec(1, 0.895, 180.0),
        rec(2, 0.899, 120.0),
        rec(3, 0.80, 400.0),  # fastest, over budget
        rec(4, 0.895, 999.0, duplicate_of=1),
    ]
    front = pareto_front(records, "maximize", "throughput")
    assert front == [0, 1, 2, 3]
    chosen, met = choose(records, front, "maximize", "throughput")
    assert chosen is not None
    assert (chosen.number, met) == (1, True)


def test_choose_falls_back_by_quality_direction_for_a_minimized_metric() -> None:
    records = [
        record(0, 20.0, 10.0, 0.0, True, baseline=True),
        record(1, 21.0, 6.0, 0.05, False),  # lower perplexity: the best fallback
        record(2, 30.0, 2.0, 0.5, False),
    ]
    front = pareto_front(records, "minimize", "latency")
    assert front == [0, 1, 2]
    chosen, met = choose(records, front, "minimize", "latency")
    assert chosen is not None
    assert (chosen.number, met) == (1, False)


# --- sampling recipes ---------------------------------------------------------------------
def facts(num_layers: int) -> ModelFacts:
    return ModelFacts(
        num_layers=num_layers, num_heads=4, num_kv_heads=2, hidden_size=32, intermediate_size=64
    )


def make_study(seed: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.create_study(
            directions=["maximize", "minimize"], sampler=optuna.samplers.NSGAIISampler(seed=seed)
        )


@pytest.mark.parametrize("num_layers", [4, 9])
def test_sample_recipe_gives_valid_configs_within_the_model_bounds(num_layers: int) -> None:
    # An embedding study: the study offers runtime.llamacpp to decoders only (`applies_to`).
    passes = [p for p in registered_passes() if p.name != "runtime.llamacpp"]
    spec = TaskSpec(name="embedding")
    study = make_study()
    high = num_layers // 2
    counts, scopes, criteria, uses = set(), set(), set(), set()
    for index in range(160):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, facts(num_layers), spec, seed=3)
        assert isinstance(recipe, Recipe)
        assert recipe.task == spec and recipe.seed == 3
        names = [s.pass_name for s in recipe.steps]
        assert names == sorted(names, key=lambda n: get_pass(n).stage)
        assert len(set(names)) == len(names)
        for step in recipe.steps:
            cls = get_pass(step.pass_name)
            config = cls.make_config(step.config)  # accepted as it is
            # Fixed settings stay unset, and so do those that matter only with other values.
            space = cls.search_space()
            searched = {n for n in space if searched_now(cls.config_class, n, step.config)}
            assert set(step.config) == searched
            if step.pass_name == "prune.layers":
                assert 1 <= config.count <= high
                assert trial.distributions["prune.layers.count"] == IntDistribution(1, high)
                counts.add(config.count)
                criteria.add(config.criterion)
            if step.pass_name == "quantize.dynamic_int8":
                assert config.skip == ()
                scopes.add(config.scope)
        if "quantize.smooth" in names:
            assert "quantize.static_int8" in names  # offered only after static int8
        uses.add(tuple(names))
        if recipe.steps:
            assert recipe.describe() != "baseline"
        study.tell(trial, [len(recipe.steps) + 0.01 * index, float(index % 7)])
    # Over many asks the whole space is visited.
    assert counts == set(range(1, high + 1))
    assert criteria == {"block_influence", "removal_change"}
    assert scopes == {"all", "all_but_ffn_out", "attention", "ffn"}
    assert {name for combo in uses for name in combo} == {p.name for p in passes}


def test_merged_or_pruned_text_is_never_paired_with_an_exporting_runtime_pooled_text_is() -> None:
    # Found by the search-efficiency benchmark: a trial on MiniLM with reduce.tokens and
    # runtime.onnxruntime was built, then failed (a traced graph fixes merged or pruned token
    # counts; pooling's follow the length, so pooled text exports).
    names = ("reduce.tokens", "runtime.onnxruntime", "runtime.openvino")
    passes = [get_pass(name) for name in names]
    spec = TaskSpec(name="embedding")
    patches = replace(facts(4), fixed_token_count=True)  # a ViT: the export keeps them
    combos = {True: set(), False: set()}
    for fixed, model_facts in ((False, facts(4)), (True, patches)):
        study = make_study()
        for _ in range(80):
            trial = study.ask()
            recipe = sample_recipe(trial, passes, model_facts, spec, seed=0)
            steps = {step.pass_name: step.config for step in recipe.steps}
            mode = steps.get("reduce.tokens", {}).get("mode", "merge")
            combos[fixed].add((*steps, mode if "reduce.tokens" in steps else None))
            study.tell(trial, [0.0, 0.0])
    exported_text = {c for c in combos[False] if "reduce.tokens" in c and len(c) == 3}
    assert exported_text and all(c[-1] == "pool" for c in exported_text)
    assert ("reduce.tokens", "merge") in combos[False]
    assert ("reduce.tokens", "runtime.onnxruntime", "merge") in combos[True]
    assert ("reduce.tokens", "runtime.openvino", "prune") in combos[True]


def test_a_setting_that_conflicts_with_a_chosen_pass_is_never_sampled_with_it() -> None:
    # Found by the search-efficiency benchmark: reduce.tokens + runtime.batching mode=unpadded
    # was proposed and refused (padding-free batching would skip the token reduction).
    passes = [get_pass("reduce.tokens"), get_pass("runtime.batching")]
    study = make_study()
    recipes = []
    for _ in range(60):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, facts(4), TaskSpec(name="embedding"), seed=0)
        check_recipe(recipe)  # never refused
        recipes.append({step.pass_name: step.config for step in recipe.steps})
        study.tell(trial, [0.0, 0.0])
    both = [r for r in recipes if len(r) == 2]
    assert both and all(r["runtime.batching"].get("mode") != "unpadded" for r in both)
    alone = [r["runtime.batching"] for r in recipes if list(r) == ["runtime.batching"]]
    assert any(config.get("mode") == "unpadded" for config in alone)


def test_a_pruning_that_keeps_every_unit_of_this_model_changes_nothing() -> None:
    heads, ffn = get_pass("prune.heads"), get_pass("prune.ffn")
    small = facts(4)  # 2 KV groups of heads, 64 FFN neurons per block (multiples of 16)
    assert heads.changes_nothing(heads.make_config({"keep": 0.75}), small)  # round(1.5) = 2
    assert not heads.changes_nothing(heads.make_config({"keep": 0.625}), small)
    # Global allocation: 7 of the 8 groups, some block loses one.
    assert not heads.changes_nothing(
        heads.make_config({"keep": 0.875, "allocation": "global"}), small
    )
    assert ffn.changes_nothing(ffn.make_config({"keep": 0.9}), small)  # 58 rounds to 64
    assert not ffn.changes_nothing(ffn.make_config({"keep": 0.85}), small)  # 54 -> 48
    wide = replace(small, num_kv_heads=12, intermediate_size=1536)
    assert not heads.changes_nothing(heads.make_config({"keep": 0.875}), wide)
    assert not ffn.changes_nothing(ffn.make_config({"keep": 0.95}), wide)


def test_the_sampler_leaves_out_a_pruning_that_would_change_nothing() -> None:
    # Found on vit-fashion (2 heads per block): "keep 0.875 of the heads" kept both and was
    # measured again as a new recipe.
    passes = [get_pass("prune.heads"), get_pass("prune.ffn")]
    study = make_study()
    kept_heads, kept_ffn = set(), set()
    for _ in range(120):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, facts(4), TaskSpec(name="embedding"), seed=0)
        for step in recipe.steps:
            config = get_pass(step.pass_name).make_config(step.config)
            (kept_heads if step.pass_name == "prune.heads" else kept_ffn).add(
                (config.keep, config.allocation)
            )
        study.tell(trial, [0.0, 0.0])
    assert kept_heads and all(keep < 0.75 for keep, how in kept_heads if how == "uniform")
    assert kept_ffn and all(keep < 0.9 for keep, how in kept_ffn if how == "uniform")


def test_sample_recipe_with_the_baseline_params_is_the_empty_recipe() -> None:
    passes = registered_passes()
    study = make_study()
    params = baseline_params(passes)
    plain = {f"use {p.name}": False for p in passes if not p.requires and not p.group}
    # One choice among the runtime passes, one among the quantizers.
    assert params == plain | {"runtime": "none", "quantizer": "none"}
    study.enqueue_trial(params)
    trial = study.ask()
    recipe = sample_recipe(trial, passes, facts(4), TaskSpec(name="embedding"), seed=0)
    assert recipe.steps == ()
    assert recipe.describe() == "baseline"
    assert trial.params == params
    for name in plain:
        assert trial.distributions[name] == CategoricalDistribution([False, True])


def test_sample_recipe_only_uses_the_given_passes() -> None:
    study = make_study(seed=1)
    passes = [get_pass("quantize.dynamic_int8")]
    for _ in range(20):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, facts(4), TaskSpec(name="embedding"), seed=0)
        assert {s.pass_name for s in recipe.steps} <= {"quantize.dynamic_int8"}
        assert not any(name.startswith("prune.layers") for name in trial.params)
        study.tell(trial, [0.0, 1.0])


def test_a_start_recipe_is_proposed_exactly_by_the_sampler() -> None:
    passes = [
        get_pass(n) for n in ("prune.ffn", "prune.heads", "recover.distill", "runtime.onnxruntime")
    ]
    start = Recipe(
        steps=(
            Step("prune.ffn", {"keep": 0.5, "criterion": "fisher"}),
            Step("recover.distill", {"steps": 300}),
            Step("runtime.onnxruntime", {"int8": "dynamic"}),
        ),
        task=TaskSpec(name="embedding"),
    )
    # 300 steps is not among the searched options (50..400): the trial carries it as given.
    assert start_values(start, passes) == {"recover.distill": {"steps": 300}}
    # On a model of width 32 the learning rates searched are 8x MiniLM's: the default 5e-5 is
    # not among them either.
    model = facts(4)
    given = start_values(start, passes, model)
    assert given == {"recover.distill": {"steps": 300, "lr": 5e-5}}
    study = make_study()
    study.enqueue_trial(recipe_params(start, passes, model), user_attrs={START_VALUES: given})
    trial = study.ask()
    proposed = sample_recipe(trial, passes, model, TaskSpec(name="embedding"), seed=0)
    chosen = {step.pass_name: step.config for step in proposed.steps}
    assert set(chosen) == {"prune.ffn", "recover.distill", "runtime.onnxruntime"}
    assert chosen["prune.ffn"]["keep"] == 0.5 and chosen["prune.ffn"]["criterion"] == "fisher"
    assert chosen["runtime.onnxruntime"]["int8"] == "dynamic"
    assert chosen["recover.distill"]["steps"] == 300
    assert chosen["recover.distill"]["lr"] == 5e-5


def test_a_start_recipe_cut_off_runs_again_with_its_values_outside_the_searched_options(
    tmp_path,
) -> None:
    from slimformer.cpu import fingerprint
    from slimformer.search.optuna_study import open_study
    from slimformer.search.settings import StudySettings

    passes = [get_pass("recover.distill")]
    start = Recipe(steps=(Step("recover.distill", {"steps": 1000}),))
    settings = StudySettings(
        model="m",
        task=TaskSpec("embedding"),
        starts=(start.to_dict(),),
        passes=("recover.distill",),
    )
    storage, cpu, model = f"sqlite:///{tmp_path / 'study.db'}", fingerprint(1), facts(4)
    directions = ["maximize", "minimize"]
    study = open_study(storage, settings, directions, passes, cpu, facts=model)
    study.tell(study.ask(), [1.0, 1.0])  # the baseline
    cut_off = study.ask()  # the start recipe, then the process dies
    first = sample_recipe(cut_off, passes, model, TaskSpec("embedding"), 0)
    assert first.steps[0].config["steps"] == 1000
    resumed = open_study(storage, settings, directions, passes, cpu, facts=model)
    again = sample_recipe(resumed.ask(), passes, model, TaskSpec("embedding"), 0)
    assert again.steps[0].config["steps"] == 1000


def test_a_start_recipe_with_a_pass_not_searched_is_refused() -> None:
    start = Recipe(steps=(Step("quantize.static_int8", {}),))
    with pytest.raises(SlimformerError, match="does not search"):
        recipe_params(start, [get_pass("prune.ffn")])


def test_every_trial_record_field_has_a_declared_type_for_trials_jsonl() -> None:
    from dataclasses import fields

    from slimformer.search.records import _RECORD_TYPES, TrialRecord

    assert {f.name for f in fields(TrialRecord)} == set(_RECORD_TYPES)
    record = TrialRecord(number=3, state="failed", description="x", timings={"build_s": 1.5})
    assert TrialRecord.from_dict(record.__dict__) == record


def test_the_warm_start_portfolio_takes_each_offered_engines_int8_and_this_cpus_gaps():
    from slimformer.search.portfolio import warm_start_recipes

    offered = [get_pass(n) for n in ("prune.ffn", "runtime.openvino", "quantize.dynamic_int8")]
    spec = TaskSpec("embedding")
    described = [r.describe() for r in warm_start_recipes(offered, {}, spec, 0)]
    assert described == ["runtime.openvino(int8=nncf)", "quantize.dynamic_int8"]
    # Without VNNI NNCF's int8 is withheld: OpenVINO is still measured, at its defaults.
    no_vnni = {"runtime.openvino": {("int8", "nncf")}}
    described = [r.describe() for r in warm_start_recipes(offered, no_vnni, spec, 0)]
    assert described == ["runtime.openvino", "quantize.dynamic_int8"]
    assert warm_start_recipes([get_pass("prune.ffn")], {}, spec, 0) == []


def test_an_embedding_study_warm_starts_with_two_blocks_removed_only_where_bf16_trains_it():
    from slimformer.search.portfolio import warm_start_recipes

    names = ("prune.layers", "recover.distill", "runtime.openvino", "runtime.onnxruntime")
    offered = [get_pass(n) for n in names]
    spec = TaskSpec("embedding")
    last = warm_start_recipes(offered, {}, spec, 0)[-1]
    assert [step.pass_name for step in last.steps] == list(names[:3])
    assert last.steps[0].config == {"count": 2}
    distill = last.steps[1].config
    assert (distill["steps"], distill["lr_schedule"], distill["precision"]) == (
        1600,
        "cosine",
        "bfloat16",
    )
    assert last.steps[2].config == {"int8": "nncf", "snippets": False}
    no_vnni = {"runtime.openvino": {("int8", "nncf")}}
    last = warm_start_recipes(offered, no_vnni, spec, 0)[-1]
    assert last.steps[0].pass_name == "prune.layers"
    assert (last.steps[2].pass_name, last.steps[2].config) == (
        "runtime.onnxruntime",
        {"int8": "dynamic"},
    )
    # Without bf16 instructions its distillation would not fit a short study: left out.
    no_bf16 = get_pass("recover.distill").without_payoff(cpu_without_bf16())
    assert no_bf16 == {"precision=bfloat16": "native_bf16"}
    withheld = {"recover.distill": {("precision", "bfloat16")}}
    recipes = warm_start_recipes(offered, withheld, spec, 0)
    assert all(r.steps[0].pass_name != "prune.layers" for r in recipes)
    assert recipes  # the engines' int8 alone are still measured
    # Nor is it measured on a model that cannot lose 2 blocks.
    two_blocks = ModelFacts(
        num_layers=2, num_heads=4, num_kv_heads=4, hidden_size=32, intermediate_size=64
    )
    recipes = warm_start_recipes(offered, {}, spec, 0, two_blocks)
    assert all(r.steps[0].pass_name != "prune.layers" for r in recipes) and recipes
    assert warm_start_recipes(offered, {}, spec, 0, MINILM)[-1].steps[0].pass_name == (
        "prune.layers"
    )


def cpu_without_bf16():
    from slimformer.cpu import CpuFingerprint

    return CpuFingerprint("Test CPU", ("avx2", "fma"), ("avx2", "fma"), 2, 2)


def test_an_embedding_study_warm_starts_with_a_trimmed_ffn_only_when_it_searches_its_passes():
    from slimformer.search.portfolio import warm_start_recipes

    names = ("prune.ffn", "recover.distill", "runtime.openvino", "runtime.onnxruntime")
    offered = [get_pass(n) for n in names]
    described = [r.describe() for r in warm_start_recipes(offered, {}, TaskSpec("embedding"), 0)]
    assert described[:2] == ["runtime.openvino(int8=nncf)", "runtime.onnxruntime(int8=dynamic)"]
    assert described[2].startswith("prune.ffn(keep=0.7) + recover.distill(")
    assert described[2].endswith(" + runtime.openvino(int8=nncf)")
    # Without VNNI the structure is served by ONNX Runtime's int8 instead, where it is searched,
    # else by OpenVINO at its defaults.
    no_vnni = {"runtime.openvino": {("int8", "nncf")}}
    described = [
        r.describe() for r in warm_start_recipes(offered, no_vnni, TaskSpec("embedding"), 0)
    ]
    assert described[-1].endswith(" + runtime.onnxruntime(int8=dynamic)")
    assert described[-1].startswith("prune.ffn(keep=0.7) + recover.distill(")
    without_ort = [cls for cls in offered if cls.name != "runtime.onnxruntime"]
    described = [
        r.describe() for r in warm_start_recipes(without_ort, no_vnni, TaskSpec("embedding"), 0)
    ]
    assert described[-1].endswith(" + runtime.openvino")
    only_ort = [cls for cls in offered if cls.name != "runtime.openvino"]
    described = [r.describe() for r in warm_start_recipes(only_ort, {}, TaskSpec("embedding"), 0)]
    assert described[-1].endswith(" + runtime.onnxruntime(int8=dynamic)")
    # Other tasks (no structured recipe measured there) and studies without distillation.
    decoder = warm_start_recipes(offered, {}, TaskSpec("perplexity"), 0)
    assert [r.describe() for r in decoder] == ["runtime.openvino(weights=int8_asym)"]
    assert len(warm_start_recipes(offered[:1] + offered[2:], {}, TaskSpec("embedding"), 0)) == 2


def test_a_decoder_study_warm_starts_with_int8_weights_not_int8_activations():
    from slimformer.search.portfolio import warm_start_recipes

    offered = [get_pass(n) for n in ("runtime.openvino", "quantize.dynamic_int8")]
    described = [r.describe() for r in warm_start_recipes(offered, {}, TaskSpec("perplexity"), 0)]
    assert described == ["runtime.openvino(weights=int8_asym)"]
    offered.append(get_pass("runtime.llamacpp"))
    described = [r.describe() for r in warm_start_recipes(offered, {}, TaskSpec("perplexity"), 0)]
    assert described == [
        "runtime.llamacpp(quant=Q8_0)",
        "runtime.llamacpp(quant=Q4_K_M,imatrix=True)",
        "runtime.openvino(weights=int8_asym)",
    ]


def test_a_new_study_measures_the_baseline_then_the_portfolio_then_the_starts(tmp_path) -> None:
    from slimformer.cpu import fingerprint
    from slimformer.search.optuna_study import open_study
    from slimformer.search.settings import StudySettings

    passes = [get_pass(n) for n in ("prune.ffn", "runtime.onnxruntime", "quantize.dynamic_int8")]
    start = Recipe(steps=(Step("prune.ffn", {"keep": 0.5}),))
    repeated = Recipe(steps=(Step("runtime.onnxruntime", {"int8": "dynamic"}),))
    settings = StudySettings(
        model="m",
        task=TaskSpec("embedding"),
        starts=(start.to_dict(), repeated.to_dict()),
        warm_start=True,
    )
    study = open_study(
        f"sqlite:///{tmp_path / 'study.db'}",
        settings,
        ["maximize", "minimize"],
        passes,
        fingerprint(1),
    )
    proposed = []
    for _ in range(4):
        trial = study.ask()
        proposed.append(sample_recipe(trial, passes, facts(4), TaskSpec("embedding"), 0))
        study.tell(trial, [1.0, 1.0])
    assert [r.steps[0].pass_name if r.steps else "baseline" for r in proposed] == [
        "baseline",
        "runtime.onnxruntime",  # the portfolio: each engine's int8 alone
        "quantize.dynamic_int8",
        "prune.ffn",  # the starts; the one the portfolio already holds is not repeated
    ]
    assert proposed[1].steps[0].config["int8"] == "dynamic"


# --- distillation's search space follows the model ------------------------------------------
MINILM = ModelFacts(
    num_layers=6, num_heads=12, num_kv_heads=12, hidden_size=384, intermediate_size=1536
)
VIT_FASHION = ModelFacts(
    num_layers=4,
    num_heads=2,
    num_kv_heads=2,
    hidden_size=64,
    intermediate_size=256,
    fixed_token_count=True,
    tokens_per_example=197,
)


def test_distillation_offers_a_small_vit_more_steps_and_larger_learning_rates() -> None:
    space = get_pass("recover.distill").search_space()
    # The options were measured on MiniLM: it keeps them, and so does text of unknown length.
    assert space["steps"].resolve(MINILM) == (50, 100, 200, 400)
    assert space["lr"].resolve(MINILM) == (2e-5, 5e-5, 1e-4)
    # vit-fashion's step costs ~1/5 of MiniLM's and it is 6x narrower.
    assert space["steps"].resolve(VIT_FASHION) == (200, 400, 800, 1600)
    assert space["lr"].resolve(VIT_FASHION) == (1.2e-4, 3e-4, 6e-4)
    study = make_study()
    passes = [get_pass("recover.distill")]
    seen = set()
    for _ in range(12):
        recipe = sample_recipe(
            study.ask(), passes, VIT_FASHION, TaskSpec("image-classification"), 0
        )
        seen |= {(s.config["steps"], s.config["lr"]) for s in recipe.steps}
    assert seen and all(steps >= 200 and lr >= 1.2e-4 for steps, lr in seen)


def test_a_study_begun_with_other_distillation_options_is_refused_in_one_line() -> None:
    """A ViT study begun before the options scaled searched MiniLM's; resuming it now would
    hit Optuna's refusal of changed categorical options, deep in the sampler."""
    study = make_study()
    passes = [get_pass("recover.distill")]
    study.enqueue_trial({"use recover.distill": True})
    first = study.ask()
    sample_recipe(first, passes, MINILM, TaskSpec("image-classification"), 0)
    study.tell(first, (0.9, 1.0))
    study.enqueue_trial({"use recover.distill": True})
    with pytest.raises(SlimformerError, match=r"searched recover\.distill\.steps over \[50, 100"):
        sample_recipe(study.ask(), passes, VIT_FASHION, TaskSpec("image-classification"), 0)


def test_a_larger_model_keeps_the_measured_distillation_options() -> None:
    space = get_pass("recover.distill").search_space()
    bert_base = replace(MINILM, num_layers=12, hidden_size=768, intermediate_size=3072)
    vit_base = replace(bert_base, fixed_token_count=True, tokens_per_example=197)
    for model in (bert_base, vit_base):
        assert space["steps"].resolve(model) == (50, 100, 200, 400)
        assert space["lr"].resolve(model) == (2e-5, 5e-5, 1e-4)


def test_a_vit_reports_its_patch_tokens_and_the_class_token() -> None:
    from tiny import tiny_vit

    model = tiny_vit()
    config = model.module.config
    patches = (config.image_size // config.patch_size) ** 2
    assert model.adapter.facts().tokens_per_example == patches + 1


def test_an_image_study_warm_starts_with_a_trimmed_ffn_and_pooled_tokens_distilled() -> None:
    from slimformer.search.portfolio import warm_start_recipes

    names = ("prune.ffn", "reduce.tokens", "recover.distill", "runtime.openvino")
    offered = [get_pass(n) for n in names]
    spec = TaskSpec("image-classification")
    described = [r.describe() for r in warm_start_recipes(offered, {}, spec, 0, VIT_FASHION)]
    assert described[:2] == [
        "runtime.openvino(int8=nncf)",
        "prune.ffn(keep=0.25,criterion=activation,allocation=global) + "
        "reduce.tokens(mode=pool,window=2,start=1) + "
        "recover.distill(steps=800,lr=0.0003,similarity_weight=10.0,hidden_weight=0.0) + "
        "runtime.openvino(int8=nncf)",
    ]
    # The recipe's values are the options it stands for: the sampler proposes it exactly.
    (_, pooled, _) = warm_start_recipes(offered, {}, spec, 0, VIT_FASHION)
    assert start_values(pooled, offered, VIT_FASHION) == {}
    # A model the options were measured on gets them as written.
    (_, as_written, _) = warm_start_recipes(
        offered, {}, spec, 0, replace(MINILM, tokens_per_example=197, fixed_token_count=True)
    )
    assert "recover.distill(steps=200,lr=5e-05," in as_written.describe()
    # Without VNNI OpenVINO serves it in f32 (faster there than ONNX Runtime's int8 for a
    # token-reduced ViT), ONNX Runtime's int8 only where OpenVINO is not searched.
    no_vnni = {"runtime.openvino": {("int8", "nncf")}}
    with_ort = [*offered, get_pass("runtime.onnxruntime")]
    (_, _, pooled, _) = warm_start_recipes(with_ort, no_vnni, spec, 0, VIT_FASHION)
    assert pooled.describe().endswith("hidden_weight=0.0) + runtime.openvino")
    only_ort = [cls for cls in with_ort if cls.name != "runtime.openvino"]
    (_, pooled, _) = warm_start_recipes(only_ort, no_vnni, spec, 0, VIT_FASHION)
    assert pooled.describe().endswith(" + runtime.onnxruntime(int8=dynamic)")


def test_token_merging_offers_a_vit_with_more_patches_per_block_a_larger_r() -> None:
    space = get_pass("reduce.tokens").search_space()
    # ToMe's r was sized on ViT-B/16: 196 patches through 12 blocks. vit-fashion has 196 in 4.
    assert space["r"].resolve(VIT_FASHION) == (3, 6, 12, 24, 48)
    vit_base = replace(MINILM, num_layers=12, fixed_token_count=True, tokens_per_example=197)
    for model in (vit_base, MINILM):  # ViT-B/16 itself; text, whose token count varies
        assert space["r"].resolve(model) == (1, 2, 4, 8, 16)


def test_token_settings_of_the_other_mode_are_not_sampled() -> None:
    study = make_study()
    passes = [get_pass("reduce.tokens")]
    seen = []
    for _ in range(24):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, VIT_FASHION, TaskSpec("image-classification"), 0)
        study.tell(trial, (0.9, 1.0))
        seen += [step.config for step in recipe.steps]
    merged = [config for config in seen if config["mode"] == "merge"]
    pruned = [config for config in seen if config["mode"] == "prune"]
    pooled = [config for config in seen if config["mode"] == "pool"]
    assert merged and pruned and pooled
    assert all(c["r"] in (3, 6, 12, 24, 48) and "keep" not in c for c in merged)
    assert all("r" not in c and "schedule" not in c and "window" not in c for c in pruned)
    assert all(c["window"] in (2, 3) and "r" not in c and "keep" not in c for c in pooled)


def test_an_image_study_warm_starts_with_a_trimmed_ffn_and_tomes_merging_for_its_model(
    tmp_path,
) -> None:
    from slimformer.cpu import fingerprint
    from slimformer.search.optuna_study import open_study
    from slimformer.search.portfolio import warm_start_recipes
    from slimformer.search.settings import StudySettings

    names = ("prune.ffn", "reduce.tokens", "recover.distill", "runtime.openvino")
    offered = [get_pass(n) for n in names]
    spec = TaskSpec("image-classification")
    described = [r.describe() for r in warm_start_recipes(offered, {}, spec, 0, VIT_FASHION)]
    assert described[2] == (
        "prune.ffn(keep=0.35,criterion=activation,allocation=global) + "
        "reduce.tokens(mode=merge,r=39,schedule=constant,start=0) + "
        "recover.distill(steps=800,lr=0.0003,similarity_weight=10.0,hidden_weight=0.0) + "
        "runtime.openvino(int8=nncf)"
    )
    # r=39 is not among the searched options (13 x 3 is not a power of two): the trial carries
    # it, and the study proposes the recipe as written.
    settings = StudySettings(model="m", task=spec, passes=names, warm_start=True)
    study = open_study(
        f"sqlite:///{tmp_path / 'study.db'}",
        settings,
        ["maximize", "minimize"],
        offered,
        fingerprint(1),
        facts=VIT_FASHION,
    )
    proposed = []
    for _ in range(4):
        trial = study.ask()
        proposed.append(sample_recipe(trial, offered, VIT_FASHION, spec, 0))
        study.tell(trial, [1.0, 1.0])
    steps = {step.pass_name: step.config for step in proposed[3].steps}
    assert steps["prune.ffn"]["keep"] == 0.35
    assert (steps["reduce.tokens"]["mode"], steps["reduce.tokens"]["r"]) == ("merge", 39)
    assert (steps["recover.distill"]["steps"], steps["recover.distill"]["lr"]) == (800, 3e-4)
    assert steps["runtime.openvino"]["int8"] == "nncf"


def test_start_recipes_differing_only_outside_the_searched_options_all_run(tmp_path) -> None:
    from slimformer.cpu import fingerprint
    from slimformer.search.optuna_study import open_study
    from slimformer.search.settings import StudySettings

    passes = [get_pass("recover.distill")]
    starts = [Recipe(steps=(Step("recover.distill", {"lr": lr}),)) for lr in (2e-5, 5e-5, 5e-5)]
    settings = StudySettings(
        model="m",
        task=TaskSpec("embedding"),
        starts=tuple(s.to_dict() for s in starts),
        passes=("recover.distill",),
        warm_start=False,
    )
    # Width 32: the searched rates are 8x MiniLM's, so neither start's rate is among them.
    storage, model = f"sqlite:///{tmp_path / 'study.db'}", facts(4)
    study = open_study(
        storage, settings, ["maximize", "minimize"], passes, fingerprint(1), facts=model
    )
    study.tell(study.ask(), [1.0, 1.0])  # the baseline
    rates = []
    for _ in range(2):
        recipe = sample_recipe(study.ask(), passes, model, TaskSpec("embedding"), 0)
        rates.append(recipe.steps[0].config["lr"])
    assert rates == [2e-5, 5e-5]  # the repeated start once, neither lost
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0
