"""CPU feature detection and the kernel-variant choice (services/engine/kernels/cpu_features.py,
variants.py, __init__.py): pure logic on given flag sets, plus the loader on this machine."""

from __future__ import annotations

import pytest
import torch

from services.engine.kernels import (ENV_SWITCH, cpu_supports_kernels, dispatch_report, kernel_choice_from_env,
                                     load_cpu_ops)
from services.engine.kernels.cpu_features import CpuFeatures, auto_cpu_dtype, cpu_features, parse_cpuinfo
from services.engine.kernels.variants import VARIANTS, pick_variant, runnable_variants

ZEN3 = "fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni"
ZEN4 = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni"
SKYLAKE_SP = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl"
SAPPHIRE_RAPIDS = SKYLAKE_SP + " avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"


def _cpu(flags: str) -> CpuFeatures:
    return CpuFeatures(model_name="test CPU", flags=frozenset(flags.split()), cores=2)


def test_parse_cpuinfo_reads_the_first_processor():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: " + ZEN4 + "\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: sse\n")
    got = parse_cpuinfo(text, cores=96)
    assert got.model_name == "AMD EPYC 9654" and got.cores == 96
    assert got.avx512_bf16 and got.flags_class == "avx512-bf16"
    assert got.describe() == "AMD EPYC 9654 (avx512-bf16, 96 cores)"


@pytest.mark.parametrize("flags,cls,best", [
    (ZEN3, "avx2", "avx2"), (SKYLAKE_SP, "avx512", "avx512"), (ZEN4, "avx512-bf16", "avx512"),
    (SAPPHIRE_RAPIDS, "amx", "avx512"), ("fpu sse sse2 avx", "baseline", None)])
def test_auto_takes_the_best_variant_the_cpu_runs(flags, cls, best):
    cpu = _cpu(flags)
    assert cpu.flags_class == cls
    chosen = pick_variant("auto", cpu)
    assert (chosen.name if chosen else None) == best
    assert pick_variant("torch", cpu) is None


@pytest.mark.parametrize("flags,dtype", [(ZEN3, torch.float32), (SKYLAKE_SP, torch.float32),
                                         (ZEN4, torch.bfloat16), (SAPPHIRE_RAPIDS, torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16(flags, dtype):
    assert auto_cpu_dtype(_cpu(flags)) == dtype


def test_forcing_a_variant():
    assert pick_variant("avx2", _cpu(ZEN4)).name == "avx2"  # a lesser build on a better CPU
    with pytest.raises(ValueError, match="avx512bw, avx512dq, avx512f, avx512vl"):
        pick_variant("avx512", _cpu(ZEN3))
    with pytest.raises(ValueError, match="unknown 'sse9'"):
        pick_variant("sse9", _cpu(ZEN4))


def test_no_variant_is_built_for_the_building_machine():
    """Only named extensions: a build made here runs on any CPU with the variant's flags."""
    for variant in VARIANTS:
        assert not any(flag.startswith(("-march", "-mtune", "-mcpu")) for flag in variant.cflags)
        # every -m<ext> flag is an extension the CPU check covers
        exts = {flag.removeprefix("-m") for flag in variant.cflags if flag.startswith("-m")}
        assert exts <= variant.needs


@pytest.mark.parametrize("raw,choice", [(None, "auto"), ("1", "auto"), ("0", "torch"), ("AVX2", "avx2"),
                                        ("avx512", "avx512"), ("torch", "torch"), ("off", "torch"), ("", "auto")])
def test_environment_choice(monkeypatch, raw, choice):
    if raw is None:
        monkeypatch.delenv(ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(ENV_SWITCH, raw)
    assert kernel_choice_from_env() == choice


def test_env_module_knows_every_choice():
    from services.engine import env
    from services.engine.kernels.variants import CHOICES
    assert env.KERNEL_CHOICES == CHOICES


def test_environment_choice_rejects_other_words(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "sse9")
    with pytest.raises(ValueError, match="TANDEM_CPU_KERNELS"):
        kernel_choice_from_env()


def test_load_follows_the_choice(monkeypatch):
    assert load_cpu_ops("torch") is None
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert load_cpu_ops() is None
    with pytest.raises(ValueError, match="unknown"):
        load_cpu_ops("neon")


@pytest.mark.skipif(not cpu_supports_kernels(), reason="the kernels need an AVX2 + FMA CPU")
def test_every_runnable_variant_loads_and_reports_its_ops(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    here = runnable_variants(cpu_features())
    assert load_cpu_ops().VARIANT == here[0].name  # auto = the best
    for variant in here:
        ops = load_cpu_ops(variant.name)
        assert ops.VARIANT == variant.name
        report = dispatch_report(ops, cpu_features())
        for op in ("linear_small", "decode_attention", "prefill_attention", "rms_norm", "DecodeStack"):
            assert op in ops.OP_ISA and op in report
        if variant.name == "avx2":  # the avx2 build has no 512-bit code
            assert "avx512" not in " ".join(ops.OP_ISA.values())
