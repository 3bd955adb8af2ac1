"""`recover.distill`: recovery by knowledge distillation — the original model teaches the
pruned one.

Trains the student on unlabeled task inputs (never the scored split) to match the teacher's
outputs: KL divergence of temperature-softened logits for LMs and classifiers, cosine distance
of mean-pooled embeddings for sentence encoders; optionally plus matching of the final hidden
states, of every block's output against the original block it came from, and of the batch's
similarity matrix (each pair of inputs' cosine similarity, so the student keeps the teacher's
neighbourhoods, not only each vector's direction), and of each input's neighbour distribution
over a fixed bank of the teacher's embeddings (which of thousands of inputs are its nearest, the
ranking neighbour recall scores). A share of the steps may train on a general
corpus the task provides (Wikipedia sentences for the embedding task) instead, so what the
student learns holds beyond the task's own domain. AdamW (fused) at a constant or
cosine-decayed rate, a step budget and a time budget, deterministic for a seed on a given CPU;
the forwards run under bf16 autocast on CPUs with bf16 instructions (`precision`), float32
elsewhere. At the study's deadline it stops early and keeps what it trained (`resolved`
records the steps done). Placed after the structural passes and before quantization, so the
student trains in float (with `int8_aware`, through the rounding of int8 serving:
passes/int8_rounding.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimformer import cpu
from slimformer.adapters import ModelFacts
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Interval,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
    setting_default,
)
from slimformer.passes.int8_rounding import int8_rounding, weight_code_limit

HELD_OUT_FRACTION = 0.1  # of the training batches, to report the loss before and after
# Intermediate values for a listening study (PassContext.report_value): the held-out loss on
# the first few held-out batches, every so many steps — about 4 % more work at 25 steps and
# 4 batches (a step is a forward of both models and a backward; a report 4 forwards of both).
REPORT_EVERY = 25
REPORT_BATCHES = 4
STOPPED = "at the study's deadline"
STOPPED_BY_OWN_BUDGET = "at its time budget (time_budget_s)"


# The steps and learning rates below were sized on all-MiniLM-L6-v2: 6 blocks of width 384 on
# the movie-review sentences (~27 tokens). A model whose training step costs a fraction of that
# affords proportionally more steps in the same minutes, and a narrower one wants a larger Adam
# learning rate (muP: the hidden matrices' learning rate goes as 1/width). On vit-fashion (4
# blocks of width 64, 197 tokens: a step ~1/5 of MiniLM's; 88.3% on the AMX Xeon) half the
# tokens pruned from the second block and distilled 200 steps at 1e-4 scored 85.1% (an
# exploratory run); 1,600 steps at 3e-4, the options below times 4 and 6 for it, 87.5%
# (bench/results/vit_tokens_openvino.json). Only ever scaled up: larger models keep the options
# they were measured with. Text's token count depends on the data: text keeps the step options.
REFERENCE_WIDTH = 384
REFERENCE_COST = 6 * 27 * (4 * 384**2 + 2 * 384 * 1536 + 2 * 27 * 384)
MAX_SCALE = 8
# The neighbour bank: enough inputs that an input's ten nearest are a sharp choice among many
# (neighbour recall@10 is scored among the held-out sentences), few enough that the teacher
# embeds them in seconds and the [batch, bank] similarities cost little beside a step.
ANCHORS = 2048
PRECISIONS = ("auto", "float32", "bfloat16")


def _example_cost(facts: ModelFacts, tokens: int) -> int:
    """Multiply-adds of one input through the blocks: the projections and the attention."""
    hidden, intermediate = facts.hidden_size, facts.intermediate_size
    per_token = 4 * hidden**2 + 2 * hidden * intermediate + 2 * tokens * hidden
    return facts.num_layers * tokens * per_token


def step_scale(facts: ModelFacts) -> float:
    """How many times the reference's steps this model affords: a power of two, 1 to 8."""
    if facts.tokens_per_example is None:
        return 1.0
    ratio = REFERENCE_COST / _example_cost(facts, facts.tokens_per_example)
    return float(2 ** min(int(math.log2(MAX_SCALE)), max(0, math.floor(math.log2(ratio)))))


def learning_rate_scale(facts: ModelFacts) -> float:
    """The reference width over the model's, 1 to 8."""
    return min(float(MAX_SCALE), max(1.0, REFERENCE_WIDTH / facts.hidden_size))


