"""Warm start: the known-good recipes a new study measures first, right after the baseline.

A sampler with a handful of trials spends them on random deep stacks; a short study then ends
behind what one engine's int8 alone gives in a minute (issue 15: 1.4x after 20 minutes, where
ONNX Runtime int8 alone gives about 3x). So a new study first measures each engine's int8
alone (and, for tasks where one was measured, a structured recipe), then the user's `--start`
recipes, then lets the sampler explore. A recipe is measured only when the study searches all
its passes; a setting this CPU would not profit from (`Withheld`: OpenVINO's NNCF int8 without
VNNI) is left at the pass's default instead. A setting whose options scale with the model
(distillation's steps and learning rate, `Choice.scale`) is written as for the reference model
its options were measured on, and scaled like them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimformer.errors import SlimformerError
from slimformer.passes import Choice, Pass, get_pass
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import Withheld
from slimformer.tasks import TaskSpec

KnownStep = tuple[str, dict[str, Any]]  # (pass, config)
# A recipe's step, or its alternatives: the first whose pass is searched and whose settings this
# CPU profits from, else the first searched one with the settings it withholds left out, or,
# where the alternatives end with OTHERWISE_LEFT_OUT, no recipe at all.
KnownGood = tuple[tuple[KnownStep | tuple[KnownStep, ...], ...], ...]
OTHERWISE_LEFT_OUT: KnownStep = ("", {})

# Each engine's int8 alone, the engines that usually pay off most on CPUs first.
ENGINES_INT8: KnownGood = (
    (("runtime.openvino", {"int8": "nncf"}),),
    (("runtime.onnxruntime", {"int8": "dynamic"}),),
    (("quantize.dynamic_int8", {}),),
)
# A sentence encoder's first structured recipe: 30% of the FFN neurons removed, 200 distillation
# steps that mix in the general corpus and match hidden states and similarities, then int8. On
# all-MiniLM-L6-v2 (Zen 4, 2 cores) it served 1.25x OpenVINO int8 alone's throughput and kept
# the probe within a point on both domains (-0.05 / +0.8 pt, recall@10 0.70), where halving FFN
# and heads lost 2 points on the transfer domain however long it was distilled
# (bench/results/embedding_transfer_candidates_short.json, _studies_peers_guarded.json). One
# trial (~5-10 minutes on 2 cores) that a short study's sampler would seldom draw.
# Its int8 is OpenVINO's NNCF where the CPU has VNNI, else ONNX Runtime's dynamic int8: on an
# AVX2-only EPYC OpenVINO (NNCF withheld, f32) served this recipe at 288/s, behind ONNX Runtime
# int8 alone at 336/s (bench/results/search_efficiency.json, trials 2 and 4).
FFN_TRIMMED_AND_DISTILLED: KnownGood = (
    (
        ("prune.ffn", {"keep": 0.7}),
        (
            "recover.distill",
            {
                "steps": 200,
                "lr": 1e-4,
                "general_fraction": 0.5,
                "similarity_weight": 1.0,
                "hidden_weight": 1.0,
            },
        ),
        (("runtime.openvino", {"int8": "nncf"}), ("runtime.onnxruntime", {"int8": "dynamic"})),
    ),
)
# An image classifier's first structured recipe: 75% of the FFN neurons removed and each 2x2
# square of patches pooled into one token in the second block (token pooling: a fixed merge,
# no matching to pay for; the blocks after see a quarter of the tokens), distilled 200 steps at
# 5e-5 matching similarities (scaled: 800 at 3e-4 on vit-fashion), then int8 (without VNNI,
# OpenVINO f32). On an AVX2-only EPYC, served by OpenVINO f32, with 65% of the neurons removed:
# 1.98x ToMe's own eager merging at 0.50 point, where the FFN cut + ToMe below read 1.57x at
# 0.10 point (bench/results/vit_pooling_avx2_epyc.json, `make bench-vit-pooling`; readings span
# a third on that machine), and half the tokens pruned, this entry's predecessor, lost 1.25-1.5
# points there. A study choosing that recipe measured 1.92x the best peer (ONNX Runtime int8)
# at 0.50 point (bench/results/peers_vision_avx2_epyc_pooled_warm_start.json); the same
# distillation after removing 75% of the neurons scored 0.35 point down and read 2.26x ONNX
# Runtime int8 (2.36x ToMe eager) against 2.14x for 65% removed, timed side by side
# (bench/results/vit_pooling_ffn_cut_avx2_epyc.json), so the entry removes 75%. Studies starting
# from it chose this model served by ONNX Runtime int8, 2.18x the best peer (ToMe eager) at 0.55
# point over five readings (bench/results/peers_vision_avx2_epyc_five_rounds.json), and served
# by OpenVINO int8 weights, 1.44x over three (..._pooled_ffn25_warm_start.json): readings spread.
# Pooling in the first block read 2.06x / 2.23x but lost 2.2 / 1.35 points after 800 / 3,200
# steps. `start` is the block index as measured on vit-fashion's 4 blocks, not scaled: a deeper
# ViT may want it later (the study searches it).
FFN_TRIMMED_POOLED_DISTILLED: KnownGood = (
    (
        ("prune.ffn", {"keep": 0.25, "criterion": "activation", "allocation": "global"}),
        ("reduce.tokens", {"mode": "pool", "window": 2, "start": 1}),
        (
            "recover.distill",
            {"steps": 200, "lr": 5e-5, "similarity_weight": 10.0, "hidden_weight": 0.0},
        ),
        (
            ("runtime.openvino", {"int8": "nncf"}),
            ("runtime.openvino", {}),
            ("runtime.onnxruntime", {"int8": "dynamic"}),
        ),
    ),
)
# An image classifier's recipe that keeps every block and most tokens' information: 65% of the
# FFN neurons removed and ToMe's off-the-shelf merging (r=13 on ViT-B/16, scaled to the model's
# patches per block: 39 on vit-fashion), distilled 200 steps at 5e-5 (scaled: 800 at 3e-4 on
# vit-fashion) matching similarities, then int8 (without VNNI, OpenVINO f32). On an AVX2-only
# EPYC the FFN cut distilled, then merged and served by OpenVINO f32 read 1.34-1.90x ToMe's
# own eager merging (the best peer there) at -0.10 point; token pruning distilled with the FFN
# cut lost 0.75 point (bench/results/vit_servings_avx2_epyc.json).
FFN_TRIMMED_MERGED_DISTILLED: KnownGood = (
    (
        ("prune.ffn", {"keep": 0.35, "criterion": "activation", "allocation": "global"}),
        ("reduce.tokens", {"mode": "merge", "r": 13, "schedule": "constant", "start": 0}),
        (
            "recover.distill",
            {"steps": 200, "lr": 5e-5, "similarity_weight": 10.0, "hidden_weight": 0.0},
        ),
        (
            ("runtime.openvino", {"int8": "nncf"}),
            ("runtime.openvino", {}),
            ("runtime.onnxruntime", {"int8": "dynamic"}),
        ),
    ),
)
# A sentence encoder's deeper cut, where bf16 training makes its distillation fit a short study:
# 2 of 6 blocks removed, 1,600 steps decaying the rate along a cosine, then OpenVINO int8 with
# snippets off (ONNX Runtime int8 where OpenVINO's NNCF is withheld). On all-MiniLM-L6-v2 (AMX
# Xeon, 2 cores, 8.6 minutes of bf16 training) it kept the probe within 0.8 / 0.7 point on the
# scored / transfer domain and 0.617 of each sentence's ten nearest neighbours, at 1.68x
# OpenVINO int8 alone's throughput (bench/results/embedding_structure_curves_layers2_cosine_
# amx_xeon.json, embedding_structure_speed_one_layer_amx_xeon.json); the default guarded study
# there chose it: +0.65 / +0.70 pt, recall@10 0.618, 1.80x the best peer (bench/results/
# embedding_transfer_studies_peers_guarded_amx_xeon.json). Distilled at a constant rate it
# stays at 0.58 however long it trains; in float32 (CPUs without bf16) the steps take about
# twice as long, more than a 20-minute study has, so it is left out there.
BLOCKS_REMOVED_AND_DISTILLED: KnownGood = (
    (
        ("prune.layers", {"count": 2}),
        (
            (
                "recover.distill",
                {
                    "steps": 1600,
                    "lr": 3e-4,
                    "lr_schedule": "cosine",
                    "general_fraction": 0.5,
                    "similarity_weight": 1.0,
                    "hidden_weight": 1.0,
                    # What `auto` gives where it is offered; named so that a CPU without
                    # bf16 (where it is withheld) leaves the recipe out.
                    "precision": "bfloat16",
                },
            ),
            OTHERWISE_LEFT_OUT,
        ),
        (
            ("runtime.openvino", {"int8": "nncf", "snippets": False}),
            ("runtime.onnxruntime", {"int8": "dynamic"}),
        ),
    ),
)
KNOWN_GOOD: KnownGood = ENGINES_INT8
# Decoders are judged by batch-1 decoding, which reads every weight per token: int8 *weights*
# (activations kept f32) quarter the bytes at +0.1% perplexity on SmolLM2, where PyTorch's
# dynamic int8 (activations too) costs +200% (bench/results/openvino_decoder.json and
# quantization_smollm2.json); llama.cpp's Q8_0 decoded 2.8x its F32 at +0.4% perplexity
# (bench/results/llamacpp_decoder.json). llama.cpp's Q4_K_M reads fewer bytes still: the fastest
# peer within a 5% perplexity budget in bench/results/peers_decoder.json (+4.3% there, 1.07x
# Q8_0's decode), so a decoder study measures it too, with an importance matrix from the task.
KNOWN_GOOD_BY_TASK: dict[str, KnownGood] = {
    "perplexity": (
        (("runtime.llamacpp", {"quant": "Q8_0"}),),
        (("runtime.llamacpp", {"quant": "Q4_K_M", "imatrix": True}),),
        (("runtime.openvino", {"weights": "int8_asym"}),),
    ),
    "embedding": ENGINES_INT8 + FFN_TRIMMED_AND_DISTILLED + BLOCKS_REMOVED_AND_DISTILLED,
    "image-classification": ENGINES_INT8
    + FFN_TRIMMED_POOLED_DISTILLED
    + FFN_TRIMMED_MERGED_DISTILLED,
}


def _is_alternatives(entry: KnownStep | tuple[KnownStep, ...]) -> bool:
    return not isinstance(entry[0], str)


def _pick_step(
    entry: KnownStep | tuple[KnownStep, ...], offered: set[str], withheld: Withheld
) -> Step | None:
    """The entry's step as this study can run it (see KnownGood), or None when it cannot."""
    options = entry if _is_alternatives(entry) else (entry,)
    searched = [
        (name, config)
        for name, config in options
        if name in offered and ("", "") not in withheld.get(name, ())
    ]
    for name, config in searched:
        if not any((key, str(value)) in withheld.get(name, ()) for key, value in config.items()):
            return Step(name, dict(config))
    if not searched or options[-1] == OTHERWISE_LEFT_OUT:
        return None
    name, config = searched[0]
    gaps = withheld.get(name, ())
    return Step(
        name, {key: value for key, value in config.items() if (key, str(value)) not in gaps}
    )


