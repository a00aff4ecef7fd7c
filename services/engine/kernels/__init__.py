"""Tandem's own CPU kernels (``cpu_ops.cpp``, ``prefill_attention.cpp``, ``simd.h``), compiled on
first use with torch's extension builder.

``load_cpu_ops()`` returns the compiled module, or None where it cannot run here (no AVX2/FMA,
no C++ compiler, ``TANDEM_CPU_KERNELS=0``); the engine then keeps its plain torch path. The
build is cached per Python environment, source and flags (torch's ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``) and guarded by a file lock, so concurrent processes (test
workers, Ray replicas) compile it once. ``python -m services.engine.kernels`` builds it ahead of
time (``make`` does).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from pathlib import Path

import torch

from services.engine import env

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "prefill_attention.cpp")]  # + simd.h
# -ffp-contract=off: a * b + c stays two roundings, like torch's eager ops (intrinsics unaffected)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"]
ENV_SWITCH = "TANDEM_CPU_KERNELS"  # "0" turns the kernels off (the torch path runs); read by services/engine/env.py


def cpu_supports_kernels() -> bool:
    """AVX2 with FMA (torch reports AVX2 or AVX512 capability) on x86-64."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def extension_name() -> str:
    """``tandem_cpu_ops_<hash of this Python environment>``: each venv (each torch install) gets
    its own build folder, so two checkouts on one machine neither rebuild each other's build
    nor load a library another one is rewriting."""
    key = f"{sys.prefix}|{torch.__version__}".encode()
    return "tandem_cpu_ops_" + hashlib.sha256(key).hexdigest()[:10]


@functools.cache
def load_cpu_ops():
    """The compiled kernel module, or None (logged once) where it is unavailable."""
    if not env.cpu_kernels_enabled():
        return None
    if not cpu_supports_kernels():
        log.info("CPU kernels off: this CPU has no AVX2 (torch capability %s)",
                 torch.backends.cpu.get_cpu_capability())
        return None
    try:
        from torch.utils.cpp_extension import load
        return load(name=extension_name(), sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU kernels unavailable, using torch ops: %s", exc)
        return None


__all__ = ["ENV_SWITCH", "cpu_supports_kernels", "load_cpu_ops"]