@dataclass(frozen=True)
class DistillConfig:
    # 0 steps: what a saved recipe records for a distillation the deadline stopped before its
    # first step (`as_applied`), so that replaying it rebuilds the same model.
    steps: int = searchable(
        100,
        Choice(
            (50, 100, 200, 400),
            only=False,
            scale=step_scale,
            scale_label="x step factor",
        ),
        "optimizer steps; the searched options times 2, 4 or 8 for a model whose step costs "
        "under 1/2, 1/4 or 1/8 of all-MiniLM-L6-v2's",
        valid=Interval(0, None),
        recovers="higher",
    )
    lr: float = searchable(
        5e-5,
        Choice(
            (2e-5, 5e-5, 1e-4),
            only=False,
            scale=learning_rate_scale,
            scale_label="x 384/width",
        ),
        "AdamW learning rate; the searched options times 384/width (up to 8) for a model "
        "narrower than all-MiniLM-L6-v2",
    )
    # Cosine: on all-MiniLM-L6-v2 with 2 of 6 blocks removed, at 3e-4 (AMX Xeon, bf16), 1,600
    # steps reached a held-out loss of 0.130 and neighbour recall@10 0.621 (bench/results/
    # embedding_structure_curves_layers2_cosine_amx_xeon.json; 800 steps: 0.144 and 0.606 in
    # an exploratory run), where the constant rate plateaued at 0.157 and 0.585 from 800 to
    # 3,200 steps (embedding_structure_curves_layers2_lr3e-4_bf16_amx_xeon.json). Not the
    # default: recipes saved before it replay with the constant rate they were trained with.
    lr_schedule: str = searchable(
        "constant",
        Choice(("constant", "cosine")),
        "the learning rate over the steps: constant, or decayed to zero along a half cosine",
    )
    decay_steps: int = fixed(
        0,
        "steps the cosine decay spans (0: the steps, or as many as the time left affords); "
        "a saved recipe records the span it trained under, so its replay follows the same rates",
        valid=Interval(0, None),
    )
    hidden_weight: float = searchable(
        0.0, Choice((0.0, 1.0)), "weight of final-hidden-state matching beside the output loss"
    )
    similarity_weight: float = searchable(
        0.0,
        Choice((0.0, 1.0, 10.0)),
        "weight of similarity-matrix matching: the student's cosine similarities between a "
        "batch's pooled inputs against the teacher's",
    )
    general_fraction: float = searchable(
        0.0,
        Choice((0.0, 0.25, 0.5)),
        "share of the steps trained on the task's general corpus (Wikipedia sentences for the "
        "embedding task) instead of its own inputs",
    )
    # Not searched: on all-MiniLM-L6-v2 with 2 of 6 blocks removed (the warm start's other
    # settings, AMD EPYC) it gave neighbour recall@10 0.548 at 400 steps and 0.564 at 800, where
    # the same distillation without it gave 0.572 at 400 (bench/results/embedding_structure_
    # curves_layers2_neighbours.json against embedding_structure_curves.json): no better. A
    # recipe can set it.
    neighbour_weight: float = fixed(
        0.0,
        "weight of neighbour-distribution matching: KL divergence between the teacher's and the "
        "student's softmax of cosine similarities to a bank of the teacher's embeddings of "
        f"{ANCHORS:,} training inputs",
        valid=Interval(0, None),
    )
    neighbour_temperature: float = fixed(
        0.05,
        "softmax temperature of the neighbour distributions: small puts the weight on the "
        "nearest few",
        valid=Interval(1e-3, None),
    )
    # Not searched: on all-MiniLM-L6-v2 with 2 of 6 blocks removed it changed nothing that 200
    # or 400 steps recovered (bench/results/embedding_structure_curves_layers2_layer_matching
    # .json against embedding_structure_curves.json), and a setting that does not pay only
    # thins a short study's trials. Deeper students may differ; a recipe can set it.
    layer_weight: float = fixed(
        0.0,
        "weight of layer-to-layer matching: each block's output against the output of the "
        "original's block it was (after removed blocks, the one it came from)",
        valid=Interval(0, None),
    )
    # Not searched: on all-MiniLM-L6-v2 with 30% of the FFN removed and tokens pooled from
    # block 3, 800 steps (AMX Xeon), the student served by ONNX Runtime int8 kept recall@10
    # 0.579 and fidelity 0.929, against 0.581 and 0.929 trained without it (bench/results/
    # embedding_structure_curves_pooled_int8_aware_amx_xeon.json against
    # embedding_structure_curves_pooled_onnxruntime_amx_xeon.json). A recipe can set it.
    int8_aware: bool = fixed(
        False,
        "train through the rounding of dynamic int8 serving (each Linear's input as uint8 per "
        "batch, its weight as int8 per channel; straight-through gradients), so what the "
        "student recovers survives int8 (passes/int8_rounding.py)",
    )
    precision: str = fixed(
        "auto",
        "the training step's arithmetic: bfloat16 (autocast: the matmuls in bf16; weights, "
        "gradients and optimizer state stay float32) or float32; auto: bfloat16 on CPUs with "
        "bf16 instructions (AVX-512 BF16, AMX), float32 elsewhere and with int8_aware",
        valid=Choice(PRECISIONS),
    )
    temperature: float = fixed(2.0, "softening of teacher and student logits")
    time_budget_s: float = fixed(600.0, "stop training after this many seconds")


