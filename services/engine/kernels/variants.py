"""The kernel variants: one build of the same sources per ISA level, and the rule that picks one.

Every variant compiles the kernel sources (``SOURCES`` in __init__.py) with its own
``-m`` flags into its own extension module (simd.h's TANDEM_AVX512 selects the 512-bit code
paths, an inline namespace keeps the builds' symbols apart), so one checkout serves every x86
machine and nothing depends on the building machine: no ``-march=native``. The flags name
instruction-set extensions only; the code may run on any CPU that has them.

Choice, best first among those whose flags the CPU has (cpu_features.py): ``avx512``, then
``avx2``; ``torch`` (no compiled kernels: torch / oneDNN ops) last. A name forces a variant
(tests, A/B benches); forcing one the CPU cannot run is a ValueError, not a SIGILL.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.kernels.cpu_features import AVX2_FLAGS, AVX512_FLAGS, CpuFeatures

# every variant: -ffp-contract=off keeps a * b + c two roundings, like torch's eager ops
# (intrinsics unaffected)
BASE_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
TORCH = "torch"  # the name of the no-kernels choice
AUTO = "auto"


@dataclass(frozen=True)
class KernelVariant:
    """One ISA build of the kernel sources."""

    name: str  # "avx512" / "avx2": the module suffix, the forcing name, the log's word
    isa_flags: tuple[str, ...]  # -m flags of this build (instruction-set extensions only)
    needs: frozenset[str]  # /proc/cpuinfo flags the CPU must have to run it

    @property
    def cflags(self) -> list[str]:
        return [*BASE_CFLAGS, *self.isa_flags]

    def runs_on(self, features: CpuFeatures) -> bool:
        return self.needs <= features.flags


AVX2 = KernelVariant("avx2", ("-mavx2", "-mfma"), AVX2_FLAGS)
# AVX512_BF16 is not required: its kernels are compiled per function (simd.h TANDEM_BF16_TARGET)
# and called only where the CPU has it
AVX512 = KernelVariant("avx512", (*AVX2.isa_flags, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
                       AVX512_FLAGS)
VARIANTS = (AVX512, AVX2)  # best first
CHOICES = (AUTO, *(v.name for v in VARIANTS), TORCH)


def variant_named(name: str) -> KernelVariant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise ValueError(f"kernel variant: unknown {name!r}; use one of {list(CHOICES)}")


def runnable_variants(features: CpuFeatures) -> list[KernelVariant]:
    """Every variant this CPU can run, best first (what the tests cover on this machine)."""
    return [v for v in VARIANTS if v.runs_on(features)]


def pick_variant(choice: str, features: CpuFeatures) -> KernelVariant | None:
    """``choice`` ("auto", a variant name, or "torch") -> the variant to load, or None for torch
    ops. "auto" takes the best the CPU runs (None where it runs none); a forced name the CPU
    lacks flags for raises ValueError naming the missing flags."""
    if choice == TORCH:
        return None
    if choice == AUTO:
        runnable = runnable_variants(features)
        return runnable[0] if runnable else None
    variant = variant_named(choice)
    if not variant.runs_on(features):
        missing = ", ".join(sorted(variant.needs - features.flags))
        raise ValueError(f"kernel variant: {choice!r} needs CPU flags this machine lacks: {missing}")
    return variant


__all__ = ["AUTO", "AVX2", "AVX512", "CHOICES", "TORCH", "VARIANTS", "KernelVariant", "pick_variant",
           "runnable_variants", "variant_named"]
