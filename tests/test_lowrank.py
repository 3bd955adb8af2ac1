"""factorize.lowrank: the factorization math, rank allocation, the measured dense-keep decision,
and the LowRankLinear layer through save/reload, ONNX export, FLOPs, pruning and int8."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from torch import nn

from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.layers import (
    DynamicInt8Linear,
    LowRankLinear,
    StaticInt8Linear,
    codec_for,
    count_parameters,
)
from slimformer.measure import count_flops
from slimformer.passes import get_pass, lowrank_timing
from slimformer.passes.layer_selection import select_layers
from slimformer.passes.lowrank_allocation import (
    DENSE,
    Matrix,
    allocate_global,
    removed_fraction,
    uniform_rank,
)
from slimformer.passes.lowrank_svd import (
    Weighting,
    damped_cholesky,
    factorize,
    fisher_weightings,
    spectrum,
)
from slimformer.passes.lowrank_timing import GemmTimer, largest_true
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")

# Tiny matrices are never faster as a pair; the quality and plumbing tests switch the check off.
UNTIMED = {"speed_check": False, "multiple": 8}


@pytest.fixture(autouse=True)
def gemm_cache(tmp_path, monkeypatch):
    """Each test times into its own cache file, not the user's."""
    monkeypatch.setattr(lowrank_timing, "cache_dir", lambda: tmp_path)
    return tmp_path / lowrank_timing.CACHE_FILE


def run(model, *steps, calibration=None):
    recipe = Recipe(steps=tuple(Step(n, c) for n, c in steps))
    batches = tiny.calibration(model) if calibration is None else calibration
    return apply_recipe(model, recipe, batches, training=batches)


def resolved(model, index=-1):
    return model.recipe.steps[index].resolved


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated: a random basis with a decaying spectrum,
    as transformer hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
    scales = torch.logspace(0, -3, features)
    return torch.randn(tokens, features, generator=generator) * scales @ basis.T


def output_error(weight, up, down, x) -> float:
    return float((x @ (weight - up @ down).T).pow(2).sum())


# --- the math ------------------------------------------------------------------------------
def weightings(weight: torch.Tensor) -> dict[str, Weighting]:
    generator = torch.Generator().manual_seed(1)
    in_features = weight.shape[1]
    x = correlated_inputs(4 * in_features, in_features)
    factor, _ = damped_cholesky(x.double().T @ x.double())
    return {
        "svd": Weighting(),
        "asvd": Weighting(in_factor=torch.rand(in_features, generator=generator).double() + 0.1),
        "whiten": Weighting(in_factor=factor),
        "fisher": Weighting(in_factor=torch.rand(in_features, generator=generator).double() + 1.0),
    }


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten", "fisher"])
def test_full_rank_factorization_reproduces_the_layer(method):
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    up, down = factorize(linear.weight, weightings(linear.weight)[method], 32)
    layer = LowRankLinear.from_factors(up, down, linear.bias.detach())
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_whitening_truncation_error_is_at_most_a_quarter_of_plain_svds_on_correlated_inputs():
    # Measured here: 0.21 of plain SVD's output error at rank 8, 0.049 at 16, 0.003 at 32.
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    x = correlated_inputs(1024, 64)
    factor, damping = damped_cholesky(x.double().T @ x.double())
    assert damping == 0.0
    whitened = Weighting(in_factor=factor)
    for rank in (8, 16, 32):
        plain = output_error(weight, *factorize(weight, Weighting(), rank), x)
        white = output_error(weight, *factorize(weight, whitened, rank), x)
        assert white <= 0.25 * plain
        # SVD-LLM's property: the discarded singular values are exactly the output error.
        lost = float(spectrum(weight, whitened)[rank:].sum())
        assert white == pytest.approx(lost, rel=1e-3)


def test_rank_deficient_calibration_is_damped_and_stays_finite():
    torch.manual_seed(0)
    x = correlated_inputs(8, 64)  # 8 tokens cannot span 64 input features
    factor, damping = damped_cholesky(x.double().T @ x.double())
    assert damping > 0
    up, down = factorize(torch.randn(32, 64), Weighting(in_factor=factor), 16)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


def test_a_gram_matrix_with_nan_is_refused_in_one_line():
    gram = torch.eye(4, dtype=torch.float64)
    gram[0, 0] = float("nan")
    with pytest.raises(SlimformerError, match="inf or NaN"):
        damped_cholesky(gram)


