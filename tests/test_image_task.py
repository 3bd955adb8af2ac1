"""The image-classification task: the labelled image folder it reads, its splits, its score,
the built-in Fashion-MNIST set, vit-fashion's training code (on 8x8 digits), and bad image
folders on the command line (one `error:` line, exit 2, nothing written).

Images are scikit-learn's digits (shipped in its wheel), written as PNG class folders at the
tiny ViT's 16x16 RGB input size.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from inprocess import assert_one_error_line, run_cli
from PIL import Image

import slimformer
from slimformer.assets.fashion_mnist import digits, fashion_mnist_dir
from slimformer.assets.vit_fashion import (
    TrainingPaused,
    TrainingPlan,
    ViTShape,
    accuracy,
    build_vit,
    mimetic_attention,
    normalize,
    save_vit,
    teacher_logits,
    train_vit,
    train_vit_resumable,
    training_logits,
)
from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.evaluate import run_request
from slimformer.measure import MeasureSettings
from slimformer.model import SlimModel
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec, make_task
from slimformer.tasks.images import scan_image_folder

PER_CLASS = 12  # 120 images: 12 calibrate, 108 are scored
FAST = MeasureSettings(batch_size=8, latency_requests=4, throughput_inputs=16, min_seconds=0.05)


def _write_digits(
    root: Path, classes: range = range(10), size: int = 16, per_class: int = PER_CLASS
) -> Path:
    images, labels = digits()
    for label in classes:
        folder = root / str(label)
        folder.mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            image = Image.fromarray(images[index]).resize((size, size), Image.NEAREST)
            image.convert("RGB").save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_digits(root / "digits")
    save_model(tiny.tiny_vit(), root / "vit")
    (root / "out").mkdir()
    return root


def _task(ws: Path, seed: int = 0) -> object:
    return make_task(TaskSpec("image-classification", data=str(ws / "digits"), seed=seed))


def test_folder_scan_reads_class_subfolders_and_skips_hidden_and_other_files(
    tmp_path: Path,
) -> None:
    root = _write_digits(tmp_path / "d", classes=range(3))
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "1" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    folder = scan_image_folder(root)
    assert folder.classes == ("0", "1", "2")
    assert len(folder.files) == 3 * PER_CLASS
    assert folder.size == (16, 16)
    assert {label for _, label in folder.files} == {0, 1, 2}
    assert all(path.parent.name == folder.classes[label] for path, label in folder.files)


def test_splits_are_disjoint_cover_the_folder_and_follow_the_seed(ws: Path) -> None:
    task = _task(ws)
    calibration = [path for path, _ in task._splits["calibration"]]
    scored = [path for path, _ in task._splits["test"]]
    assert len(calibration) == 12 and len(scored) == 108
    assert not set(calibration) & set(scored)
    assert set(calibration) | set(scored) == {p for p, _ in scan_image_folder(ws / "digits").files}
    assert task.split_name("training") == "calibration"  # distillation never sees scored images
    again = [path for path, _ in _task(ws)._splits["calibration"]]
    other = [path for path, _ in _task(ws, seed=1)._splits["calibration"]]
    assert again == calibration and other != calibration


def test_examples_are_normalized_pixels_stacked_by_collate(ws: Path) -> None:
    model = load_model(ws / "vit")
    task = _task(ws)
    examples = task.examples(model, "calibration")
    path, _ = task._splits["calibration"][0]
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert torch.allclose(examples[0], (expected.float() / 255 - 0.5) / 0.5)
    batches = task.calibration_batches(model, batch_size=5)
    assert [b["pixel_values"].shape for b in batches] == [(5, 3, 16, 16)] * 2 + [(2, 3, 16, 16)]


def test_distillation_of_an_image_model_trains_on_images_and_asks_for_no_general_text(
    ws: Path, tmp_path: Path
) -> None:
    # 640 images: 64 calibrate (and train: two batches of 32), the rest are scored
    spec = TaskSpec("image-classification", data=str(_write_digits(tmp_path, per_class=64)))
    model = load_model(ws / "vit")
    assert make_task(spec).general_batches(model) == []  # a ViT has no tokenizer for text
    recipe = Recipe(steps=(Step("recover.distill", {"steps": 2}),), task=spec)
    distilled = slimformer.apply(ws / "vit", recipe)
    assert distilled.recipe.steps[0].pass_name == "recover.distill"


def test_normalization_follows_the_source_checkpoints_preprocessor_config(
    ws: Path, tmp_path: Path
) -> None:
    folder = save_model(tiny.tiny_vit(), tmp_path / "vit")
    processor = {"image_mean": [0.2, 0.3, 0.4], "image_std": 0.25, "rescale_factor": 1 / 255}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    model = load_model(folder)
    task = _task(ws)
    pixels = task.examples(model, "calibration")[0]
    raw = task.examples(replace(model, source=""), "calibration")[0] * 0.5 + 0.5
    mean = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    assert torch.allclose(pixels, (raw - mean) / 0.25, atol=1e-5)


def test_score_is_the_share_of_scored_images_the_model_gets_right(ws: Path) -> None:
    model = load_model(ws / "vit")
    with torch.no_grad():  # always answer class 3
        model.module.classifier.weight.zero_()
        model.module.classifier.bias.copy_(torch.eye(10)[3])
    task = _task(ws)
    state = task.prepare(model)
    labels = [label for _, label in task._splits["test"]]
    assert state["labels"].tolist() == labels  # folders named 0-9 are the model's ids 0-9
    assert task.score(model, state).value == pytest.approx(labels.count(3) / len(labels))


def test_class_folders_are_matched_to_the_models_labels_by_name(ws: Path, tmp_path: Path) -> None:
    names = [f"digit-{i}" for i in range(10)]
    model = tiny.tiny_vit()
    model.module.config.label2id = {name: 9 - i for i, name in enumerate(names)}
    root = _write_digits(tmp_path / "named", classes=range(3))
    for i in range(3):
        (root / str(i)).rename(root / names[i])
    task = make_task(TaskSpec("image-classification", data=str(root)))
    expected = [9 - label for _, label in task._splits["test"]]
    assert task.label_ids(model).tolist() == expected
    (root / names[2]).rename(root / "cat")
    with pytest.raises(SlimformerError, match="cat are not among the model's labels"):
        make_task(TaskSpec("image-classification", data=str(root))).label_ids(model)


def test_evaluation_times_and_scores_an_image_model(ws: Path) -> None:
    spec = TaskSpec("image-classification", data=str(ws / "digits"))
    task = make_task(spec)
    state_path = ws / "state.safetensors"
    from slimformer.tasks import save_state

    save_state(task.prepare(load_model(ws / "vit")), state_path)
    result = run_request(
        {
            "model_dir": str(ws / "vit"),
            "task": spec.to_dict(),
            "state": str(state_path),
            "settings": FAST.__dict__,
        }
    )
    assert result.metric == "accuracy" and 0 <= result.quality <= 1
    assert result.measurement["mean_tokens"] == 17  # (16/4)^2 patches and the class token
    assert result.measurement["throughput_per_s"] > 0
    assert result.measurement["gflops_per_input"] > 0


def _same_weights(one, two) -> None:
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_vit_training_is_deterministic_and_learns_digits() -> None:
    images, labels = digits()
    shape = ViTShape(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        image_size=8,
        patch_size=2,
    )
    # Patch dropout on (8 of 16 patches) until the last fifth of the steps; mimetic attention
    # but no sine-cosine positions (on a 4x4 grid they drown the patches: TrainingPlan.sincos);
    # one thread, as the suite's other work shares the cores.
    plan = TrainingPlan(
        epochs=6,
        batch_size=64,
        learning_rate=3e-3,
        keep_tokens=8,
        full_token_fraction=0.2,
        mimetic=True,
        sincos=False,
        threads=1,
    )
    train, held_out = slice(0, 1500), slice(1500, None)
    model = train_vit(images[train], labels[train], shape, plan, log=lambda line: None)
    assert accuracy(model, images[held_out], labels[held_out]) >= 0.5  # chance: 0.1
    short = replace(plan, epochs=0.2)
    one = train_vit(images[train], labels[train], shape, short, log=lambda line: None)
    two = train_vit(images[train], labels[train], shape, short, log=lambda line: None)
    _same_weights(one, two)


def test_mimetic_attention_starts_heads_near_identity_and_value_output_near_minus_identity():
    shape = ViTShape(hidden_size=96, num_hidden_layers=2, num_attention_heads=3)
    model = build_vit(replace(shape, intermediate_size=384), 10)
    mimetic_attention(model, torch.Generator().manual_seed(1))
    eye = torch.eye(96)
    for layer in model.vit.layers.requires_grad_(False):
        attention = layer.attention
        for head in range(3):
            rows = slice(32 * head, 32 * (head + 1))
            query_key = attention.q_proj.weight[rows].T @ attention.k_proj.weight[rows]
            # The top 32 of 96 singular directions of 0.7 (Z + I) keep over a third of its
            # diagonal (the directions Z stretches); Hugging Face's own init gives ~0.
            assert 0.3 < query_key.diagonal().mean() < 0.7
        value_output = attention.v_proj.weight.T @ attention.o_proj.weight.T
        assert float(value_output.diagonal().mean()) == pytest.approx(-0.4, abs=0.05)
        off_diagonal = value_output - value_output * eye
        assert float(off_diagonal.std()) == pytest.approx(0.4 / 96**0.5, rel=0.1)


TINY_VIT = ViTShape(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=8,
    patch_size=2,
)
# 4 steps an epoch over 2 epochs: the pauses fall inside an epoch, on its boundary (a new data
# order) and across the switch from a random half of the tokens to all of them.
TINY_PLAN = TrainingPlan(
    epochs=2, batch_size=64, keep_tokens=8, full_token_fraction=0.25, limit_images=256, threads=1
)


def test_a_vit_training_paused_after_every_step_ends_with_the_same_weights(tmp_path: Path) -> None:
    images, labels = digits()
    quiet = lambda line: None  # noqa: E731
    whole = train_vit(images, labels, TINY_VIT, TINY_PLAN, log=quiet)
    checkpoint, pauses = tmp_path / "training.safetensors", []
    while True:
        try:
            model, seconds = train_vit_resumable(
                images, labels, TINY_VIT, TINY_PLAN, None, quiet, checkpoint, pause_after_s=0
            )
            break
        except TrainingPaused as paused:
            pauses.append(paused.step)
    assert pauses == list(range(1, 8)) and seconds > 0
    _same_weights(whole, model)


def test_a_vit_training_with_a_teacher_resumes_to_the_same_weights_training_it_once(
    tmp_path: Path,
) -> None:
    images, labels = digits()
    plan = replace(TINY_PLAN, teacher_epochs=2)
    whole = train_vit(images, labels, TINY_VIT, plan, log=lambda line: None)
    checkpoint, lines = tmp_path / "training.safetensors", []
    while True:
        try:
            model, _ = train_vit_resumable(
                images, labels, TINY_VIT, plan, None, lines.append, checkpoint, pause_after_s=0
            )
            break
        except TrainingPaused:
            pass
    # The teacher's logits travel in the checkpoint: trained in the first call only.
    assert sum("teacher:" in line for line in lines) == 1
    _same_weights(whole, model)


def test_the_convolutional_teacher_learns_the_training_labels() -> None:
    images, labels = digits()
    pixels, targets = normalize(images), torch.from_numpy(labels)
    plan = TrainingPlan(teacher_epochs=20, threads=1)
    logits = teacher_logits(pixels, targets, 10, plan, log=lambda line: None)
    assert logits.shape == (len(images), 10)
    assert float((logits.argmax(-1) == targets).float().mean()) >= 0.9  # chance: 0.1


def test_the_class_token_shortcut_of_training_gives_the_models_own_logits() -> None:
    model = build_vit(replace(TINY_VIT, num_hidden_layers=2), 10).eval()
    mimetic_attention(model, torch.Generator().manual_seed(1))
    pixels = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        every_token = training_logits(model, pixels, keep=10**9, generator=None)
    torch.testing.assert_close(every_token, expected, rtol=1e-5, atol=1e-5)


def test_a_vit_checkpoint_of_another_plan_or_damaged_is_not_resumed(tmp_path: Path) -> None:
    images, labels = digits()
    quiet = lambda line: None  # noqa: E731
    checkpoint = tmp_path / "training.safetensors"
    other = replace(TINY_PLAN, learning_rate=3e-3)
    with pytest.raises(TrainingPaused):
        train_vit_resumable(images, labels, TINY_VIT, other, None, quiet, checkpoint, 0)
    lines: list[str] = []
    model, _ = train_vit_resumable(
        images, labels, TINY_VIT, TINY_PLAN, None, lines.append, checkpoint
    )
    assert not any("going on" in line for line in lines)
    _same_weights(train_vit(images, labels, TINY_VIT, TINY_PLAN, log=quiet), model)

    checkpoint.write_bytes(b"not a safetensors file")
    again, _ = train_vit_resumable(images, labels, TINY_VIT, TINY_PLAN, None, quiet, checkpoint)
    _same_weights(model, again)


def test_saved_vit_reloads_with_its_normalization_and_scores_as_trained(tmp_path: Path) -> None:
    images, labels = digits()
    plan = TrainingPlan(epochs=1, batch_size=64, learning_rate=3e-3, keep_tokens=8, threads=1)
    model = train_vit(images, labels, TINY_VIT, plan, log=lambda line: None)
    save_vit(model, tmp_path / "vit", {"test": True})
    root = tmp_path / "data"
    for i, (image, label) in enumerate(zip(images[:200], labels[:200], strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i}.png")
    loaded = load_model(tmp_path / "vit")
    assert loaded.head == "image-classification"
    task = make_task(TaskSpec("image-classification", data=str(root)))
    scored = [path for path, _ in task._splits["test"]]
    pixels = np.stack([np.asarray(Image.open(p)) for p in scored])
    truth = np.array([int(p.parent.name) for p in scored])
    expected = accuracy(model, pixels, truth)
    assert task.score(loaded, task.prepare(loaded)).value == pytest.approx(expected)


@pytest.mark.skipif(fashion_mnist_dir() is None, reason="Fashion-MNIST is not installed")
def test_builtin_fashion_mnist_scores_test_images_apart_from_calibration() -> None:
    task = make_task(TaskSpec("image-classification"))
    splits = task._splits
    calibration = {source for source, _ in splits["calibration"]}
    scored = {source for source, _ in splits["test"]}
    training = {source for source, _ in splits["training"]}
    assert len(scored) == 2000 and len(calibration) == 256
    assert not calibration & scored
    assert {split for split, _ in scored | calibration} == {"test"}
    assert {split for split, _ in training} == {"train"}
    with pytest.raises(SlimformerError, match="built-in Fashion-MNIST images are grey"):
        task.examples(tiny.tiny_vit(), "test")


# --- bad image folders on the command line ------------------------------------------------------
def _bad_folder(ws: Path, name: str) -> Path:
    root = ws / "bad" / name
    if name == "empty":
        (root / "cats").mkdir(parents=True)
    elif name == "mixed_sizes":
        _write_digits(root, classes=range(2))
        Image.new("RGB", (20, 16)).save(root / "1" / "wide.png")
    elif name == "unreadable":
        _write_digits(root, classes=range(2))
        (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif name == "truncated":
        _write_digits(root, classes=range(2))
        whole = (root / "1" / "3.png").read_bytes()
        (root / "1" / "3.png").write_bytes(whole[: len(whole) // 2])
    elif name == "single_class":
        _write_digits(root, classes=range(1))
    elif name == "wrong_size":
        _write_digits(root, classes=range(2), size=8)
    return root


@pytest.mark.parametrize(
    ("folder", "keywords"),
    [
        ("empty", ("no images found in class sub-folders", "empty")),
        ("mixed_sizes", ("images differ in size", "16x16", "20x16")),
        ("unreadable", ("cannot read image", "broken.png", "remove or replace it")),
        ("truncated", ("cannot read image", "3.png")),
        ("single_class", ("one class (0)", "at least two")),
        ("wrong_size", ("8x8", "model takes 16x16 images")),
    ],
)
@pytest.mark.parametrize("command", ["optimize", "bench"])
def test_bad_image_folder_is_one_error_line_and_writes_nothing(
    ws: Path, folder: str, keywords: tuple[str, ...], command: str
) -> None:
    data = _bad_folder(ws, folder) if not (ws / "bad" / folder).exists() else ws / "bad" / folder
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    out = ws / "out" / f"{command}-{folder}"
    args = [command, str(ws / "vit"), "--data", str(data)]
    if command == "optimize":
        args += ["--out", str(out), "--trials", "1"]
    assert_one_error_line(run_cli(args), *keywords)
    assert not out.exists()
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before


def test_seq_len_is_refused_for_images(ws: Path) -> None:
    args = ["bench", str(ws / "vit"), "--data", str(ws / "digits"), "--seq-len", "32"]
    assert_one_error_line(run_cli(args), "--seq-len cuts text inputs", "image-classification")


def test_image_task_refuses_a_text_model(ws: Path) -> None:
    model = tiny.tiny_bert()
    with pytest.raises(SlimformerError, match="needs an image-classification model"):
        _task(ws).examples(model, "test")
    assert isinstance(model, SlimModel)


def test_a_vit_fashion_cache_from_another_training_plan_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import asdict

    from slimformer.assets import vit_fashion

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "vit-fashion"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    facts = {"shape": asdict(ViTShape()), "plan": asdict(TrainingPlan())}
    (folder / "training.json").write_text(json.dumps(facts))
    assert vit_fashion.vit_fashion_status() == (True, str(folder))
    facts["plan"]["epochs"] += 1
    (folder / "training.json").write_text(json.dumps(facts))
    assert vit_fashion.vit_fashion_status() == (False, "")
