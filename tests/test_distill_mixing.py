"""recover.distill with a general corpus mixed in, similarity-matrix matching and neighbour-
distribution matching, on tiny models.

The mix draws the share of steps it is told to from the general corpus (and, at 0, exactly the
draws distillation made before it could mix, so older recipes replay bit for bit); the
similarity and neighbour losses measure neighbourhoods, not vector scale; the neighbour bank is
the teacher's embeddings of training inputs; a study withholds the mix where the task has no
general corpus.
"""

from __future__ import annotations

import random

import pytest
import tiny
import torch

from slimformer.cpu import fingerprint
from slimformer.errors import SlimformerError
from slimformer.passes.recover_distill import (
    ANCHORS,
    DistillConfig,
    draw_batch,
    neighbour_bank,
    neighbour_loss,
    similarity_loss,
)
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")


def test_without_a_general_share_the_draws_are_the_task_batches_of_before():
    task = [{"id": torch.tensor(i)} for i in range(7)]
    general = [{"id": torch.tensor(100 + i)} for i in range(5)]
    mixed, plain = random.Random(3), random.Random(3)
    for _ in range(50):
        assert draw_batch(task, general, 0.0, mixed) is task[plain.randrange(len(task))]


def test_a_general_share_draws_that_share_of_the_batches_from_the_general_corpus():
    task, general = [{"from": "task"}] * 3, [{"from": "general"}] * 3
    order = random.Random(0)
    draws = [draw_batch(task, general, 0.25, order)["from"] for _ in range(4000)]
    assert draws.count("general") / len(draws) == pytest.approx(0.25, abs=0.03)


def test_similarity_loss_sees_neighbourhoods_not_scale():
    torch.manual_seed(0)
    teacher = torch.randn(8, 16)
    assert similarity_loss(teacher * 5.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = teacher[torch.randperm(8)]
    assert similarity_loss(shuffled, teacher).item() > 0.01


def test_neighbour_loss_sees_the_ranking_of_neighbours_not_scale():
    torch.manual_seed(0)
    teacher, anchors = torch.randn(8, 16), torch.randn(64, 16)
    assert neighbour_loss(teacher * 5.0, teacher, anchors, 0.05).item() == pytest.approx(
        0.0, abs=1e-5
    )
    slightly_off = teacher + 0.05 * torch.randn(8, 16)
    shuffled = teacher[torch.randperm(8)]
    near = neighbour_loss(slightly_off, teacher, anchors, 0.05).item()
    assert 0 < near < neighbour_loss(shuffled, teacher, anchors, 0.05).item()


def test_neighbour_bank_holds_the_teachers_embeddings_of_training_inputs_each_once():
    teacher = tiny.tiny_bert()
    train = tiny.calibration(teacher, batches=3)
    bank = neighbour_bank(teacher, train, [], DistillConfig(neighbour_weight=1.0), seed=0)
    rows = sum(len(batch["input_ids"]) for batch in train)
    assert bank.shape == (min(rows, ANCHORS), 32)
    pooled = []
    for batch in train:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((tiny.output(teacher, batch) * mask).sum(1) / mask.sum(1))
    assert torch.allclose(
        torch.sort(bank, dim=0).values, torch.sort(torch.cat(pooled), dim=0).values, atol=1e-5
    )


def distill(model, seed: int = 1, **config):
    recipe = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 60, "lr": 1e-4, **config}),
        ),
        seed=seed,
    )
    training = tiny.calibration(model, batches=6)
    general = tiny.calibration(model, batches=3)[::-1]
    return apply_recipe(model, recipe, tiny.calibration(model), training=training, general=general)


@pytest.mark.parametrize(
    ("family", "settings", "unlike"),
    [
        ("bert", {"general_fraction": 0.5, "similarity_weight": 10.0}, {}),
        ("bert", {"general_fraction": 0.5, "neighbour_weight": 1.0}, {"general_fraction": 0.5}),
        ("llama", {"general_fraction": 0.5, "neighbour_weight": 1.0}, {"general_fraction": 0.5}),
    ],
    ids=["mix-and-similarity", "neighbours-encoder", "neighbours-decoder"],
)
def test_distillation_with_a_matching_loss_learns_and_repeats_itself(family, settings, unlike):
    """Lowers its held-out loss, gives the same student twice, and another one than the
    distillation without the setting (`unlike`)."""
    model = tiny.build(family)
    a, b = distill(model, **settings), distill(model, **settings)
    resolved = a.recipe.steps[-1].resolved
    assert resolved["held_out_loss_after"] < resolved["held_out_loss_before"]
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(a, batch), tiny.output(b, batch))
    other = distill(model, **unlike)
    assert not torch.equal(tiny.output(a, batch), tiny.output(other, batch))


def test_a_general_share_without_a_general_corpus_is_refused():
    model = tiny.tiny_bert()
    recipe = Recipe(steps=(Step("recover.distill", {"steps": 5, "general_fraction": 0.25}),))
    training = tiny.calibration(model, batches=4)
    with pytest.raises(SlimformerError, match="general_fraction needs a general corpus"):
        apply_recipe(model, recipe, training=training)


def test_a_study_offers_the_mix_only_where_the_task_has_a_general_corpus():
    cpu = fingerprint(1)

    def withheld(task: TaskSpec) -> set:
        settings = StudySettings(model="m", task=task, passes=("recover.distill",))
        return settings.withheld(cpu)[0].get("recover.distill", set())

    assert withheld(TaskSpec("embedding")) == set()
    classification = withheld(TaskSpec("classification", data="data.csv"))
    assert classification == {("general_fraction", "0.25"), ("general_fraction", "0.5")}


def test_a_study_builds_a_mixed_distillation_in_its_build_child(tiny_encoder, tmp_path):
    """The general batches travel to the build child with the task's own (build.py's batches
    file), so a recipe mixing in Wikipedia builds there as it does in process."""
    from fakes import FakeEvaluator

    from slimformer.card import write_card
    from slimformer.measure import MeasureSettings
    from slimformer.search.runner import run_study

    mixed = Recipe(steps=(Step("recover.distill", {"steps": 10, "general_fraction": 0.5}),))
    settings = StudySettings(
        model=str(tiny_encoder),
        task=TaskSpec("embedding"),
        trials=2,
        passes=("recover.distill",),
        starts=(mixed.to_dict(),),
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=0,
    )
    result = run_study(settings, tmp_path / "run", write_card=write_card, evaluator=FakeEvaluator())
    distilled = [t for t in result.trials if t.recipe and t.recipe["steps"]]
    assert [t.state for t in distilled] == ["complete"], [t.error for t in distilled]
    step = distilled[0].recipe["steps"][0]
    assert step["config"]["general_fraction"] == 0.5 and step["resolved"]["steps"] == 10