# --- allocation ----------------------------------------------------------------------------
def test_global_allocation_meets_the_budget_and_cuts_fast_decaying_spectra_deeper():
    ranks = tuple(range(8, 64, 8))
    fast = Matrix("fast", 128, 128, torch.logspace(0, -6, 128).double(), ranks)
    flat = Matrix("flat", 128, 128, torch.ones(128).double(), ranks)
    chosen = allocate_global([fast, flat], 0.4)
    # Rank 8 of the fast-decaying matrix alone removes 43.75%; factorizing the flat one at
    # any rank would lose far more of its spectrum.
    assert chosen == {"fast": 8, "flat": DENSE}
    assert removed_fraction([fast, flat], chosen) == pytest.approx(0.4375)


def test_uniform_allocation_keeps_each_matrix_at_the_same_fraction_rounded_to_the_multiple():
    # 0.6·384·384/768 = 115.2 -> 112; 0.6·1536·384/1920 = 184.3 -> 192; 0.9·32·32/64 -> 16
    assert uniform_rank(384, 384, 0.4, 16) == 112
    assert uniform_rank(1536, 384, 0.4, 16) == 192
    assert uniform_rank(32, 32, 0.1, 8) == 16


def test_bisection_finds_the_largest_rank_that_pays_off():
    assert largest_true([16, 32, 48, 64], lambda r: r <= 32) == 32
    assert largest_true([16, 32], lambda r: False) == 0
    assert largest_true([16, 32], lambda r: True) == 32


# --- the measured decision -----------------------------------------------------------------
def test_a_much_cheaper_pair_is_measured_faster_and_cached(gemm_cache, monkeypatch):
    timer = GemmTimer([256])
    assert timer.pays_off(1024, 1024, 16)  # 3% of the dense FLOPs
    timer.save()
    entries = json.loads(gemm_cache.read_text())["timings_ms"]
    assert any("1024x1024|rank=16|rows=256" in key for key in entries)

    def no_timing(*args):
        raise AssertionError("timed again instead of reading the cache")

    monkeypatch.setattr(lowrank_timing, "_measure", no_timing)
    assert GemmTimer([256]).pays_off(1024, 1024, 16)


def test_a_matrix_whose_pair_is_not_faster_stays_dense_with_its_measured_times(gemm_cache):
    model = tiny.build("bert")
    factorized = run(model, ("factorize.lowrank", {"method": "svd", "multiple": 8}))
    result = resolved(factorized)
    # Hidden size 32: a pair of GEMMs this small costs two calls for the FLOPs of one.
    assert result["factorized"] == 0
    name = "encoder.layer.0.intermediate.dense"  # 64×32 at rank 16: 1536 of 2048 weights
    assert "not faster here" in result["kept_dense"][name]
    assert " ms vs " in result["kept_dense"][name]
    timing = result["timing"]
    assert timing["engine"] == "torch-fp32" and timing["rows"]
    pair_ms, dense_ms = next(iter(next(iter(timing["pair_vs_dense_ms"].values())).values()))
    assert pair_ms > 0.95 * dense_ms
    assert not any(isinstance(m, LowRankLinear) for m in factorized.module.modules())
    assert gemm_cache.is_file()


