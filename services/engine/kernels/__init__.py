"""Tandem's own CPU kernels (``SOURCES``: ``cpu_ops.cpp``, the linears, the attentions, and
``simd.h``), compiled per ISA variant on first use with torch's extension builder.

``load_cpu_ops(variant=None)`` returns the compiled module of the variant this machine runs
best (variants.py: avx512, then avx2), or None where none can run here (no AVX2/FMA, no C++
compiler, the ``torch`` choice); the engine then keeps its plain torch path. ``variant`` (or
``TANDEM_CPU_KERNELS``: ``auto`` by default, ``avx512``, ``avx2``, ``torch``; ``0`` = ``torch``)
forces one. Each variant is its own extension module, built once per Python environment,
source and flags (torch's ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``)
under a file lock, so concurrent processes (test workers, Ray replicas) compile it once.
``python -m services.engine.kernels`` builds every variant this CPU runs ahead of time (``make``
does). Which variant loaded, and which code path each op runs in it, is logged once per
variant (``dispatch_report``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from pathlib import Path

import torch

from services.engine import env
from services.engine.kernels.cpu_features import CpuFeatures, cpu_features
from services.engine.kernels.variants import AUTO, TORCH, KernelVariant, pick_variant, runnable_variants

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_ops.cpp", "panel_linear.cpp", "panel_gemm.cpp", "bf16_linear.cpp", "prefill_attention.cpp",
                         "decode_attention512.cpp")]
ENV_SWITCH = "TANDEM_CPU_KERNELS"  # auto | avx512 | avx2 | torch ("0" = torch, "1" = auto); read by services/engine/env.py


def kernel_choice_from_env() -> str:
    """The kernel choice ``TANDEM_CPU_KERNELS`` asks for (env.cpu_kernels_choice)."""
    return env.cpu_kernels_choice()


def cpu_supports_kernels() -> bool:
    """Some kernel variant runs on this CPU (AVX2 with FMA at least, x86-64)."""
    return bool(runnable_variants(cpu_features()))


def extension_name(variant: KernelVariant) -> str:
    """``tandem_cpu_ops_<variant>_<hash of this Python environment>``: each venv (each torch
    install) gets its own build folder per variant, so two checkouts on one machine neither
    rebuild each other's build nor load a library another one is rewriting."""
    key = f"{sys.prefix}|{torch.__version__}".encode()
    return f"tandem_cpu_ops_{variant.name}_" + hashlib.sha256(key).hexdigest()[:10]


def dispatch_report(ops, features: CpuFeatures) -> str:
    """One line: the variant, the CPU, and the code path of every op in it."""
    ops_isa = ", ".join(f"{op} {isa}" for op, isa in sorted(ops.OP_ISA.items()))
    return f"CPU kernels {ops.VARIANT} on {features.describe()}: {ops_isa}"


@functools.cache
def _build(variant: KernelVariant):
    """The compiled module of ``variant`` (logged once), or None where it does not build."""
    try:
        from torch.utils.cpp_extension import load
        ops = load(name=extension_name(variant), sources=[str(p) for p in SOURCES], extra_cflags=variant.cflags,
                   extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU kernels (%s) unavailable, using torch ops: %s", variant.name, exc)
        return None
    log.info("%s", dispatch_report(ops, cpu_features()))
    return ops


def load_cpu_ops(variant: str | None = None):
    """The compiled kernel module of ``variant`` ("auto", "avx512", "avx2", "torch"; None = the
    environment's choice, default "auto"), or None for torch ops. Raises ValueError for an
    unknown name or a variant this CPU cannot run."""
    choice = kernel_choice_from_env() if variant is None else variant
    chosen = pick_variant(choice, cpu_features())
    if chosen is None:
        if choice == AUTO:
            _log_once(f"CPU kernels off: no variant runs on {cpu_features().describe()}")
        return None
    return _build(chosen)


@functools.cache
def _log_once(message: str) -> None:
    log.info("%s", message)


__all__ = ["ENV_SWITCH", "SOURCES", "cpu_supports_kernels", "dispatch_report", "extension_name",
           "kernel_choice_from_env", "load_cpu_ops"]
