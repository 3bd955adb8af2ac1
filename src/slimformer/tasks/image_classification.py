"""Image classification accuracy of an image-classification checkpoint (a ViT), on a labelled
image folder (`--data DIR`, one sub-folder per class) or the built-in Fashion-MNIST test set.

Splits are fixed by the seed. Calibration and training images never overlap the scored ones:
a folder is shuffled and cut once (calibration first, the rest scored); on the built-in set
the scored and calibration images come from the test split, disjoint, and training (which a
distillation pass may use) from the training split.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimformer.errors import SlimformerError
from slimformer.tasks.base import Score, State, Task, collate, seeded_shuffle
from slimformer.tasks.images import ImageFolder, read_image, scan_image_folder

if TYPE_CHECKING:
    from slimformer.model import SlimModel

MAX_CALIBRATION = 256
BUILTIN_SCORED = 2000  # of Fashion-MNIST's 10,000 test images: ±0.7 points at 90%, ~30 s
# Distillation's unlabelled images (a run folder keeps them: ~51 MB as float batches). A
# distillation of 800 steps of 32 images saw the 2,048 of before 12 times over: on vit-fashion
# with half its tokens pruned from the second block it recovered to 86.2% from 2,048 images and
# 86.85% from 16,384 (lr 3e-4; 88.05% unpruned; an exploratory run on the AMX Xeon).
BUILTIN_TRAINING = 16384
MIN_IMAGES = 20
SCORE_BATCH = 64


class ImageClassificationTask(Task):
    name = "image-classification"
    head = "image-classification"
    metric = "accuracy"
    takes_seq_len = False

    # --- data ---------------------------------------------------------------------------
    @cached_property
    def _folder(self) -> ImageFolder | None:
        return scan_image_folder(self.spec.data) if self.spec.data else None

    @cached_property
    def _splits(self) -> dict[str, list[tuple[Any, int]]]:
        """Each split as (image source, class index) pairs: a path, or a built-in index."""
        if self._folder is None:
            return self._builtin_splits()
        files = list(self._folder.files)
        if len(files) < MIN_IMAGES:
            raise SlimformerError(
                f"{self._folder.root} has {len(files)} images; at least {MIN_IMAGES} are needed "
                "(some calibrate, the rest score)"
            )
        shuffled = seeded_shuffle(files, self.spec.seed)
        cut = min(MAX_CALIBRATION, len(shuffled) // 10)
        return {"calibration": shuffled[:cut], "test": shuffled[cut:]}

    def _builtin_splits(self) -> dict[str, list[tuple[Any, int]]]:
        from slimformer.assets.fashion_mnist import fashion_mnist

        _, test_labels = fashion_mnist("test")
        _, train_labels = fashion_mnist("train")
        order = seeded_shuffle(list(range(len(test_labels))), self.spec.seed)
        training = seeded_shuffle(list(range(len(train_labels))), self.spec.seed)
        pick = lambda split, labels, indices: [((split, i), int(labels[i])) for i in indices]  # noqa: E731
        return {
            "calibration": pick("test", test_labels, order[:MAX_CALIBRATION]),
            "test": pick(
                "test", test_labels, order[MAX_CALIBRATION : MAX_CALIBRATION + BUILTIN_SCORED]
            ),
            "training": pick("train", train_labels, training[:BUILTIN_TRAINING]),
        }

    @property
    def class_names(self) -> tuple[str, ...]:
        if self._folder is not None:
            return self._folder.classes
        from slimformer.assets.fashion_mnist import CLASSES

        return CLASSES

    def split_name(self, split: str) -> str:
        if split == "training" and "training" in self._splits:
            return "training"
        return super().split_name(split)

    def check_data(self) -> None:
        self._splits  # noqa: B018  (reads and checks every image)

    def texts(self, split: str) -> list[str]:
        raise SlimformerError("the image-classification task has images, not texts")

    def _pixels(self, source: Any, channels: int) -> np.ndarray:
        if isinstance(source, Path):
            return read_image(source, channels)
        from slimformer.assets.fashion_mnist import fashion_mnist

        split, index = source
        return fashion_mnist(split)[0][index][:, :, None]

    def examples(self, model: SlimModel, split: str) -> list[torch.Tensor]:
        """Pixel values [channels, height, width], normalized as the model was trained."""
        self.check_model(model)
        config = model.config
        channels, side = int(config.num_channels), int(config.image_size)
        self._check_size(side, channels)
        scale, mean, std = _normalization(model, channels)
        rows = self._splits[self.split_name(split)]
        pixels = np.stack([self._pixels(source, channels) for source, _ in rows])
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() * scale
        batch = (batch - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return list(batch.contiguous())

    def _check_size(self, side: int, channels: int) -> None:
        if self._folder is not None:
            width, height = self._folder.size
            where = f"the images in {self._folder.root} are"
        else:
            width = height = 28
            where = "the built-in Fashion-MNIST images are"
            if channels != 1:
                raise SlimformerError(
                    f"{where} grey, but the model takes {channels}-channel images; give your "
                    "own with --data DIR"
                )
        if (width, height) != (side, side):
            raise SlimformerError(
                f"{where} {width}x{height}, but the model takes {side}x{side} images; resize "
                "them (or give images of that size with --data DIR)"
            )

    # --- quality ------------------------------------------------------------------------
    def label_ids(self, model: SlimModel) -> np.ndarray:
        """The model's label id of each scored image's class: by name, else a class named by
        a number, else (same count) by position."""
        config = model.config
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        names = self.class_names
        if all(name in label2id for name in names):
            mapping = [label2id[name] for name in names]
        elif all(name.isdigit() and int(name) < config.num_labels for name in names):
            mapping = [int(name) for name in names]
        elif self._folder is None and config.num_labels == len(names):
            mapping = list(range(len(names)))
        else:
            missing = [name for name in names if name not in label2id][:3]
            raise SlimformerError(
                f"class folder(s) {', '.join(missing)} are not among the model's labels "
                f"({', '.join(label2id) or config.num_labels}); name each sub-folder after the "
                "label it holds"
            )
        return np.array([mapping[label] for _, label in self._splits["test"]], dtype=np.int64)

    def prepare(self, reference: SlimModel) -> State:
        self.check_model(reference)
        self._check_size(int(reference.config.image_size), int(reference.config.num_channels))
        return {"labels": self.label_ids(reference)}

    @torch.inference_mode()
    def score(self, model: SlimModel, state: State) -> Score:
        examples = self.examples(model, "test")
        predicted = np.zeros(len(examples), dtype=np.int64)
        for at in range(0, len(examples), SCORE_BATCH):
            batch = collate(model, examples[at : at + SCORE_BATCH])
            predicted[at : at + SCORE_BATCH] = model(**batch).logits.argmax(-1).numpy()
        return self.make_score(float(np.mean(predicted == state["labels"])))

    def describe_score(self) -> str:
        source = (
            f"the images in {self.spec.data}"
            if self.spec.data
            else (f"{BUILTIN_SCORED} Fashion-MNIST test images")
        )
        return f"top-1 accuracy on {source} held out from calibration."

    def check_model(self, model: SlimModel) -> None:
        if model.head != self.head:
            raise SlimformerError(
                f"the {self.name} task needs an image-classification model, but this "
                f"checkpoint is a {model.head} model; choose another --task"
            )
        channels = getattr(model.config, "num_channels", None)
        if channels not in (1, 3) or not getattr(model.config, "image_size", None):
            raise SlimformerError(
                "the image-classification task reads grey or RGB images; this model's config "
                f"gives num_channels={channels} and image_size="
                f"{getattr(model.config, 'image_size', None)}"
            )


def _normalization(model: SlimModel, channels: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(rescale factor, mean, std) from the original checkpoint's preprocessor_config.json,
    else Hugging Face's ViT image processor defaults (1/255, 0.5, 0.5)."""
    scale, mean, std = 1 / 255, [0.5] * channels, [0.5] * channels
    path = Path(model.source or "") / "preprocessor_config.json"
    if model.source and path.is_file():
        try:
            config = json.loads(path.read_text())
        except ValueError:
            raise SlimformerError(f"{path} is not valid JSON; fix or remove it") from None
        if config.get("do_rescale", True):
            scale = float(config.get("rescale_factor", scale))
        else:
            scale = 1.0
        if config.get("do_normalize", True):
            mean = _per_channel(config.get("image_mean", mean), channels, path)
            std = _per_channel(config.get("image_std", std), channels, path)
        else:
            mean, std = [0.0] * channels, [1.0] * channels
    return scale, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _per_channel(value: Any, channels: int, path: Path) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise SlimformerError(
            f"{path} gives {len(values)} mean/std values for a {channels}-channel model"
        )
    return [float(v) for v in values]
