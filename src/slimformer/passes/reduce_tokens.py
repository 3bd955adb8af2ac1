"""`reduce.tokens`: fewer tokens in the later blocks of an encoder (BERT family, ViT), with
the fused attention kernel kept — token merging (ToMe), attention-based pruning or pooling.

The mechanics live in `slimformer.tokens` (the checkpoint re-installs them from there when a
saved model loads); this pass turns its settings into one amount per block and installs them.
It runs last among the structural passes: heads, neurons and blocks are scored on every token,
distillation then trains the reduced model, and quantization calibrates on the tokens the model
really sees. Schedules: `constant` reduces the same amount in every block from `start`;
`decreasing` (ToMe's) merges 1.5·r in the first reducing block down to 0.5·r in the last, the
same total, so more goes early where it saves the most. Pooling happens once, in block
`start`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from slimformer.adapters import ModelFacts
from slimformer.engines import ServedModule
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    FloatRange,
    Interval,
    IntRange,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
    setting_default,
)
from slimformer.tokens import (
    ATTENTIONS,
    CRITERIA,
    MODES,
    TokenReduction,
    check_supported,
    install,
    installed,
)

SCHEDULES = ("constant", "decreasing")
# ToMe's r was sized on ViT-B/16 at 224 pixels: 196 patch tokens through 12 blocks (r=13 off the
# shelf merges 156 of them, 80%, by the last block). A model with more patches per block merges
# proportionally more per block for the same share: vit-fashion (196 patches, 4 blocks) 3x, so
# r=13 there is 39, the r that kept it within 0.25 point (bench/results/vit_servings_avx2_epyc
# .json). Only ever scaled up, like distillation's steps: a deeper model keeps the options.
# Text has no fixed token count: the options as declared.
REFERENCE_PATCHES, REFERENCE_BLOCKS = 196, 12


def merge_scale(facts: ModelFacts) -> float:
    """This model's patch tokens per block over ViT-B/16's, at least 1."""
    if facts.tokens_per_example is None:
        return 1.0
    per_block = (facts.tokens_per_example - 1) / facts.num_layers
    return max(1.0, per_block / (REFERENCE_PATCHES / REFERENCE_BLOCKS))


UNPADDED_REFUSAL = (
    "padding-free batching runs the blocks its own way and would skip the token reduction; "
    "use runtime.batching mode=bucketed"
)


@dataclass(frozen=True)
class TokenConfig:
    mode: str = searchable(
        "merge",
        Choice(MODES),
        "merge: average the most similar tokens (ToMe); prune: drop the tokens that receive "
        "the least attention; pool: average fixed squares of patches (neighbours in text), "
        "then train",
    )
    r: int = searchable(
        2,
        Choice((1, 2, 4, 8, 16), only=False, scale=merge_scale, scale_label="x patches/block"),
        "merge: tokens merged per reducing block (ToMe's r; at most half of them per block); "
        "the searched options times the model's patch tokens per block over ViT-B/16's (16.3)",
        valid=Interval(0, None),
        when=("mode", ("merge",)),
    )
    schedule: str = searchable(
        "constant",
        Choice(SCHEDULES),
        "merge: r in every reducing block, or decreasing from 1.5·r to 0.5·r",
        when=("mode", ("merge",)),
    )
    keep: float = searchable(
        0.8,
        FloatRange(0.5, 0.95, step=0.05),
        "prune: fraction of the real tokens each reducing block keeps (besides the class token)",
        valid=Interval(0, 1, open_low=True),
        when=("mode", ("prune",)),
    )
    criterion: str = searchable(
        "cls",
        Choice(CRITERIA),
        "prune: a token's score is the attention the class token pays it (cls) or the mean "
        "attention it receives (mean)",
        when=("mode", ("prune",)),
    )
    window: int = searchable(
        2,
        Choice((2, 3)),
        "pool: side of the square of patches (run of tokens in text) that becomes one token",
        valid=Interval(2, None),
        when=("mode", ("pool",)),
    )
    start: int = searchable(
        0,
        IntRange(0, lambda facts: facts.num_layers - 1, label="0..layers-1"),
        "first block that reduces (the ones before it see every token)",
    )
    attention: str = fixed(
        "sdpa",
        "sdpa: the fused attention kernel with the log-size bias as its mask; eager: the "
        "explicit softmax ToMe's own code computes (same outputs, slower; for comparisons)",
        valid=Choice(ATTENTIONS),
    )


# The settings only one mode reads (the others are left at their defaults in a recipe).
MODE_SETTINGS = {"merge": ("r", "schedule"), "prune": ("keep", "criterion"), "pool": ("window",)}


def per_block(config: TokenConfig, layers: int) -> tuple[float, ...]:
    """The amount each block reduces: tokens merged (merge) or fraction kept (prune). `start`
    past the last block (blocks were dropped earlier in the recipe) reduces in the last one."""
    start = min(config.start, layers - 1)
    reducing = layers - start
    if config.mode == "prune":
        return (1.0,) * start + (config.keep,) * reducing
    if config.mode == "pool":
        return (1,) * start + (config.window,) + (1,) * (reducing - 1)
    if config.schedule == "constant" or reducing == 1:
        amounts = [config.r] * reducing
    else:
        amounts = [int(config.r * (1.5 - i / (reducing - 1)) + 0.5) for i in range(reducing)]
    return (0,) * start + tuple(amounts)


@register_pass
class TokenReductionPass(Pass):
    name = "reduce.tokens"
    summary = "merge (ToMe) or prune tokens block by block in encoders, fused attention kept"
    config_class = TokenConfig
    phase = Phase.STRUCTURE
    order = 9  # after every pass that scores or factorizes weights on all tokens
    conflicts = {"runtime.batching:mode=unpadded": UNPADDED_REFUSAL}

    @classmethod
    def normalize(cls, config: TokenConfig) -> TokenConfig:
        used = MODE_SETTINGS[config.mode]
        unused = [name for names in MODE_SETTINGS.values() for name in names if name not in used]
        return replace(config, **{name: setting_default(config, name) for name in unused})

    @classmethod
    def applies_to(cls, model: SlimModel) -> bool:
        if isinstance(model.module, ServedModule) or installed(model.module) is not None:
            return False
        try:
            check_supported(model.module)
        except SlimformerError:
            return False
        return True

    def apply(self, model: SlimModel, config: TokenConfig, ctx: PassContext) -> dict[str, Any]:
        if isinstance(model.module, ServedModule):
            raise SlimformerError(
                f"{self.name}: the model already runs in {model.module.runtime}; reduce "
                "tokens before choosing a runtime"
            )
        if installed(model.module) is not None:
            raise SlimformerError(f"{self.name}: this model already reduces its tokens")
        layers = check_supported(model.module).num_layers
        reduction = TokenReduction(
            mode=config.mode,
            amounts=per_block(config, layers),
            criterion=config.criterion,
            attention=config.attention,
        )
        install(model.module, reduction)
        return {"per_block": list(reduction.amounts)}
