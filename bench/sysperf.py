"""The machine's limits that bound decode speed, and the environment a run was taken in.

Glossary
- read bandwidth: bytes per second read from a large fp32 tensor (best of several runs, at
  torch's current thread count), the higher of two probes: torch's ``sum`` (one stream per
  thread) and, where the engine's CPU kernels load, ``read_streams`` (kStreams interleaved
  streams per thread, the weight reads of decode). The tensor sits on 2 MiB pages, as the
  engine's weights do (services/engine/malloc.py). STREAM counts a read-only sum as 1x.
- weight bytes per token: what batch-1 decode must stream from memory for every new token:
  every parameter except the input embedding table (a lookup touches one row), but the
  table counts once when the LM head shares it (tied). Routed MoE experts count at
  ``top_k / num_experts`` of their bytes (the experts one token visits).
- memory floor: weight bytes per token / read bandwidth = the fastest batch-1 TPOT possible.
  Paired floor: the bandwidth read just before and just after one batch-1 round (the higher
  reading), the floor of that round's TPOT.
- GEMM peak: the best GFLOP/s of large square GEMMs in one dtype (``gemm_peak``), the compute
  ceiling that a run's achieved GFLOP/s (2 x parameters x tokens/s) is set against.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from services.engine.kernels import load_cpu_ops
from services.engine.kernels.cpu_features import cpu_features
from services.engine.malloc import huge_page_empty


class ReadProbe:
    """Read-bandwidth probes over one ``mib`` MiB fp32 tensor on 2 MiB pages. The tensor is
    kept between readings, so a reading costs only its reads and can sit right beside the
    decode it is the floor of (the bandwidth of a shared VM drifts by tens of percent within
    minutes). Call ``close`` to free it."""

    def __init__(self, mib: int = 1024):
        self.x = huge_page_empty((mib * (1 << 20) // 4,))
        self.x.fill_(1.0)  # page faults now, not in the first reading
        self.probes = {"torch_sum": self.x.sum}
        ops = load_cpu_ops()
        if ops is not None:
            self.probes["streams"] = lambda: ops.read_streams(self.x)

    def read(self, reps: int = 5) -> dict[str, float]:
        """Best-of-``reps`` GB/s (1e9 B/s) of each probe: ``{"torch_sum": ..., "streams": ...}``
        (no "streams" where the kernels do not load)."""
        result = {}
        for name, probe in self.probes.items():
            probe()  # thread pool, caches
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                probe()
                best = min(best, time.perf_counter() - t0)
            result[name] = self.x.numel() * 4 / best / 1e9
        return result

    def close(self) -> None:
        self.probes, self.x = {}, None


def _per_token(model: torch.nn.Module, model_config, size) -> int:
    """Sum of ``size(p)`` over the weights one batch-1 decode step reads (module glossary)."""
    total = 0
    embed = getattr(model, "embed_tokens", None)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    num_experts = getattr(model_config, "num_experts", 0) or 0
    top_k = getattr(model_config, "num_experts_per_tok", 0) or 0
    for name, p in model.named_parameters():
        n = size(p)
        if embed is not None and p is embed.weight and not tied:
            continue
        if ".experts." in name and num_experts:
            n = n * top_k // num_experts
        total += n
    return total


def weight_bytes_per_token(model: torch.nn.Module, model_config) -> int:
    """Bytes of weights one batch-1 decode step streams (see the module glossary)."""
    return _per_token(model, model_config, lambda p: p.numel() * p.element_size())


def flop_params_per_token(model: torch.nn.Module, model_config) -> int:
    """Parameters one token multiplies by (the weights of ``weight_bytes_per_token``, counted in
    elements): the decode FLOP estimate is 2 x this x tokens/s (attention's own FLOPs, which
    grow with context, are not counted)."""
    return _per_token(model, model_config, lambda p: p.numel())


def gemm_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), reps: int = 5) -> dict:
    """GFLOP/s of square GEMMs ``F.linear(x [s, s], w [s, s])`` (the layout of a linear layer's
    [out, in] weight), best of ``reps`` per size at torch's current thread count:
    ``{"GFLOPs": best over sizes, "by_size": {"1024": ...}}``. The compute ceiling that
    achieved decode / prefill GFLOP/s are set against."""
    by_size = {}
    for s in sizes:
        x, w = torch.randn(s, s).to(dtype), torch.randn(s, s).to(dtype)
        with torch.inference_mode():
            torch.nn.functional.linear(x, w)  # warm: thread pool, oneDNN primitive
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - t0)
        by_size[str(s)] = 2 * s ** 3 / best / 1e9
    return {"GFLOPs": max(by_size.values()), "by_size": by_size}


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, threads and CPU of this run."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model(),
           "nproc": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "platform": platform.platform()}
    features = cpu_features()
    env["cpu"] = features.describe()  # model, flags class and cores: the line every report names
    env["cpu_flags_class"] = features.flags_class
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env
