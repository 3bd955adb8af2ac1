"""vit-fashion: a Hugging Face ViTForImageClassification trained once on Fashion-MNIST and
cached as safetensors (no pretrained ViT is reachable offline, so slimformer trains its own).

28x28 grey images in 2x2 patches: 196 patch tokens and the class token, the sequence length
where token merging and pruning matter. Training is deterministic (fixed seeds, data order and
thread count), so every machine builds the same weights up to its kernels' float rounding.

At 197 tokens a training step on two cores is dominated by attention over every token pair, so
the model is narrow (width 64, 4 blocks) to see four epochs in the time a width-192 model sees
less than one. Three things let it learn that fast (bench/vit_training_probes.py and
bench/vit_training_plans.py; README, "Tasks", has the accuracy and training time): its attention
starts "mimetic" (Trockman & Kolter 2023: query-key and value-output products like a pretrained
ViT's) with sine-cosine positions; a small convnet trained first for a minute teaches it
through its softened predictions (DeiT's convnet teacher); and a step computes the last block
at the class token only, the one token the classifier reads.

Training writes a checkpoint every minute (weights, AdamW's moments, the data order and the
generator's state, one safetensors file), so a killed training goes on where it stopped, with
the same weights as one that never stopped; `slimformer assets install vit-fashion --for 30m`
trains in parts.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slimformer.assets.cache import cache_dir
from slimformer.assets.fashion_mnist import CLASSES, fashion_mnist
from slimformer.cpu import fingerprint
from slimformer.files import publish_dir, write_atomic

VIT_FASHION_INSTALL = "slimformer assets install vit-fashion (trains once; needs fashion-mnist)"
_DIRNAME = "vit-fashion"
# Pixels are scaled to [0, 1] and normalized like Hugging Face's ViT image processor does by
# default; the folder's preprocessor_config.json says so for every reader.
MEAN, STD = 0.5, 0.5


@dataclass(frozen=True)
class ViTShape:
    # Narrow and shallow: at 197 tokens a training step costs the attention over every token
    # pair, so on two AVX2 cores a width-64 model sees 2.4 epochs in the time width 192 sees 0.6
    # (bench/results/vit_training_probes*.json: 87.2% vs 76.8% in 15 minutes).
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    intermediate_size: int = 256
    image_size: int = 28
    patch_size: int = 2
    num_channels: int = 1


@dataclass(frozen=True)
class TrainingPlan:
    epochs: float = 4.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    # Patch dropout: the patch tokens a step sees, None for all of them; the last
    # `full_token_fraction` of the steps see every token, as inference does.
    keep_tokens: int | None = None
    full_token_fraction: float = 0.03
    flip: bool = False  # random horizontal flips (clothes look the same mirrored)
    # Mimetic initialization (Trockman & Kolter 2023): attention starts with the query-key and
    # value-output products pretrained ViTs show, which on Fashion-MNIST lifted a width-96 model
    # from 77.6% to 84.4% in 10 minutes (bench/results/vit_training_probes*.json).
    mimetic: bool = True
    # Start the position embeddings as 2-D sine-cosine (MAE; Beyer et al. 2022): with mimetic
    # attention a block then first attends to nearby patches (+0.6 pt at 10 minutes). Without
    # mimetic attention it did not help at lr 1e-3. The table's entries are +-1 against patch
    # embeddings of ~0.04 at Hugging Face's initialization: 196 tokens and 4 blocks learn past
    # that, but a 2-block ViT on a 4x4 grid (8x8 digits) stayed at chance.
    sincos: bool = True
    # Knowledge distillation from a small convolutional network trained first, for this many
    # epochs (0: none). A convnet's inductive bias learns Fashion-MNIST in a minute; its softened
    # predictions tell the ViT which classes look alike (DeiT, Touvron et al. 2021, trains ViTs
    # on little data from a convnet teacher). The loss mixes the labels' cross-entropy and the
    # teacher's (KL at `distill_temperature`, scaled by its square) by `distill_weight`.
    teacher_epochs: float = 4.0
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    seed: int = 0
    threads: int = 2
    limit_images: int | None = None  # train on the first N only (quick checks)


def build_vit(shape: ViTShape, num_labels: int, labels: tuple[str, ...] | None = None):
    from transformers import ViTConfig, ViTForImageClassification

    names = labels or tuple(str(i) for i in range(num_labels))
    config = ViTConfig(
        **asdict(shape),
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def normalize(images: np.ndarray):
    """uint8 [n, h, w] (grey) -> float pixel_values [n, 1, h, w] as the model expects."""
    import torch

    pixels = torch.from_numpy(np.array(images)).float().div_(255)
    return pixels.sub_(MEAN).div_(STD).unsqueeze(1)


def training_logits(model, pixels, keep: int, generator):
    """The classifier's logits with each image's patch tokens cut to a random `keep`."""
    import torch

    vit = model.vit
    hidden = vit.embeddings(pixels)
    patches = hidden.shape[1] - 1
    if keep < patches:
        chosen = torch.rand(hidden.shape[0], patches, generator=generator).argsort(1)[:, :keep]
        index = (chosen + 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        hidden = torch.cat([hidden[:, :1], hidden.gather(1, index)], dim=1)
    for layer in vit.layers[:-1]:
        hidden = layer(hidden, None)
    return model.classifier(vit.layernorm(_class_token_out(vit.layers[-1], hidden)))


def _class_token_out(layer, hidden):
    """A ViTLayer's output at the class token alone. The classifier reads nothing else from the
    last block, so its other tokens' queries, attention rows and MLP can be skipped: the same
    loss and gradients, ~1.2x the training steps a second in vit-fashion's whole training
    (1.38x in a step timed alone; width 64 x 4 blocks, 2 cores)."""
    import torch

    attention = layer.attention
    normed = layer.layernorm_before(hidden)
    batch = normed.shape[0]

    def heads(states):
        return states.view(batch, states.shape[1], -1, attention.head_dim).transpose(1, 2)

    query = heads(attention.q_proj(normed[:, :1]))
    mixed = torch.nn.functional.scaled_dot_product_attention(
        query,
        heads(attention.k_proj(normed)),
        heads(attention.v_proj(normed)),
        scale=attention.scaling,
    )
    token = hidden[:, 0] + attention.o_proj(mixed.transpose(1, 2).reshape(batch, -1))
    return token + layer.mlp(layer.layernorm_after(token))


def mimetic_attention(model, generator, query_key: float = 0.7, value_output: float = 0.4) -> None:
    """Set each head's W_q^T W_k near query_key * (Z + I) and each block's W_v^T W_o^T near
    value_output * (Z - I), Z Gaussian with variance 1/width (Trockman & Kolter 2023): the
    target's SVD is split evenly between the two factors, a head taking its top singular
    directions. Biases stay as they are."""
    import torch

    width = model.config.hidden_size
    head = width // model.config.num_attention_heads

    def factors(scale: float, sign: int):
        noise = torch.randn(width, width, generator=generator) / width**0.5
        u, s, vt = torch.linalg.svd(scale * (noise + sign * torch.eye(width)))
        return u * s.sqrt(), vt.T * s.sqrt()  # left @ right.T == the target

    from slimformer.adapters.registry import adapter_for

    adapter = adapter_for(model)
    with torch.no_grad():
        for block in range(adapter.num_layers):
            linears = adapter.attention_linears(block)
            for at in range(0, width, head):
                left, right = factors(query_key, +1)
                linears["query"].weight[at : at + head] = left[:, :head].T
                linears["key"].weight[at : at + head] = right[:, :head].T
            left, right = factors(value_output, -1)
            linears["value"].weight.copy_(left.T)
            linears["out"].weight.copy_(right)


def sincos_positions(model) -> None:
    """2-D sine-cosine position embeddings (still trained), zero for the class token."""
    import torch

    table = model.vit.embeddings.position_embeddings  # [1, 1 + grid*grid, width]
    width = table.shape[-1]
    grid = round((table.shape[1] - 1) ** 0.5)
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for axis in (xs.flatten(), ys.flatten()):
        angle = axis[:, None].float() * omega[None]
        parts += [angle.sin(), angle.cos()]
    with torch.no_grad():
        table.zero_()
        table[0, 1:, : 4 * quarter] = torch.cat(parts, dim=1)


def _conv_teacher(channels: int, classes: int, side: int):
    """Two 3x3 convolution + pooling stages and a small classifier head."""
    from torch import nn

    width = 32
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (side // 4) ** 2, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def teacher_logits(pixels, targets, classes: int, plan: TrainingPlan, log: Callable[[str], None]):
    """Train the convolutional teacher on the training images (AdamW, cosine schedule) and
    return its logits for every one of them, [n, classes]."""
    import torch

    torch.manual_seed(plan.seed + 2)
    teacher = _conv_teacher(pixels.shape[1], classes, pixels.shape[-1])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    batch = 128
    per_epoch = len(pixels) // batch
    steps = max(1, round(plan.teacher_epochs * per_epoch))
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(pixels), generator=generator)
        index = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.nn.functional.cross_entropy(teacher(pixels[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    teacher.eval()
    with torch.inference_mode():
        logits = torch.cat([teacher(pixels[at : at + 256]) for at in range(0, len(pixels), 256)])
    agreement = (logits.argmax(-1) == targets).float().mean().item()
    log(f"  teacher: {steps} steps, agrees with {agreement:.1%} of the training labels")
    return logits.clone()


class TrainingPaused(Exception):
    """Training stopped at its `pause_after_s`; the checkpoint holds every step done so far and
    the same call goes on from there."""

    def __init__(self, step: int, steps: int, seconds: float):
        super().__init__(f"paused at step {step}/{steps} after {seconds:.0f} s of training")
        self.step, self.steps, self.seconds = step, steps, seconds


# A killed or paused training loses at most this much: the model, AdamW's moments, the data
# order and the random generator are written this often (and at a pause).
CHECKPOINT_EVERY_S = 60.0


def _checkpoint_facts(shape: ViTShape, plan: TrainingPlan, images: int) -> dict:
    return {"shape": asdict(shape), "plan": asdict(plan), "images": images}


def _save_checkpoint(path: Path, model, optimizer, generator, order, teacher, facts: dict) -> None:
    """Everything the next step needs, in one safetensors file (no pickle), written atomically."""
    import torch
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous()
    tensors["generator"] = generator.get_state()
    tensors["order"] = order.contiguous()
    if teacher is not None:
        tensors["teacher"] = teacher.contiguous()
    write_atomic(path, save(tensors, metadata={"facts": json.dumps(facts)}))


def _load_checkpoint(path: Path, model, optimizer, generator, facts: dict):
    """(step, seconds, order, teacher logits or None) from a checkpoint of this very training,
    else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as file:
            saved = json.loads((file.metadata() or {}).get("facts", "{}"))
            if any(saved.get(key) != value for key, value in facts.items()):
                return None
            tensors = {key: file.get_tensor(key) for key in list(file.keys())}
    except (SafetensorError, OSError, ValueError, RuntimeError):  # absent or damaged: start over
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    generator.set_state(tensors["generator"])
    return saved["step"], saved["seconds"], tensors["order"], tensors.get("teacher")