# --- the pass on every family --------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("method", ["svd", "asvd", "whiten", "fisher"])
def test_every_method_factorizes_every_family_within_the_budget(family, method):
    model = tiny.build(family)
    factorized = run(model, ("factorize.lowrank", {"method": method, "budget": 0.3, **UNTIMED}))
    result = resolved(factorized)
    assert result["factorized"] > 0
    assert result["removed_fraction"] >= 0.3
    layers = [m for m in factorized.module.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == result["factorized"]
    assert all(layer.rank % 8 == 0 for layer in layers)
    batch = tiny.calibration(model)[0]
    output = tiny.output(factorized, batch)
    assert torch.isfinite(output).all()
    cosine = nn.functional.cosine_similarity(
        output.flatten(), tiny.output(model, batch).flatten(), dim=0
    )
    assert cosine > 0.8


def test_whitening_keeps_the_output_closer_than_plain_svd_on_a_tiny_llama():
    model = tiny.build("llama")
    batch = tiny.calibration(model)[1]
    reference = tiny.output(model, batch)
    errors = {}
    for method in ("svd", "whiten"):
        config = {"method": method, "budget": 0.4, "allocation": "uniform", **UNTIMED}
        output = tiny.output(run(model, ("factorize.lowrank", config)), batch)
        errors[method] = float((output - reference).pow(2).mean())
    assert errors["whiten"] < errors["svd"]


def test_svd_without_the_speed_check_needs_no_calibration():
    model = tiny.build("bert")
    factorized = run(model, ("factorize.lowrank", {"method": "svd", **UNTIMED}), calibration=())
    assert resolved(factorized)["factorized"] > 0


def test_scope_and_skip_choose_the_matrices():
    model = tiny.build("llama")
    config = {"scope": "ffn", "skip": ["model.layers.0"], "rank": 8, **UNTIMED}
    result = resolved(run(model, ("factorize.lowrank", config)))
    assert all(".mlp." in name for name in result["ranks"])
    assert not any(name.startswith("model.layers.0.") for name in result["ranks"])
    assert result["kept_dense"]["model.layers.0.mlp.up_proj"] == "in skip list"


def test_rank_deficient_calibration_damps_the_whitening_and_gives_a_finite_model():
    model = tiny.build("bert")
    batch = {k: v[:1, :4] for k, v in tiny.calibration(model)[0].items()}  # 4 tokens, 32 features
    factorized = run(
        model, ("factorize.lowrank", {"method": "whiten", **UNTIMED}), calibration=[batch]
    )
    result = resolved(factorized)
    assert result["damped"] and all(d > 0 for d in result["damped"].values())
    assert torch.isfinite(tiny.output(factorized, tiny.calibration(model)[1])).all()


# --- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 0.0, 1, 1.0, 1.5, -0.2])
def test_a_budget_of_nothing_or_everything_is_refused_in_one_line(budget):
    with pytest.raises(SlimformerError) as error:
        get_pass("factorize.lowrank").make_config({"budget": budget})
    assert "budget" in str(error.value) and "\n" not in str(error.value)


def test_a_rank_larger_than_the_matrix_is_refused_with_its_name():
    model = tiny.build("bert")
    with pytest.raises(SlimformerError, match=r"rank 64 is larger than .*query \(32×32"):
        run(model, ("factorize.lowrank", {"rank": 64, **UNTIMED}))


def test_a_rank_that_saves_nothing_keeps_the_matrix_dense_with_the_reason():
    model = tiny.build("bert")
    # Rank 16 of a 32×32 matrix holds 16·64 = 1024 weights, as many as the matrix; of a
    # 64×32 one 16·96 = 1536 of 2048.
    result = resolved(run(model, ("factorize.lowrank", {"rank": 16, **UNTIMED})))
    assert result["kept_dense"]["encoder.layer.0.attention.self.query"] == (
        "rank 16 would not hold fewer weights"
    )
    assert result["ranks"]["encoder.layer.0.intermediate.dense"]["rank"] == 16


def test_a_fixed_rank_makes_budget_and_allocation_irrelevant():
    config = get_pass("factorize.lowrank").make_config(
        {"rank": 16, "budget": 0.4, "allocation": "global"}
    )
    assert config.budget == 0.2 and config.allocation == "uniform"


# --- the layer: save, reload, export, FLOPs ------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_save_and_reload_is_bit_identical(family, tmp_path):
    model = tiny.build(family)
    factorized = run(model, ("factorize.lowrank", {"method": "whiten", **UNTIMED}))
    save_model(factorized, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "slimformer.json").read_text())
    assert {m["kind"] for m in meta["modules"].values()} == {"lowrank_linear"}
    loaded = load_model(tmp_path / "m")
    batch = tiny.calibration(model)[1]
    assert torch.equal(tiny.output(loaded, batch), tiny.output(factorized, batch))
    ranks = {n: m.rank for n, m in loaded.module.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: r["rank"] for n, r in resolved(factorized)["ranks"].items()}


def test_parameters_and_flops_count_the_two_factors():
    model = tiny.build("llama")
    factorized = run(model, ("factorize.lowrank", {"rank": 8, "scope": "ffn", **UNTIMED}))
    example = [101, 2023, 2003, 1037, 3231, 102]
    # Each FFN matrix is 64×32: dense 2048 weights, rank 8 holds 8·96 = 768.
    saved = 3 * tiny.NUM_LAYERS * (2048 - 768)
    assert count_parameters(factorized.module) == count_parameters(model.module) - saved
    assert count_flops(factorized, example) == count_flops(model, example) - 2 * 6 * saved


