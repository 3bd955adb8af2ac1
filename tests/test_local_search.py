"""Local search (search/neighbours.py): which recipes a study tries around the measured ones,
and that the study loop queues them between the sampler's proposals (fake models)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fakes import FakeBuilder, FakeEvaluator
from test_search_runner import RecordingReporter, int8, settings, start, study, trials_file

from slimformer.adapters import ModelFacts
from slimformer.passes import get_pass
from slimformer.recipe import Recipe, Step
from slimformer.search import runner
from slimformer.search.neighbours import neighbours
from slimformer.search.records import TrialRecord
from slimformer.search.run_folder import RunFolder

PASSES = ("prune.ffn", "prune.heads", "prune.layers", "recover.distill", "runtime.onnxruntime")
OFFERED = [get_pass(name) for name in PASSES]
FACTS = ModelFacts(
    num_layers=6, num_heads=12, num_kv_heads=12, hidden_size=384, intermediate_size=1536
)
THROUGHPUT = ("throughput_per_s", True)
BUDGET = ("probe_accuracy", 0.01)
RANKING = (THROUGHPUT, BUDGET)
ORT_INT8 = ("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"})
DISTILL_200 = ("recover.distill", {"steps": 200, "lr": 1e-4})


def record(number: int, steps, drop: float, throughput: float | None, **extra: Any):
    recipe = Recipe(steps=tuple(Step(name, dict(config)) for name, config in steps))
    state = extra.pop("state", "complete")
    return TrialRecord(
        number=number,
        state=state,
        description=recipe.describe(),
        recipe=recipe.to_dict(),
        quality=None if state == "pruned" else 0.8 - drop,
        drop=None if state == "pruned" else drop,
        feasible=None if state == "pruned" else drop <= BUDGET[1],
        measurement={} if throughput is None else {"throughput_per_s": throughput},
        **extra,
    )


BASELINE = record(0, (), 0.0, 100.0)


def described(records) -> list[str]:
    return [r.describe() for r in neighbours(records, OFFERED, FACTS, THROUGHPUT, BUDGET)]


def opened(tmp_path, chosen, builder) -> tuple[runner.Study, Any, RecordingReporter]:
    """A study of fake models in tmp_path/run, prepared and open, not run yet."""
    reporter = RecordingReporter()
    (tmp_path / "run").mkdir()
    study_runner = runner.Study(
        chosen, RunFolder(tmp_path / "run"), reporter, builder=builder, evaluator=FakeEvaluator()
    )
    study_runner.prepare()
    return study_runner, study_runner.open_study(), reporter


def test_the_best_recipe_within_budget_is_proposed_one_step_cheaper_per_setting():
    best = record(2, [("prune.ffn", {"keep": 0.7}), DISTILL_200, ORT_INT8], 0.004, 400.0)
    slower = record(1, [("prune.layers", {"count": 1}), ORT_INT8], 0.002, 300.0)
    proposals = described([BASELINE, slower, best])
    # FFN in steps of 0.05: a move is 0.1 of the neurons, enough to be measured apart.
    assert proposals[0].startswith("prune.ffn(keep=0.6) + recover.distill(steps=200")
    assert all("prune.layers" not in p for p in proposals)  # only the best one's neighbours
    layered = record(3, [("prune.layers", {"count": 3}), ORT_INT8], 0.001, 500.0)
    # Three of six blocks is the end of prune.layers' space (layers/2): nothing cheaper.
    assert described([BASELINE, best, layered]) == []


def test_a_faster_structure_over_budget_is_proposed_with_longer_distillation():
    best = record(1, [("prune.ffn", {"keep": 0.7}), DISTILL_200, ORT_INT8], 0.004, 400.0)
    close = record(2, [("prune.ffn", {"keep": 0.5}), DISTILL_200, ORT_INT8], 0.015, 480.0)
    undistilled = record(3, [("prune.heads", {"keep": 0.5}), ORT_INT8], 0.012, 450.0)
    hopeless = record(4, [("prune.ffn", {"keep": 0.3}), DISTILL_200], 0.08, 600.0)
    slower = record(5, [("prune.heads", {"keep": 0.875}), ORT_INT8], 0.011, 350.0)
    proposals = described([BASELINE, best, close, undistilled, hopeless, slower])
    assert proposals[0].startswith("prune.ffn(keep=0.6)")  # the best one's neighbour first
    recovered = proposals[1:]
    # Closest to the budget first; a structure without distillation gets it at its defaults.
    assert recovered[0] == "prune.heads(keep=0.5) + recover.distill + runtime.onnxruntime(" + (
        "optimize=True,int8=dynamic)"
    )
    assert recovered[1].startswith("prune.ffn(keep=0.5) + recover.distill(steps=400")
    assert len(recovered) == 2  # 8 points over is beyond recovery; a slower one is no gain


def test_a_candidate_stopped_on_a_subset_near_the_budget_is_proposed_with_recovery():
    best = record(1, [ORT_INT8], 0.005, 300.0)
    stopped = record(
        2,
        [("prune.heads", {"keep": 0.5}), ("recover.distill", {"steps": 100}), ORT_INT8],
        0.0,
        None,
        state="pruned",
        early_stop={"by": "subset", "figures": {"probe_accuracy": {"estimate": 0.014}}},
    )
    far = record(
        3,
        [("prune.heads", {"keep": 0.25}), ORT_INT8],
        0.0,
        None,
        state="pruned",
        early_stop={"by": "subset", "figures": {"probe_accuracy": {"estimate": 0.2}}},
    )
    assert described([BASELINE, best, stopped, far]) == [
        "prune.heads(keep=0.5) + recover.distill(steps=200) + runtime.onnxruntime("
        "optimize=True,int8=dynamic)"
    ]


def test_a_trained_recipe_is_proposed_first_served_each_other_way_measured_within_budget():
    offered = [*OFFERED, get_pass("runtime.openvino"), get_pass("quantize.dynamic_int8")]
    ffn = ("prune.ffn", {"keep": 0.7})
    trained = record(1, [ffn, DISTILL_200, ORT_INT8], 0.004, 400.0)
    openvino_int8 = record(2, [("runtime.openvino", {"int8": "nncf"})], 0.006, 350.0)
    openvino_f32 = record(3, [("runtime.openvino", {"int8": "none"})], 0.0, 250.0)
    lossy = record(4, [("quantize.dynamic_int8", {})], 0.018, 500.0)  # over budget: not a way
    untrained = record(5, [("prune.heads", {"keep": 0.5}), ORT_INT8], 0.009, 380.0)
    records = [BASELINE, trained, openvino_int8, openvino_f32, lossy, untrained]
    proposals = [r.describe() for r in neighbours(records, offered, FACTS, THROUGHPUT, BUDGET)]

    def served(*steps) -> str:
        return Recipe(steps=tuple(Step(name, dict(c)) for name, c in steps)).describe()

    # Best way first; the trained recipe's own way (ONNX Runtime int8) is not proposed again,
    # and the recipe without training has nothing kept to serve otherwise.
    assert proposals[:2] == [
        served(ffn, DISTILL_200, ("runtime.openvino", {"int8": "nncf"})),
        served(ffn, DISTILL_200, ("runtime.openvino", {"int8": "none"})),
    ]
    assert proposals[2].startswith("prune.ffn(keep=0.6)")  # then the cheaper neighbours
    assert not any("quantize.dynamic_int8" in p for p in proposals)


def test_the_best_recipe_is_proposed_with_openvinos_generated_kernels_switched_first():
    offered = [*OFFERED, get_pass("runtime.openvino")]
    ffn = ("prune.ffn", {"keep": 0.7})
    best = record(1, [ffn, DISTILL_200, ("runtime.openvino", {"int8": "nncf"})], 0.004, 400.0)
    ort = record(2, [ORT_INT8], 0.002, 300.0)  # another way to serve: a re-serving to propose
    records = [BASELINE, best, ort]
    proposals = [r.describe() for r in neighbours(records, offered, FACTS, *RANKING)]
    assert "snippets=False" in proposals[0] and proposals[0].startswith("prune.ffn(keep=0.7)")
    assert "runtime.onnxruntime" in proposals[1]  # then the best recipe served the other way
    assert proposals[2].startswith("prune.ffn(keep=0.6)")  # then the cheaper neighbours
    switched = record(2, [ffn, DISTILL_200, ("runtime.openvino", {"snippets": False})], 0.0, 450.0)
    again = [r.describe() for r in neighbours([BASELINE, switched], offered, FACTS, *RANKING)]
    assert "snippets=True" in again[0]  # the other way round from a recipe that had it off


def test_the_way_that_served_a_pruned_model_fastest_is_proposed_first_not_the_unpruned_fastest():
    offered = [*OFFERED, get_pass("reduce.tokens"), get_pass("runtime.openvino")]
    offered += [get_pass("quantize.dynamic_int8")]
    images = dataclasses.replace(FACTS, fixed_token_count=True)
    f32, int8 = ("runtime.openvino", {"int8": "none"}), ("quantize.dynamic_int8", {})
    ffn = ("prune.ffn", {"keep": 0.35})
    tokens = ("reduce.tokens", {"mode": "prune", "keep": 0.5})
    # On the unpruned model OpenVINO f32 was the slowest way (as on an AVX2-only CPU) ...
    alone = [record(1, [int8], 0.0, 560.0), record(2, [ORT_INT8], 0.0, 510.0)]
    alone.append(record(3, [f32], 0.0, 470.0))
    # ... but it served a distilled token-pruned model fastest (over the budget, within two).
    pruned = record(4, [tokens, DISTILL_200, f32], 0.015, 1150.0)
    trained = record(5, [ffn, DISTILL_200, ORT_INT8], 0.0, 700.0)
    records = [BASELINE, *alone, pruned, trained]
    proposals = [r.describe() for r in neighbours(records, offered, images, THROUGHPUT, BUDGET)]
    ffn_served = [p for p in proposals if p.startswith("prune.ffn(keep=0.35) + recover")]
    assert ffn_served[:2] == [
        "prune.ffn(keep=0.35) + recover.distill(steps=200,lr=0.0001) + runtime.openvino(int8=none)",
        "prune.ffn(keep=0.35) + recover.distill(steps=200,lr=0.0001) + quantize.dynamic_int8",
    ]


def test_a_study_tries_the_best_recipes_neighbour_between_sampled_trials(tmp_path):
    layers = start(("prune.layers", {"count": 1, "criterion": "block_influence"}))
    reporter = RecordingReporter()
    chosen = settings(tmp_path, trials=5, starts=(layers,), local_search=True)
    study(tmp_path, chosen, FakeBuilder(tmp_path), FakeEvaluator(), reporter=reporter)
    descriptions = [t["description"] for t in trials_file(tmp_path / "run")]
    assert descriptions[:3] == [
        "baseline",
        "prune.layers(count=1,criterion=block_influence)",
        "prune.layers(count=2,criterion=block_influence)",  # queued by the local search
    ]
    assert any("local search: next, prune.layers(count=2" in m for m in reporter.of("message"))
    # Off: nothing is queued by it.
    quiet = RecordingReporter()
    (tmp_path / "off").mkdir()
    off = settings(tmp_path / "off", trials=3, starts=(layers,))
    study(tmp_path / "off", off, FakeBuilder(tmp_path / "off"), FakeEvaluator(), reporter=quiet)
    assert not any("local search" in m for m in quiet.of("message"))


def test_a_trained_recipe_is_not_proposed_on_an_engine_that_cannot_export_its_prefix():
    offered = [*OFFERED, get_pass("reduce.tokens"), get_pass("quantize.dynamic_int8")]
    tokens = ("reduce.tokens", {"mode": "prune", "keep": 0.75})
    int8 = ("quantize.dynamic_int8", {})
    trained = record(1, [tokens, DISTILL_200, int8], 0.004, 400.0)
    exported = record(2, [ORT_INT8], 0.002, 350.0)
    text = dataclasses.replace(FACTS, fixed_token_count=False)  # an encoder of sentences
    records = [BASELINE, trained, exported]
    proposals = [r.describe() for r in neighbours(records, offered, text, THROUGHPUT, BUDGET)]
    # Token counts vary with the input, so no engine exports the reduced encoder: the sampler
    # would drop reduce.tokens from such a recipe and train another prefix.
    assert not any("runtime.onnxruntime" in p for p in proposals)
    images = dataclasses.replace(FACTS, fixed_token_count=True)  # a ViT: the graph exports
    proposals = [r.describe() for r in neighbours(records, offered, images, THROUGHPUT, BUDGET)]
    assert proposals[0].endswith("runtime.onnxruntime(optimize=True,int8=dynamic)")


def test_when_a_trial_would_not_fit_in_the_time_left_one_served_from_a_kept_model_goes_next(
    tmp_path,
):
    layer = ("prune.layers", {"count": 1, "criterion": "block_influence"})
    distill = ("recover.distill", {"steps": 200})
    attention_int8 = int8("attention")
    trained = start(layer, distill, *[(s["pass"], s["config"]) for s in int8("all")["steps"]])
    chosen = settings(
        tmp_path,
        trials=None,
        time_budget_s=600.0,
        passes=("prune.layers", "recover.distill", "quantize.dynamic_int8"),
        starts=(attention_int8, trained),
        local_search=True,
        max_drop=0.02,
    )
    # A distillation takes longer than the whole budget; only a kept one leaves time.
    builder = FakeBuilder(tmp_path, pass_seconds={"recover.distill": 5_000.0}, reuse=True)
    study_runner, optuna_study, reporter = opened(tmp_path, chosen, builder)
    study_runner.run_trials(optuna_study, 3)  # the baseline, then the two starts
    fits = study_runner._fitting(optuna_study)
    served_otherwise = Recipe.from_dict(
        start(layer, distill, *[(s["pass"], s["config"]) for s in attention_int8["steps"]])
    )
    assert fits(served_otherwise)
    assert not fits(Recipe.from_dict(start(("prune.layers", {"count": 2}), distill)))
    assert study_runner._queue_neighbour(optuna_study, fits)
    queued = reporter.of("message")[-1]
    assert queued.startswith("local search: next, prune.layers(count=1,criterion=block_influence)")
    assert queued.endswith(
        "+ quantize.dynamic_int8(scope=attention,per_channel=False,keep_sensitive=0)"
    )
    assert not study_runner._queue_neighbour(optuna_study, lambda recipe: False)


def test_a_recipe_too_long_for_the_time_left_is_shortened_to_the_most_distillation_that_fits():
    from slimformer.search.neighbours import shortened

    ffn = ("prune.ffn", {"keep": 0.5})
    long = Recipe.from_dict(start(ffn, ("recover.distill", {"steps": 400, "lr": 1e-4}), ORT_INT8))

    def steps_of(recipe: Recipe) -> int:
        return next(s.config["steps"] for s in recipe.steps if s.pass_name == "recover.distill")

    # 400 -> 200 -> 100: the first that fits.
    fitting = shortened(long, OFFERED, FACTS, lambda recipe: steps_of(recipe) <= 150)
    assert fitting is not None and steps_of(fitting) == 100
    assert fitting.describe().startswith(
        "prune.ffn(keep=0.5) + recover.distill(steps=100,lr=0.0001"
    )
    assert fitting.describe().endswith("runtime.onnxruntime(optimize=True,int8=dynamic)")
    assert shortened(long, OFFERED, FACTS, lambda recipe: False) is None  # not even 50 steps
    untrained = Recipe.from_dict(start(ffn, ORT_INT8))
    assert shortened(untrained, OFFERED, FACTS, lambda recipe: True) is None


def test_when_a_sampled_distillation_would_not_fit_the_same_recipe_trained_shorter_goes_next(
    tmp_path,
):
    first = start(("prune.ffn", {"keep": 0.7}), ("recover.distill", {"steps": 200}))
    deeper = start(("prune.ffn", {"keep": 0.5}), ("recover.distill", {"steps": 200}))
    chosen = settings(
        tmp_path,
        trials=None,
        time_budget_s=60.0,
        passes=("prune.ffn", "recover.distill"),
        starts=(first, deeper),
        local_search=True,
        max_drop=0.02,
    )
    # 200 steps take 80 s: once measured, the second 200-step distillation does not fit in the
    # minute; 100 steps (40 s, the time is estimated per step) do.
    builder = FakeBuilder(tmp_path, pass_seconds={"recover.distill": 80.0})
    study_runner, optuna_study, reporter = opened(tmp_path, chosen, builder)
    study_runner.run_trials(optuna_study, 3)
    built = builder.built[-1]
    assert built.startswith("prune.ffn(keep=0.5") and "recover.distill(steps=100," in built
    assert not any("keep=0.5" in b and "steps=200" in b for b in builder.built)
    [queued] = [m for m in reporter.of("message") if "trained shorter" in m]
    assert queued == f"local search: next, trained shorter to fit the time left, {built}"
