"""One shard of a model's routed experts: what an ExpertWorker replica holds and runs.

A shard is a contiguous expert range (``expert_backends/remote.py: shard_ranges``) of every MoE
layer. ``ExpertShard.from_checkpoint`` reads only those experts' tensors, each with positional
reads of its byte range in the safetensors file (``expert_offload/store.py: read_tensor_into``;
nothing else of the checkpoint is read or mapped), into stacked weights of ``LocalExperts``'s
layout: per MoE layer ``gate_up`` [n, 2I, D] (gate rows, then up rows) and ``down`` [n, D, I].
``run`` computes each expert's rows with ``run_expert``, exactly as ``LocalExperts`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from services.engine.checkpoint import CheckpointError, CheckpointReader
from services.engine.gguf_file import is_gguf_path
from services.engine.model.expert_backends.remote import shard_ranges
from services.engine.model.expert_offload.store import OpenFiles, read_tensor_into
from services.engine.model.experts import run_expert
from services.engine.model.registry import expert_tensor_names
from services.engine.model_config import ModelConfig


class ExpertShard:
    """Experts ``experts`` of every MoE layer of one model, on ``device`` in ``dtype``."""

    def __init__(self, config: ModelConfig, experts: range, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.experts = experts
        self.dtype = dtype
        n, d, i = len(experts), config.hidden_size, config.moe_intermediate_size
        layers = [layer for layer in range(config.num_layers) if config.is_moe_layer(layer)]
        self.gate_up = {layer: torch.empty(n, 2 * i, d, dtype=dtype, device=device) for layer in layers}
        self.down = {layer: torch.empty(n, d, i, dtype=dtype, device=device) for layer in layers}

    @classmethod
    def from_checkpoint(cls, path: str | Path, shard: int, num_shards: int, device: torch.device,
                        dtype: torch.dtype) -> "ExpertShard":
        """Shard ``shard`` of ``num_shards`` of the safetensors checkpoint at ``path``."""
        if is_gguf_path(path):
            raise ValueError("experts.backend: remote experts need a safetensors checkpoint folder, not a .gguf file")
        config = ModelConfig.from_pretrained(path)
        if not config.is_moe:
            raise ValueError(f"experts.backend: {path} is a dense model; remote experts need a MoE model")
        self = cls(config, shard_ranges(config.num_experts, num_shards)[shard], torch.device("cpu"), dtype)
        files = OpenFiles()
        try:
            with CheckpointReader(path) as reader:
                for layer in self.gate_up:
                    self._load_layer(reader, files, layer)
        finally:
            files.close()
        if torch.device(device).type != "cpu":
            self.gate_up = {k: v.to(device) for k, v in self.gate_up.items()}
            self.down = {k: v.to(device) for k, v in self.down.items()}
        return self

    def _load_layer(self, reader: CheckpointReader, files: OpenFiles, layer: int) -> None:
        d, i = self.config.hidden_size, self.config.moe_intermediate_size
        for j, expert in enumerate(self.experts):
            gate, up, down = map(reader.locate, expert_tensor_names(self.config, layer, expert))
            for loc, shape in ((gate, (i, d)), (up, (i, d)), (down, (d, i))):
                if loc.shape != shape:
                    raise CheckpointError(f"{loc.file}: an expert tensor of layer {layer} has shape "
                                          f"{list(loc.shape)}, expected {list(shape)}")
            read_tensor_into(files.fd(gate.file), gate, self.gate_up[layer][j, :i])
            read_tensor_into(files.fd(up.file), up, self.gate_up[layer][j, i:])
            read_tensor_into(files.fd(down.file), down, self.down[layer][j])

    @property
    def nbytes(self) -> int:
        """Expert weight bytes held."""
        return sum(t.numel() * t.element_size() for w in (self.gate_up, self.down) for t in w.values())

    @torch.no_grad()
    def run(self, layer: int, experts: Sequence[int], counts: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """x [sum(counts), D]: rows grouped by expert in the order of ``experts`` (ascending, in
        this shard) -> y [sum(counts), D], ``y[rows of e] = expert e (x[rows of e])``. ValueError
        naming the field for anything that does not fit this shard."""
        self.check(layer, experts, counts, x)
        y = torch.empty_like(x)
        start = 0
        for expert, n in zip(experts, counts):
            j = expert - self.experts.start
            run_expert(x, y, slice(start, start + n), self.gate_up[layer][j], self.down[layer][j])
            start += n
        return y

    def check(self, layer: int, experts: Sequence[int], counts: Sequence[int], x: torch.Tensor) -> None:
        """ValueError naming the field; O(len(experts)) (at most this shard's experts) besides the shape."""
        if not _is_int(layer) or layer not in self.gate_up:
            raise ValueError(f"layer: {layer!r} is not a MoE layer of this model (MoE layers: {sorted(self.gate_up)})")
        if not experts:
            raise ValueError("experts: empty; a call carries at least one expert's rows")
        if any(not _is_int(e) or e not in self.experts for e in experts) or list(experts) != sorted(set(experts)):
            raise ValueError(f"experts: must be distinct ascending ids in {self.experts}, got {list(experts)[:16]}")
        if len(counts) != len(experts) or any(not _is_int(n) or n < 1 for n in counts):
            raise ValueError(f"counts: one positive row count per expert ({len(experts)}), got {list(counts)[:16]}")
        if x.dim() != 2 or x.shape[0] != sum(counts) or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden: shape {list(x.shape)}, expected [{sum(counts)}, {self.config.hidden_size}]")
        if x.dtype != self.dtype:
            raise ValueError(f"dtype: {x.dtype} rows for a shard computing in {self.dtype}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