def train_vit(
    images: np.ndarray,
    labels: np.ndarray,
    shape: ViTShape,
    plan: TrainingPlan,
    class_names: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
):
    """Train a ViTForImageClassification on uint8 grey images; deterministic for one plan."""
    return train_vit_resumable(images, labels, shape, plan, class_names, log)[0]


def train_vit_resumable(
    images: np.ndarray,
    labels: np.ndarray,
    shape: ViTShape,
    plan: TrainingPlan,
    class_names: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
    checkpoint: Path | None = None,
    pause_after_s: float | None = None,
):
    """`train_vit` that goes on from `checkpoint` when one of the same training is there, and
    raises TrainingPaused once this call has trained `pause_after_s` (checked after each step).
    Returns the model and the training seconds of every call together. Resumed or not, the
    weights are the same: the data order and the generator's state travel in the checkpoint."""
    import torch

    if pause_after_s is not None and checkpoint is None:
        raise ValueError("pausing needs a checkpoint to go on from")
    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    if plan.limit_images:
        images, labels = images[: plan.limit_images], labels[: plan.limit_images]
    num_labels = int(labels.max()) + 1
    model = build_vit(shape, num_labels, class_names)
    if plan.mimetic:
        mimetic_attention(model, torch.Generator().manual_seed(plan.seed + 1))
    if plan.sincos:
        sincos_positions(model)
    model.train()
    pixels = normalize(images)
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(plan.seed)
    per_epoch = len(pixels) // plan.batch_size
    steps = max(1, round(plan.epochs * per_epoch))
    warmup = max(1, round(plan.warmup_fraction * steps))
    full_from = steps - round(plan.full_token_fraction * steps)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "embeddings" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": plan.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=plan.learning_rate,
    )

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=plan.label_smoothing)
    order = torch.randperm(len(pixels), generator=generator)
    facts = _checkpoint_facts(shape, plan, len(pixels))
    first, seconds_before, teacher = 0, 0.0, None
    resumed = checkpoint and _load_checkpoint(checkpoint, model, optimizer, generator, facts)
    if resumed:
        first, seconds_before, order, teacher = resumed
        log(f"  going on from step {first}/{steps} ({seconds_before:.0f}s trained before)")
    started = time.perf_counter()
    if plan.teacher_epochs and teacher is None:
        teacher = teacher_logits(pixels, targets, num_labels, plan, log)
    temperature, weight = plan.distill_temperature, plan.distill_weight
    last_report = last_saved = started

    def save(step: int) -> None:
        seconds = seconds_before + time.perf_counter() - started
        _save_checkpoint(
            checkpoint,
            model,
            optimizer,
            generator,
            order,
            teacher,
            facts | {"step": step, "seconds": seconds},
        )

    for step in range(first, steps):
        at = (step % per_epoch) * plan.batch_size
        if at == 0 and step:
            order = torch.randperm(len(pixels), generator=generator)
        index = order[at : at + plan.batch_size]
        batch = pixels[index]
        if plan.flip:
            flipped = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flipped[:, None, None, None], batch.flip(-1), batch)
        keep = 10**9 if step >= full_from or plan.keep_tokens is None else plan.keep_tokens
        logits = training_logits(model, batch, keep, generator)
        loss = loss_fn(logits, targets[index])
        if teacher is not None:
            taught = torch.nn.functional.kl_div(
                torch.log_softmax(logits / temperature, -1),
                torch.log_softmax(teacher[index] / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            loss = (1 - weight) * loss + weight * temperature**2 * taught
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # Set by hand rather than by a scheduler so that a resumed run needs no scheduler state.
        for group in optimizer.param_groups:
            group["lr"] = plan.learning_rate * rate(step)
        optimizer.step()
        now = time.perf_counter()
        if now - last_report >= 30 or step == steps - 1:
            last_report = now
            trained = seconds_before + now - started
            log(f"  step {step + 1}/{steps}  loss {loss.item():.3f}  {trained:.0f}s trained")
        done = step + 1
        paused = pause_after_s is not None and now - started >= pause_after_s and done < steps
        if checkpoint and done < steps and (paused or now - last_saved >= CHECKPOINT_EVERY_S):
            save(done)
            last_saved = now
        if paused:
            raise TrainingPaused(done, steps, seconds_before + now - started)
    model.eval()
    return model, seconds_before + time.perf_counter() - started


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for at in range(0, len(images), batch_size):
            logits = model(pixel_values=normalize(images[at : at + batch_size])).logits
            correct += int((logits.argmax(-1).numpy() == labels[at : at + batch_size]).sum())
    return correct / len(images)


def _vit_fashion_dir() -> Path:
    return cache_dir() / "models" / _DIRNAME


def _is_trained(path: Path) -> bool:
    """A finished checkpoint trained with today's shape and plan (a changed plan retrains)."""
    if not all((path / name).is_file() for name in ("config.json", "model.safetensors")):
        return False
    try:
        facts = json.loads((path / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return facts.get("shape") == asdict(ViTShape()) and facts.get("plan") == asdict(TrainingPlan())


def save_vit(model, out: Path, facts: dict) -> None:
    """The checkpoint, the image processor settings its inputs were made with, and how it was
    trained (training.json)."""
    model.save_pretrained(out, safe_serialization=True)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [MEAN] * model.config.num_channels,
        "image_std": [STD] * model.config.num_channels,
    }
    write_atomic(out / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")
    write_atomic(out / "training.json", json.dumps(facts, indent=2) + "\n")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout may carry a command's JSON


def _checkpoint_path() -> Path:
    return cache_dir() / "models" / f".{_DIRNAME}.training.safetensors"


def vit_fashion_path(
    log: Callable[[str], None] = _progress, train_for_s: float | None = None
) -> Path:
    """The vit-fashion checkpoint folder, trained on first use (minutes; progress logged).
    A killed training goes on from its last checkpoint; `train_for_s` trains at most that long
    this time and raises TrainingPaused (the next call goes on)."""
    target = _vit_fashion_dir()
    if _is_trained(target):
        return target
    images, labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    shape, plan = ViTShape(), TrainingPlan()
    checkpoint = _checkpoint_path()
    log(
        f"training vit-fashion once ({shape.num_hidden_layers} blocks, width "
        f"{shape.hidden_size}, {(shape.image_size // shape.patch_size) ** 2} patch tokens) on "
        f"Fashion-MNIST, {plan.epochs:g} epochs, {plan.threads} threads; cached in {target}"
    )
    model, seconds = train_vit_resumable(
        images, labels, shape, plan, CLASSES, log, checkpoint, pause_after_s=train_for_s
    )
    test_accuracy = accuracy(model, test_images, test_labels)
    log(f"vit-fashion: {test_accuracy:.2%} test accuracy after {seconds:.0f}s of training")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIRNAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        save_vit(
            model,
            tmp,
            {
                "data": "Fashion-MNIST train split (60,000 images)",
                "shape": asdict(shape),
                "plan": asdict(plan),
                "training_seconds": round(seconds, 1),
                "cpu": fingerprint(plan.threads).label,
                "test_accuracy": test_accuracy,
            },
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # trained with an earlier plan
        shutil.rmtree(target)
    publish_dir(tmp, target)
    checkpoint.unlink(missing_ok=True)
    return target


def vit_fashion_status() -> tuple[bool, str]:
    target = _vit_fashion_dir()
    return (True, str(target)) if _is_trained(target) else (False, "")
