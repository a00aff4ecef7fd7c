"""What an ExpertWorker replica does, without Ray: hold one shard of a model's experts and run
calls on it (services/expert_worker.py hosts it in a Serve deployment).

Rows cross the handle as raw numpy arrays (``to_array`` / ``from_array``): float32 and float16
as themselves, bfloat16 as its bits in a uint16 array (numpy has no bfloat16). Nothing is
unpickled here that Ray did not already decode as a plain array. Anything in a call that does
not fit the shard (not an ExpertCall, an array of the wrong dtype, rank or shape, a layer that
is not a MoE layer, expert ids out of the shard's range or not ascending, counts that are not
one positive int per expert, no experts at all) is a ValueError naming the field, raised before
anything is computed or counted: the next good call is served as if it had not come.

Not thread-safe: the ExpertWorker runs one call at a time.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from services.config import ExpertWorkerConfig
from services.engine.config import resolve_device
from services.engine.model.expert_shard import ExpertShard
from services.types import ExpertCall, ExpertReply, ExpertWorkerStats

# dtype name -> (torch dtype, the numpy dtype its elements travel as)
WIRE_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
               "bfloat16": (torch.bfloat16, np.uint16)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype: {name} rows cannot travel to an expert shard; use one of {sorted(WIRE_DTYPES)}")
    return name


def to_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as a C-contiguous numpy array (a view when it already is one)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy()


def from_array(a, dtype: str, where: str) -> torch.Tensor:
    """The tensor ``a`` (from ``to_array``) holds; ValueError naming ``where`` for anything that
    is not a 2-D numpy array of ``dtype``'s wire type. Read-only arrays (object store) are copied."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    torch_dtype, wire = WIRE_DTYPES[dtype]
    if not isinstance(a, np.ndarray) or a.dtype != wire or a.ndim != 2:
        got = f"{a.dtype} {a.ndim}-D array" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{where}: must be a 2-D {np.dtype(wire).name} array for {dtype} rows, got {got}")
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C")
    t = torch.from_numpy(a)
    return t.view(torch_dtype) if dtype == "bfloat16" else t


class ExpertService:
    """One shard (``ExpertShard``) and its counters."""

    def __init__(self, shard: ExpertShard, shard_index: int, replica_id: str = ""):
        self.shard = shard
        self.dtype = dtype_name(shard.dtype)
        self.stats = ExpertWorkerStats(replica_id, shard_index, shard.experts.start, shard.experts.stop,
                                       len(shard.gate_up), shard.nbytes, pid=os.getpid())

    @classmethod
    def from_config(cls, config: ExpertWorkerConfig, replica_id: str = "") -> "ExpertService":
        device, dtype = resolve_device(config.target)
        shard = ExpertShard.from_checkpoint(config.target.model, config.shard, config.options.num_shards, device,
                                            dtype)
        return cls(shard, config.shard, replica_id)

    def run(self, call: ExpertCall) -> ExpertReply:
        t0 = time.perf_counter()
        if not isinstance(call, ExpertCall):
            raise ValueError(f"call: must be an ExpertCall, got {type(call).__name__}")
        for field in ("experts", "counts"):
            if not isinstance(getattr(call, field), (list, tuple)):
                raise ValueError(f"{field}: must be a list of ints, got {type(getattr(call, field)).__name__}")
        if call.dtype != self.dtype:
            raise ValueError(f"dtype: this shard computes in {self.dtype}, got {call.dtype!r} rows")
        x = from_array(call.hidden, call.dtype, "hidden")
        device = next(iter(self.shard.gate_up.values())).device
        y = self.shard.run(call.layer, list(call.experts), list(call.counts), x.to(device))
        self.stats.num_calls += 1
        self.stats.num_rows += x.shape[0]
        return ExpertReply(to_array(y), self.stats.replica_id, time.perf_counter() - t0)

    def snapshot(self) -> ExpertWorkerStats:
        return ExpertWorkerStats(**vars(self.stats))
