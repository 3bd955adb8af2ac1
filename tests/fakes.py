"""Fake models for the study loop: a whole study of several trials in seconds.

`FakeBuilder` writes a folder with the recipe and applies nothing; `FakeEvaluator` computes
quality and latency from the recipe (`fake_scores`: pruning and int8 trade one for the other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.adapters import ModelFacts
from slimformer.build import Built
from slimformer.child import CandidateFailed, Stopped
from slimformer.cpu import fingerprint
from slimformer.evaluate import EvaluationResult
from slimformer.recipe import Recipe
from slimformer.tasks.staging import Paired, Staged, dominated
from slimformer.trained_prefix import prefix_key, split_at_training

PASSES = ("prune.layers", "quantize.dynamic_int8")
SCOPE_EFFECT = {  # scope -> (quality lost, latency factor)
    "all": (0.012, 0.40),
    "all_but_ffn_out": (0.006, 0.55),
    "attention": (0.002, 0.85),
    "ffn": (0.009, 0.60),
}


def fake_scores(recipe: Recipe) -> tuple[float, float]:
    """Quality and batch-1 latency a recipe would get: pruning and int8 trade one for the other."""
    quality, latency = 0.90, 10.0
    for step in recipe.steps:
        config = step.config
        if step.pass_name == "prune.layers":
            quality -= 0.004 * config["count"] + 0.001 * (config["criterion"] != "block_influence")
            latency *= 1 - 0.2 * config["count"]
        elif step.pass_name == "quantize.dynamic_int8":
            lost, factor = SCOPE_EFFECT[config["scope"]]
            quality -= lost - 0.001 * config["per_channel"] + 0.0005 * config["keep_sensitive"]
            latency *= factor + 0.01 * config["keep_sensitive"]
    return round(quality, 6), round(latency, 6)


def measurement(latency: float) -> dict[str, Any]:
    return {
        "latency_ms_median": latency,
        "latency_ms_p90": latency * 1.2,
        "throughput_per_s": 1000 / latency,
        "peak_memory_mb": 100.0,
        "size_mb": 50.0,
        "parameters": 1000,
        "gflops_per_input": 0.5,
        "threads": 1,
        "batch_size": 8,
        "mean_tokens": 20.0,
        "runtime": "eager",
        "batching": "bucketed",
    }


@dataclass
class FakeBuilder:
    root: Path
    num_layers: int = 4
    fail: str | None = None  # a recipe description whose build fails
    built: list[str] = field(default_factory=list)
    stages: tuple[str, ...] = ("distilling: step 1/2, loss 0.5",)
    # The seconds each pass reports it took (default 0.01), as the build child's answer has it.
    pass_seconds: dict[str, float] = field(default_factory=dict)
    # The deadlines each build was given: (passes_deadline, kill_at).
    deadlines: list[tuple[float | None, float | None]] = field(default_factory=list)
    # The held-out losses a distilling recipe reports (step -> loss), by a piece of its
    # description; a recipe whose description holds none of them reports `losses_default`.
    losses: dict[str, dict[int, float]] = field(default_factory=dict)
    losses_default: dict[int, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)  # builds a listener stopped
    # As ModelBuilder with a run folder: a recipe that trains keeps its trained prefix, and
    # later builds that start with it do not run those passes again (trained_prefix.py).
    reuse: bool = False
    kept: set[str] = field(default_factory=set)  # the trained prefixes kept, by key

    def __post_init__(self) -> None:
        self.facts = ModelFacts(
            num_layers=self.num_layers,
            num_heads=4,
            num_kv_heads=4,
            hidden_size=32,
            intermediate_size=64,
        )
        self.build(Recipe(), self.reference_dir)

    @property
    def reference_dir(self) -> Path:
        return self.root / "original"

    def prepare(self, pass_classes, state_path, say):
        say("loading the fake model")
        state_path.write_bytes(b"reference arrays")
        return list(pass_classes)

    def build(
        self,
        recipe: Recipe,
        folder: Path,
        workdir: Path | None = None,
        *,
        on_stage=None,
        passes_deadline: float | None = None,
        kill_at: float | None = None,
        on_value=None,
    ) -> Built:
        if recipe.describe() == self.fail:  # as a pass's own assert would, in this process
            raise AssertionError("the pass broke")
        description = recipe.describe()
        if on_value is not None and "recover.distill" in description:
            found = [v for k, v in self.losses.items() if k in description]
            for step, loss in (found[0] if found else self.losses_default).items():
                reason = on_value(step, loss)
                if reason:  # as run_child does: the child is killed
                    self.stopped.append(description)
                    raise Stopped(reason, step, loss)
        for stage in self.stages if on_stage else ():
            on_stage(stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        (folder / "slimformer.json").write_text(json.dumps({"weights": "hf", "head": "embedding"}))
        self.built.append(recipe.describe())
        self.deadlines.append((passes_deadline, kill_at))
        ran = self.passes_to_run(recipe)
        reused = tuple(s.pass_name for s in recipe.steps[: len(recipe.steps) - len(ran)])
        prefix = self._trained_prefix(recipe)
        if self.reuse and prefix:
            self.kept.add(prefix)
        seconds = {name: self.pass_seconds.get(name, 0.01) for name in ran}
        return Built(recipe, seconds, reused=reused, load_s=0.01, save_s=0.01)

    def passes_to_run(self, recipe: Recipe) -> list[str]:
        prefix, rest = split_at_training(recipe.steps)
        if self.reuse and prefix and self._trained_prefix(recipe) in self.kept:
            return [step.pass_name for step in rest]
        return [step.pass_name for step in recipe.steps]

    @staticmethod
    def _trained_prefix(recipe: Recipe) -> str:
        prefix, _ = split_at_training(recipe.steps)
        return prefix_key("fake", None, prefix, recipe.seed) if prefix else ""


@dataclass
class FakeEvaluator:
    cpu: dict[str, Any] = field(default_factory=lambda: fingerprint(1).to_dict())
    interrupt_at: int | None = None  # the call that is interrupted (Ctrl-C), counting from 1
    fail: str | None = None  # a recipe description whose evaluation fails
    calls: list[tuple[str, bool]] = field(default_factory=list)
    kill_ats: list[float | None] = field(default_factory=list)  # the deadline of each call
    # Whether it scores a subset first when asked (as the built-in tasks do); False: as a
    # custom score function, always in full.
    staged: bool = False
    screens: list[dict[str, float] | None] = field(default_factory=list)  # staged scoring asked
    timed: list[str] = field(default_factory=list)  # recipes timed
    # Recipe description -> factor on its fake latency: a candidate slower than it should be.
    slowdown: dict[str, float] = field(default_factory=dict)
    # Recipe description -> factor on the latency the study reads (scored evaluations) only:
    # a single in-study reading that was off, which timing it again does not repeat.
    in_study: dict[str, float] = field(default_factory=dict)
    fronts: list[dict[str, Any] | None] = field(default_factory=list)  # the probe's comparisons

    def __call__(
        self,
        model_dir: Path,
        workdir: Path,
        *,
        score: bool = True,
        on_stage=None,
        kill_at: float | None = None,
        screen: dict[str, float] | None = None,
        front: dict[str, Any] | None = None,
    ) -> EvaluationResult:
        recipe = Recipe.load(model_dir)
        self.calls.append((recipe.describe(), score))
        self.kill_ats.append(kill_at)
        self.screens.append(screen)
        self.fronts.append(front)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if recipe.describe() == self.fail:
            raise CandidateFailed("the candidate crashed")
        quality, latency = fake_scores(recipe)
        latency *= self.slowdown.get(recipe.describe(), 1.0)
        if score:
            latency *= self.in_study.get(recipe.describe(), 1.0)
        screening = None
        if screen and score and self.staged:
            # As staged scoring would see it on a subset: the drop from the fake original
            # (0.90), its bound half a point below.
            drop = fake_scores(Recipe())[0] - quality
            allowed = screen["probe_accuracy"]
            figure = {"estimate": drop, "bound": drop - 0.005, "allowed": allowed}
            figure |= {"examples": 500, "population": 2000}
            over = drop - 0.005 > allowed
            reason = f"probe_accuracy drop {drop:.4g}, over the {allowed:.4g} allowed"
            screening = {
                "over": over,
                "confidence": 0.975,
                "figures": {"probe_accuracy": figure},
                "reason": reason if over else "",
            }
            if over:
                return EvaluationResult(measurement={}, cpu=self.cpu, screening=screening)
            if front:  # the short timing reads the fake cost exactly
                sample = Paired(drops=np.array([drop]), population=2000)
                probe = measurement(latency)[front["cost_field"]]
                beaten_by = dominated(
                    Staged({"probe_accuracy": sample}),
                    screening,
                    front["figure"],
                    probe,
                    front["points"],
                    front["higher_is_better"],
                )
                if beaten_by is not None:
                    screening |= {"dominated": beaten_by, "reason": beaten_by["reason"]}
                    return EvaluationResult(measurement={}, cpu=self.cpu, screening=screening)
        if on_stage:
            on_stage("timing")
        self.timed.append(recipe.describe())
        timed = EvaluationResult(
            measurement=measurement(latency), cpu=self.cpu, screening=screening
        )
        if not score:
            return timed
        return EvaluationResult(
            measurement=timed.measurement,
            cpu=self.cpu,
            quality=quality,
            metric="probe_accuracy",
            direction="maximize",
            bounded=True,
            details={"cosine_fidelity": 1.0},
        )
