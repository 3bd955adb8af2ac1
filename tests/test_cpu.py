"""The CPU fingerprint, and a search that follows the CPU it runs on."""

from __future__ import annotations

import optuna
import pytest

from slimformer.cpu import (
    CpuFingerprint,
    effective_instruction_sets,
    fingerprint,
    has_native_bf16,
    has_vnni,
    native_instruction_sets,
)
from slimformer.passes import get_pass
from slimformer.search.settings import StudySettings, split_pass_names
from slimformer.search.space import sample_recipe
from slimformer.tasks import TaskSpec

ZEN4 = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")


def cpu(isa: tuple[str, ...]) -> CpuFingerprint:
    return CpuFingerprint(model="Test CPU", isa=isa, native_isa=isa, cores=2, threads=2)


def test_native_sets_come_from_the_cpu_flags_and_need_all_three_amx_parts():
    flags = {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "sse4_2"}
    assert native_instruction_sets(flags) == ("avx2", "avx512f", "avx512_vnni", "amx")
    assert native_instruction_sets({"avx2", "amx_tile"}) == ("avx2",)


@pytest.mark.parametrize(
    ("forced", "kept"),
    [
        ({}, ZEN4),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ("avx2",)),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, ("avx2", "avx512_vnni", "avx512_bf16")),
        ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, ("avx2",)),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, ("avx2", "avx512f")),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, ("avx2", "avx512f", "avx512_vnni")),
        ({"ATEN_CPU_CAPABILITY": "default"}, ("avx512_vnni", "avx512_bf16")),
        ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, ()),
        ({"ONEDNN_MAX_CPU_ISA": "ALL", "ATEN_CPU_CAPABILITY": "avx512"}, ZEN4),
    ],
)
def test_forced_dispatch_caps_lower_the_effective_instruction_sets(forced, kept):
    assert effective_instruction_sets(ZEN4, forced) == kept


def test_fingerprint_follows_forced_caps_in_the_environment(monkeypatch):
    caps = {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "OV_CPU_MAX_ISA": "AVX2",
    }
    # Exactly these caps, whatever the suite runs under (the forced-AVX2 pass sets all four).
    monkeypatch.delenv("OV_CPU_MAX_ISA", raising=False)
    for name, value in caps.items():
        monkeypatch.setenv(name, value)
    forced = fingerprint(threads=1)
    assert not has_vnni(forced) and not has_native_bf16(forced)
    assert set(forced.isa) <= {"avx2"}
    assert forced.forced == caps
    assert "torch" in forced.versions and forced.threads == 1
    assert CpuFingerprint.from_dict(forced.to_dict()) == forced


def test_machines_differ_by_instruction_sets_threads_or_engine_versions():
    base = cpu(ZEN4)
    assert base.same_machine(cpu(ZEN4))
    avx2 = cpu(("avx2",))
    assert not base.same_machine(avx2)
    assert base.differences(avx2) == ["isa avx2 → avx2 avx512f avx512_vnni avx512_bf16"]
    other_torch = CpuFingerprint("Test CPU", ZEN4, ZEN4, 2, 2, versions={"torch": "9"})
    assert not base.same_machine(other_torch)
    assert not base.same_machine(CpuFingerprint("Test CPU", ZEN4, ZEN4, 2, 1))


def test_half_precision_is_not_offered_without_native_bf16_unless_named():
    settings = StudySettings(model="m", task=TaskSpec(name="embedding"), passes=("cast.half",))
    withheld, notes = settings.withheld(cpu(("avx2",)))
    assert withheld == {} and len(notes) == 1 and "native_bf16" in notes[0]
    everything = StudySettings(model="m", task=TaskSpec(name="embedding"))
    assert everything.withheld(cpu(ZEN4)) == ({}, [])
    assert get_pass("cast.half").without_payoff(cpu(("avx2",))) == {"": "native_bf16"}
    assert get_pass("cast.half").without_payoff(cpu(ZEN4)) == {}


def test_openvino_bf16_and_nncf_int8_are_withheld_on_an_avx2_cpu_and_offered_when_named():
    openvino = get_pass("runtime.openvino")
    assert openvino.without_payoff(cpu(ZEN4)) == {}
    default = StudySettings(model="m", task=TaskSpec(name="embedding"))
    withheld, notes = default.withheld(cpu(("avx2",)))
    assert withheld["runtime.openvino"] == {("precision", "bf16"), ("int8", "nncf")}
    assert notes == []
    named = StudySettings(
        model="m",
        task=TaskSpec(name="embedding"),
        passes=("runtime.openvino:precision=bf16",),
    )
    withheld, notes = named.withheld(cpu(("avx2",)))
    assert withheld["runtime.openvino"] == {("int8", "nncf")}
    assert len(notes) == 1 and "runtime.openvino:precision=bf16" in notes[0]


def test_a_start_recipe_setting_counts_as_named():
    start = {
        "format": "slimformer-recipe/1",
        "steps": [{"pass": "runtime.openvino", "config": {"int8": "nncf"}}],
    }
    settings = StudySettings(model="m", task=TaskSpec(name="embedding"), starts=(start,))
    withheld, _ = settings.withheld(cpu(("avx2",)))
    assert withheld["runtime.openvino"] == {("precision", "bf16")}


def test_the_sampler_never_proposes_a_withheld_setting():
    openvino = get_pass("runtime.openvino")
    withheld = {"runtime.openvino": {("precision", "bf16"), ("int8", "nncf")}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        recipe = sample_recipe(trial, [openvino], None, TaskSpec(name="embedding"), 0, withheld)
        study.tell(trial, 0.0)
        for step in recipe.steps:
            seen.add((step.config.get("precision", "f32"), step.config.get("int8", "none")))
    assert seen == {("f32", "none")}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("runtime.openvino:precision", "pass:setting=value"),
        ("runtime.openvino:precision=fp8", "not one of"),
        ("runtime.nope:x=1", "unknown pass"),
    ],
)
def test_a_malformed_pass_setting_request_is_refused(entry, message):
    from slimformer.errors import SlimformerError

    with pytest.raises(SlimformerError, match=message):
        split_pass_names([entry])


def test_static_int8_is_searched_by_default_only_with_vnni():
    everything = StudySettings(model="m", task=TaskSpec(name="embedding"))
    withheld, _ = everything.withheld(cpu(("avx2",)))
    assert ("", "") in withheld["quantize.static_int8"]
    assert "quantize.static_int8" not in everything.withheld(cpu(ZEN4))[0]