def test_onnx_export_of_the_factors_matches_eager():
    model = tiny.build("bert")
    factorized = run(model, ("factorize.lowrank", {"method": "whiten", **UNTIMED}))
    served = run(factorized, ("runtime.onnxruntime", {}))
    batch = tiny.calibration(model)[1]
    mask = batch["attention_mask"].bool()
    difference = (tiny.output(served, batch) - tiny.output(factorized, batch))[mask]
    assert float(difference.abs().max()) < 1e-4
    assert served.recipe.steps[-1].resolved["ops"]["MatMul"] > 0


def test_openvino_serves_the_factors():
    model = tiny.build("bert")
    factorized = run(model, ("factorize.lowrank", {"method": "svd", **UNTIMED}))
    served = run(factorized, ("runtime.openvino", {}))
    batch = tiny.calibration(model)[1]
    mask = batch["attention_mask"].bool()
    difference = (tiny.output(served, batch) - tiny.output(factorized, batch))[mask]
    assert float(difference.abs().max()) < 1e-3


# --- composition ---------------------------------------------------------------------------
def test_quantizers_are_offered_the_two_factors_as_linears():
    model = run(tiny.build("bert"), ("factorize.lowrank", {"rank": 8, **UNTIMED}))
    names = select_layers(model, "ffn").names()
    assert "encoder.layer.0.intermediate.dense.down" in names
    assert "encoder.layer.0.intermediate.dense.up" in names


@pytest.mark.parametrize(
    ("quantizer", "layer_type"),
    [("quantize.dynamic_int8", DynamicInt8Linear), ("quantize.static_int8", StaticInt8Linear)],
)
def test_pruning_then_factorization_then_int8_saves_and_reloads_bit_identical(
    quantizer, layer_type, tmp_path
):
    model = tiny.build("bert")
    steps = (
        ("prune.ffn", {"keep": 0.75, "multiple": 8}),
        ("factorize.lowrank", {"method": "whiten", "budget": 0.3, **UNTIMED}),
        (quantizer, {}),
    )
    composed = run(model, *steps)
    lowrank = [m for m in composed.module.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(isinstance(m.down, layer_type) for m in lowrank)
    assert all(isinstance(m.up, layer_type) for m in lowrank)
    save_model(composed, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    batch = tiny.calibration(model)[1]
    assert torch.equal(tiny.output(loaded, batch), tiny.output(composed, batch))
    example = [101, 2023, 2003, 1037, 3231, 102]
    float_factors = run(model, *steps[:2])
    assert count_flops(composed, example) == count_flops(float_factors, example)


def test_distillation_trains_the_factors():
    model = tiny.build("bert")
    factorize = ("factorize.lowrank", {"method": "svd", "budget": 0.4, **UNTIMED})
    factorized = run(model, factorize)
    name = next(iter(resolved(factorized)["ranks"]))
    before = factorized.module.get_submodule(name).down.weight
    distilled = run(model, factorize, ("recover.distill", {"steps": 3, "lr": 1e-3}))
    after = distilled.module.get_submodule(name)
    assert isinstance(after, LowRankLinear) and codec_for(after) is not None
    assert not torch.equal(after.down.weight, before)


def test_fisher_weights_the_input_channels_as_fwsvd_sums_its_rows():
    # FWSVD sums each row of its (in, out) weight: a column of torch's (out, in) one. Weighting
    # the output rows instead measured worse than plain SVD on SmolLM2 (README).
    model = tiny.build("llama")
    name, layer = next(
        (n, m)
        for n, m in model.module.named_modules()
        if isinstance(m, nn.Linear) and n.endswith("mlp.down_proj")
    )
    assert layer.in_features != layer.out_features  # so the two sides cannot be confused
    weighting = fisher_weightings(model, {name: layer}, tiny.calibration(model)[:1])[name]
    assert weighting.in_factor is not None and weighting.in_factor.shape == (layer.in_features,)
    assert float(weighting.in_factor.min()) > 0 and torch.isfinite(weighting.in_factor).all()