def _scaled_for(step: Step, facts: Any) -> Step:
    """`step` with each value of a setting whose options scale with the model scaled like them
    (an option becomes the option in its place)."""
    space = get_pass(step.pass_name).search_space()
    config = dict(step.config)
    for key, value in step.config.items():
        choice = space.get(key)
        if isinstance(choice, Choice):
            config[key] = choice.scaled_value(value, facts)
    return Step(step.pass_name, config)


def warm_start_recipes(
    pass_classes: Sequence[type[Pass]],
    withheld: Withheld,
    task: TaskSpec,
    seed: int,
    facts: Any = None,
) -> list[Recipe]:
    """The portfolio for this study: the known-good recipes for its task whose passes the study
    all offers, each setting this CPU withholds left at its pass's default (or swapped for the
    recipe's alternative step, where it names one), settings that scale with the model scaled
    for the model of `facts`."""
    offered = {cls.name for cls in pass_classes}
    recipes = []
    for known in KNOWN_GOOD_BY_TASK.get(task.name, KNOWN_GOOD):
        steps = [_pick_step(entry, offered, withheld) for entry in known]
        if all(step is not None for step in steps):
            scaled = tuple(_scaled_for(step, facts) for step in steps)
            if facts is None or all(_fits(step, facts) for step in scaled):
                recipes.append(Recipe(steps=scaled, task=task, seed=seed))
    return recipes


def _fits(step: Step, facts: Any) -> bool:
    """Whether the model can take the step's settings (2 blocks cannot go from a 2-block
    model): a known-good recipe it cannot take is left out rather than measured as a failure."""
    pass_class = get_pass(step.pass_name)
    try:
        pass_class.check_for_model(pass_class.make_config(step.config), facts)
    except SlimformerError:
        return False
    return True
