"""What this CPU can run, read once: the instruction-set flags the kernel variants and the
``dtype: auto`` rule depend on.

Source of truth: the ``flags`` line of /proc/cpuinfo (the kernel's cpuid view, which a VM's
hypervisor already filters), with torch's ``torch.backends.cpu.get_cpu_capability()`` (its own
cpuid probe: "AVX512", "AVX2", "DEFAULT", ...) where /proc/cpuinfo is missing (not Linux).

Flags classes (the names reports and READMEs use):
- ``amx``: AMX tiles with bf16 (Sapphire Rapids and later), plus everything below;
- ``avx512-bf16``: AVX-512 F/BW/VL/DQ and AVX512_BF16 (Cooper Lake, Zen 4/5);
- ``avx512``: AVX-512 F/BW/VL/DQ (Skylake-SP to Ice Lake);
- ``avx2``: AVX2 + FMA (Haswell and later, Zen 1-3);
- ``baseline``: none of those (the kernels do not run; torch ops do).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

AVX2_FLAGS = frozenset({"avx2", "fma"})
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
BF16_FLAGS = frozenset({"avx512_bf16"})  # vdpbf16ps / vcvtne2ps2bf16
AMX_BF16_FLAGS = frozenset({"amx_tile", "amx_bf16"})


@dataclass(frozen=True)
class CpuFeatures:
    """One machine's CPU, as the kernels and the dtype rule see it."""

    model_name: str  # /proc/cpuinfo "model name" ("" where unknown)
    flags: frozenset[str]  # cpuinfo flag names (lower case), e.g. "avx2", "avx512_bf16"
    cores: int  # CPUs this process may run on (os.sched_getaffinity)

    @property
    def avx2(self) -> bool:
        return AVX2_FLAGS <= self.flags

    @property
    def avx512(self) -> bool:
        return AVX512_FLAGS <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and BF16_FLAGS <= self.flags

    @property
    def amx_bf16(self) -> bool:
        return AMX_BF16_FLAGS <= self.flags

    @property
    def flags_class(self) -> str:
        """"amx", "avx512-bf16", "avx512", "avx2" or "baseline" (see the module docstring)."""
        if self.amx_bf16 and self.avx512:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "baseline"

    def describe(self) -> str:
        """e.g. "AMD EPYC (avx512-bf16, 2 cores)": the line every benchmark report carries."""
        return f"{self.model_name or 'unknown CPU'} ({self.flags_class}, {self.cores} cores)"


def parse_cpuinfo(text: str, cores: int) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (its first processor's model name and flags)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuFeatures(model_name=model, flags=flags, cores=cores)


def _flags_from_torch() -> frozenset[str]:
    """The flags torch's capability implies, where /proc/cpuinfo is missing (AVX512 capability
    says nothing about BF16, so bf16 is never assumed from it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return AVX512_FLAGS
    return AVX2_FLAGS if capability == "AVX2" else frozenset()


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's features, read once per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    path = Path("/proc/cpuinfo")
    if path.is_file():
        found = parse_cpuinfo(path.read_text(), cores)
        if found.flags:
            return found
    return CpuFeatures(model_name="", flags=_flags_from_torch(), cores=cores)


def auto_cpu_dtype(features: CpuFeatures) -> torch.dtype:
    """The weights and KV dtype of ``dtype: auto`` on CPU: bf16 where the CPU multiplies bf16
    natively (AVX512_BF16, or AMX-BF16), fp32 elsewhere.

    Why: with bf16 weights a decode step streams half the bytes, and on such CPUs the kernels'
    bf16 linear (vdpbf16ps, bf16_linear.cpp) also does twice the multiply-adds per instruction
    of fp32 FMAs, so it wins at every batch size. Measured on AMD EPYC Zen 4 (AVX512_BF16), 2
    cores, shared box, one process, alternating, dense-100m: a step's 33 linears 1.55x (1 row),
    1.9x (8 rows), 3.1x (32 rows) faster than fp32 (bf16_linear.cpp's table); the engine, 128-token
    prompt -> 64 tokens, 1 thread, batch 1: 57 -> 109 tok/s; batch 8, 2 threads: 50 -> 100 tok/s
    (median of 4-6 rounds, /tmp/cpud/e2e.py, 2026-12-02 21:06-21:08 UTC). Without native bf16 the
    weights must be widened to fp32 in registers (two extra integer ops per vector) and torch's
    bf16 GEMM for prompts is emulated (~7x slower than fp32 on AVX2, config.py's note), so fp32
    stays the default.
    """
    return torch.bfloat16 if features.avx512_bf16 or features.amx_bf16 else torch.float32


__all__ = ["CpuFeatures", "auto_cpu_dtype", "cpu_features", "parse_cpuinfo"]