def _pooled(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None or mask.shape[1] != hidden.shape[1]:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _final_hidden(output: Any) -> torch.Tensor:
    if getattr(output, "hidden_states", None):
        return output.hidden_states[-1]
    return output.last_hidden_state


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two [batch, batch] cosine-similarity matrices."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def neighbour_loss(
    student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL divergence from the teacher's to the student's distribution over the bank's inputs,
    each a softmax of cosine similarities (the bank is the teacher's, so both rank the same
    points): CompRess/SEED's similarity-distribution distillation, which weighs getting the
    nearest neighbours right above matching every distance."""
    bank = F.normalize(anchors, dim=-1).T
    s, t = F.normalize(student, dim=-1) @ bank, F.normalize(teacher, dim=-1) @ bank
    return F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )


def draw_batch(
    task: list[dict[str, torch.Tensor]],
    general: list[dict[str, torch.Tensor]],
    general_fraction: float,
    order: random.Random,
) -> dict[str, torch.Tensor]:
    """The next training batch: from the general corpus with probability `general_fraction`,
    else from the task's inputs (at 0, the very draws distillation made before it could mix)."""
    if general_fraction > 0 and order.random() < general_fraction:
        return general[order.randrange(len(general))]
    return task[order.randrange(len(task))]


def neighbour_bank(
    teacher: SlimModel,
    train: list[dict[str, torch.Tensor]],
    general: list[dict[str, torch.Tensor]],
    config: DistillConfig,
    seed: int,
) -> torch.Tensor:
    """The teacher's embeddings of about ANCHORS training inputs, drawn as training draws them
    (the general corpus in its share), each batch once: [inputs, hidden]."""
    order = random.Random(seed + 1)
    available = len(train) + (len(general) if config.general_fraction > 0 else 0)
    wants_hidden = teacher.head != "embedding"
    seen: set[int] = set()
    vectors: list[torch.Tensor] = []
    rows = 0
    with torch.no_grad():
        while rows < ANCHORS and len(seen) < available:
            batch = draw_batch(train, general, config.general_fraction, order)
            if id(batch) in seen:
                continue
            seen.add(id(batch))
            output = teacher(**batch, output_hidden_states=wants_hidden)
            vectors.append(_pooled_output(teacher, output, batch))
            rows += len(vectors[-1])
    return torch.cat(vectors)[:ANCHORS]


class RateSchedule:
    """The learning rate's factor at each step (`lr_schedule`). Cosine holds the rate for the
    first `FLAT_STEPS` while the step time is measured, then decays it to zero over the span:
    `decay_steps` when given, else the steps, or fewer when the time left (the pass's own
    budget or the study's deadline) affords fewer, so a distillation the clock stops still
    ends at a low rate instead of being cut off at a high one."""

    FLAT_STEPS = 10
    SAFETY = 0.9  # of the time left: held-out checks and slower steps eat into it

    def __init__(self, config: DistillConfig):
        self.cosine = config.lr_schedule == "cosine"
        self.span = config.decay_steps or config.steps
        self.fixed = bool(config.decay_steps)

    def factor(self, step: int) -> float:
        if not self.cosine or step < self.FLAT_STEPS:
            return 1.0
        done = (step - self.FLAT_STEPS) / max(1, self.span - self.FLAT_STEPS)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    def fit_to_time(self, steps: int, seconds: float, seconds_left: float) -> None:
        """After the flat steps: shorten the span to the steps the time left affords."""
        if not self.cosine or self.fixed or steps != self.FLAT_STEPS:
            return
        affordable = steps + int(self.SAFETY * max(0.0, seconds_left) * steps / seconds)
        self.span = max(steps + 1, min(self.span, affordable))


def training_precision(config: DistillConfig) -> str:
    """The arithmetic the training steps run in: `precision`, with auto resolved for this CPU.
    int8_aware stays float32: it imitates the rounding of float32 inputs."""
    if config.precision != "auto":
        return config.precision
    if config.int8_aware or not cpu.has_native_bf16():
        return "float32"
    return "bfloat16"


@contextlib.contextmanager
def arithmetic(precision: str) -> Iterator[None]:
    """The forwards (and so their backward) in `precision`. In bfloat16, attention uses
    PyTorch's math kernel: the flash kernel's bf16 backward on CPU made the bf16 step slower
    than float32 (an exploratory timing of all-MiniLM-L6-v2 at batch 32 on the AMX Xeon: 15 ms
    a call; a step 339 ms against 309 ms in float32, and 172 ms with the math kernel)."""
    if precision == "float32":
        yield
        return
    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def _in_float32(output: Any) -> Any:
    """A model output with its tensors in float32 (a bf16 forward's logits are bf16), so every
    loss is computed in float32."""
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            output[key] = value.float()
        elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            output[key] = tuple(v.float() for v in value)
    return output


def distillation_loss(
    student: SlimModel,
    teacher: SlimModel,
    batch: dict[str, torch.Tensor],
    config: DistillConfig,
    anchors: torch.Tensor | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """The student's loss on one batch, both models' forwards in `precision`; `anchors` is the
    teacher's neighbour bank, needed when `neighbour_weight` is set."""
    wants_hidden = config.layer_weight > 0 or (
        student.head != "embedding" and _pools_final_hidden(config)
    )
    with torch.no_grad(), arithmetic(precision):
        target = teacher(**batch, output_hidden_states=wants_hidden)
    with arithmetic(precision):
        output = student(**batch, output_hidden_states=wants_hidden)
    if precision != "float32":
        target, output = _in_float32(target), _in_float32(output)
    # One vector per input, pooled once: an encoder's output loss and the neighbourhood
    # terms both use them.
    neighbourhood = config.similarity_weight > 0 or config.neighbour_weight > 0
    pooled = None
    if student.head == "embedding" or neighbourhood:
        pooled = (_pooled_output(student, output, batch), _pooled_output(student, target, batch))
    loss = _output_loss(student, output, target, batch, config, pooled)
    if neighbourhood:
        s_pooled, t_pooled = pooled
        if config.similarity_weight > 0:
            loss = loss + config.similarity_weight * similarity_loss(s_pooled, t_pooled)
        if config.neighbour_weight > 0:
            if anchors is None:
                raise SlimformerError("recover.distill: neighbour_weight needs a neighbour bank")
            loss = loss + config.neighbour_weight * neighbour_loss(
                s_pooled, t_pooled, anchors, config.neighbour_temperature
            )
    if config.layer_weight > 0:
        loss = loss + config.layer_weight * layer_matching_loss(student, output, target)
    return loss


def layer_matching_loss(student: SlimModel, output: Any, target: Any) -> torch.Tensor:
    """Mean over the student's blocks of the squared difference between its output and the
    output of the teacher's block it came from, relative to the teacher's mean square (as the
    final-hidden-state term): a signal at every depth, which a student with blocks removed
    needs to re-learn what the missing ones did. The last block is matched to the teacher's
    last whatever it came from: it makes the model's output (and transformers gives the last
    hidden state after the final norm of a pre-norm model, the others before it)."""
    origins = student.adapter.block_origins()
    states, targets = output.hidden_states, target.hidden_states
    if states is None or len(states) != len(origins) + 1:
        raise SlimformerError("recover.distill: layer_weight needs each block's hidden state")
    pairs = [(index + 1, origin + 1) for index, origin in enumerate(origins[:-1])]
    pairs.append((len(states) - 1, len(targets) - 1))
    terms = []
    for mine, theirs in pairs:
        s, t = states[mine], targets[theirs]
        if s.shape != t.shape:  # reduce.tokens gives its states back at every input position
            raise SlimformerError(
                f"recover.distill: layer_weight cannot match a block's output of shape "
                f"{tuple(s.shape)} to the original's {tuple(t.shape)}; use layer_weight=0"
            )
        terms.append(F.mse_loss(s, t) / t.pow(2).mean())
    return torch.stack(terms).mean()


def _output_loss(
    student: SlimModel,
    output: Any,
    target: Any,
    batch: dict[str, torch.Tensor],
    config: DistillConfig,
    pooled: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The loss on the model's own output; `pooled`: the student's and the teacher's
    embeddings, given for an encoder."""
    if student.head == "embedding":
        s, t = output.last_hidden_state, target.last_hidden_state
        s_pooled, t_pooled = pooled
        loss = (1 - F.cosine_similarity(s_pooled, t_pooled, dim=-1)).mean()
        if config.hidden_weight > 0:
            loss = loss + config.hidden_weight * F.mse_loss(s, t) / t.pow(2).mean()
        return loss
    temp = config.temperature
    s_logits, t_logits = output.logits / temp, target.logits / temp
    kl = F.kl_div(
        F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    mask = batch.get("attention_mask")
    if kl.dim() == 2 and mask is not None and mask.shape == kl.shape:
        kl = (kl * mask).sum() / mask.sum()
    loss = kl.mean() * temp**2
    if config.hidden_weight > 0:
        t_hidden = _final_hidden(target)
        loss = (
            loss
            + config.hidden_weight
            * F.mse_loss(_final_hidden(output), t_hidden)
            / t_hidden.pow(2).mean()
        )
    return loss


def _pools_final_hidden(config: DistillConfig) -> bool:
    """Whether a classifier's or LM's loss needs its final hidden states (an encoder's
    embeddings are its last hidden state)."""
    return config.hidden_weight > 0 or config.similarity_weight > 0 or config.neighbour_weight > 0


def _pooled_output(model: SlimModel, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector per input: the embedding of an encoder, else the mean final hidden state."""
    if model.head == "embedding":
        return _pooled(output.last_hidden_state, batch)
    return _pooled(_final_hidden(output), batch)


@register_pass
class Distill(Pass):
    name = "recover.distill"
    summary = "knowledge distillation from the original model on unlabeled task inputs"
    config_class = DistillConfig
    # bf16 autocast without bf16 instructions is emulated: slower than float32, not faster.
    pays_off_only_with = {"precision=bfloat16": "native_bf16"}
    phase = Phase.RECOVERY
    needs_calibration = True  # its batches stand in when no training batches are given
    needs_training = True
    general_corpus_settings = ("general_fraction",)

    @classmethod
    def calibration_required(cls, config: DistillConfig) -> bool:
        return False  # training batches will do (the runner refuses a run with neither)

    def apply(self, model: SlimModel, config: DistillConfig, ctx: PassContext) -> dict[str, Any]:
        if ctx.teacher is None:
            raise SlimformerError("recover.distill needs the original model as its teacher")
        data = list(ctx.training or ctx.calibration)
        if len(data) < 2:
            raise SlimformerError("recover.distill needs at least two batches of task inputs")
        if ctx.time_left() <= 0:  # the study's deadline came before it could start
            return {"steps": 0, "stopped": STOPPED}
        general = list(ctx.general)
        if config.general_fraction > 0 and not general:
            raise SlimformerError(
                "recover.distill: general_fraction needs a general corpus, and this task "
                "provides none (the embedding task does)"
            )
        precision = training_precision(config)
        if precision == "bfloat16" and config.int8_aware:
            raise SlimformerError(
                "recover.distill: int8_aware trains in float32 (it imitates the int8 rounding "
                "of float32 inputs); set precision=float32 or auto"
            )
        held = max(1, int(len(data) * HELD_OUT_FRACTION))
        train, held_out = data[:-held], data[-held:]
        measuring = time.monotonic()
        anchors = None
        if config.neighbour_weight > 0:
            anchors = neighbour_bank(ctx.teacher, train, general, config, ctx.seed)
        losses = self._held_out_losses(model, ctx.teacher, held_out, config, anchors)
        before = sum(losses) / len(losses)
        held_out_s = time.monotonic() - measuring
        quick = held_out[:REPORT_BATCHES]
        if ctx.report_value is not None:
            ctx.report_value(0, sum(losses[: len(quick)]) / len(quick))
        torch.manual_seed(ctx.seed)
        order = random.Random(ctx.seed)
        parameters = [p for p in model.module.parameters() if p.requires_grad]
        # Fused: one kernel over all parameters instead of a loop of small ops per tensor
        # (a float32 step of the pooled MiniLM student 680 against 740 ms, AMX Xeon:
        # bench/results/distill_speed_amx_xeon.json).
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0, fused=True)
        schedule = RateSchedule(config)
        rates = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        started = time.monotonic()
        steps = 0
        at_deadline = False
        # Eval mode: dropout off, so the same seed gives the same student.
        model.module.eval()
        rounding = int8_rounding(model.module) if config.int8_aware else contextlib.nullcontext()
        with torch.enable_grad(), rounding:
            while steps < config.steps and time.monotonic() - started < config.time_budget_s:
                at_deadline = ctx.time_left() <= 0
                if at_deadline:  # keep what was trained so far
                    break
                batch = draw_batch(train, general, config.general_fraction, order)
                loss = distillation_loss(model, ctx.teacher, batch, config, anchors, precision)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                rates.step()
                steps += 1
                elapsed = time.monotonic() - started
                schedule.fit_to_time(
                    steps, elapsed, min(config.time_budget_s - elapsed, ctx.time_left())
                )
                if steps % 25 == 0:
                    ctx.progress(f"distilling: step {steps}/{config.steps}, loss {loss.item():.4f}")
                if ctx.report_value is not None and steps % REPORT_EVERY == 0:
                    quick_losses = self._held_out_losses(model, ctx.teacher, quick, config, anchors)
                    ctx.report_value(steps, sum(quick_losses) / len(quick_losses))
        optimizer.zero_grad(set_to_none=True)
        # Measured again when there is the time it took the first time: past the deadline, the
        # trained model matters more than a figure about it.
        after: float | None = before
        if steps:
            enough = ctx.time_left() > held_out_s
            if enough:
                after_losses = self._held_out_losses(model, ctx.teacher, held_out, config, anchors)
                after = sum(after_losses) / len(after_losses)
            else:
                after = None
        resolved: dict[str, Any] = {
            "steps": steps,
            "seconds": round(time.monotonic() - started, 1),
            "held_out_loss_before": round(before, 6),
            "held_out_loss_after": None if after is None else round(after, 6),
            "precision": precision,
        }
        if schedule.cosine:
            resolved["decay_steps"] = schedule.span
        if config.int8_aware:
            limit = weight_code_limit()
            resolved["int8_weight_codes"] = f"-{limit}..{limit}"
        if at_deadline:
            resolved["stopped"] = STOPPED
        elif steps < config.steps:
            resolved["stopped"] = STOPPED_BY_OWN_BUDGET
        return resolved

    @classmethod
    def work(cls, config: DistillConfig) -> float:
        return float(config.steps)

    @classmethod
    def as_applied(cls, config: DistillConfig, resolved: dict[str, Any]) -> DistillConfig:
        """A distillation stopped early is recorded with the steps it trained (`resolved`
        keeps the reason), so `slimformer apply` of the saved recipe trains as many; a time
        budget that stopped it is relaxed to the default, or the replay would stop again."""
        if "decay_steps" in resolved:  # the span the rate decayed over (fit to the time)
            config = replace(config, decay_steps=resolved["decay_steps"])
        done = resolved.get("steps", config.steps)
        if done >= config.steps:
            return config
        relaxed = max(config.time_budget_s, setting_default(config, "time_budget_s"))
        return replace(config, steps=done, time_budget_s=relaxed)

    @staticmethod
    def _held_out_losses(
        model: SlimModel,
        teacher: SlimModel,
        batches: list[dict],
        config: DistillConfig,
        anchors: torch.Tensor | None,
    ) -> list[float]:
        """The loss on each held-out batch."""
        with torch.no_grad():
            return [float(distillation_loss(model, teacher, b, config, anchors)) for b in batches]
