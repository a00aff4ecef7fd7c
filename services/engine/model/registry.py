"""Build a ``CausalLM`` from a ``ModelConfig`` and load Hugging Face weights into it.

Weight names: our parameter ``layers.3.self_attn.qkv_proj.weight`` is filled from the
checkpoint's ``model.layers.3.self_attn.{q,k,v}_proj.weight`` (row blocks, in that order);
``gate_up_proj`` from ``gate_proj`` then ``up_proj``; routed experts from per-expert tensors
(Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}`` = gate, up, down; Qwen MoE
``mlp.experts.E.{gate,up,down}_proj``) through ``ExpertBackend.load_expert``. Every tensor
is shape-checked before it is read; a missing, unexpected or mis-shaped tensor raises
``CheckpointError`` naming it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from services.engine.checkpoint import CheckpointError, CheckpointReader
from services.engine.gguf_checkpoint import GGUFCheckpointReader
from services.engine.gguf_file import is_gguf_path
from services.engine.model.decoder import CausalLM
from services.engine.model.experts import ExpertFactory, ExpertSource, LocalExperts, MoEBlock
from services.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "expert_tensor_names", "load_model", "load_weights",
           "open_checkpoint"]

# fused parameter -> the checkpoint projections it concatenates, in row order
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# checkpoint tensors that are fine to leave unused (old Llama exports saved the rope buffer)
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class _Source:
    """One checkpoint tensor that fills rows [row, row + shape[0]) of a parameter."""

    name: str  # checkpoint tensor name
    row: int  # first destination row (dim 0) in our parameter
    shape: tuple[int, ...]  # expected checkpoint shape


def build_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                expert_backend: ExpertFactory = LocalExperts) -> CausalLM:
    """Allocate a ``CausalLM`` on ``device`` without initializing weights (``torch.empty``);
    only the rotary cos/sin table is computed. Use ``load_weights`` to fill it."""
    with torch.device("meta"):
        model = CausalLM(config, dtype, expert_backend)
    model.to_empty(device=device)
    model.rotary.build_cache()
    model.requires_grad_(False)
    return model.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               expert_backend: ExpertFactory = LocalExperts) -> CausalLM:
    """Parse ``path/config.json``, build the model and load its safetensors weights; or, for a
    ``.gguf`` file, the same from its metadata and (dequantized) tensors."""
    config, reader = open_checkpoint(path)
    with reader:
        model = build_model(config, device, dtype, expert_backend)
        load_weights(model, reader)
    return model


def open_checkpoint(path: str | Path) -> tuple[ModelConfig, CheckpointReader | GGUFCheckpointReader]:
    """(config, tensor reader in HF naming) for a checkpoint folder or a GGUF file; every
    architecture and tensor-type check runs here, before any weight is allocated."""
    if is_gguf_path(path):
        return ModelConfig.from_gguf(path), GGUFCheckpointReader(path)
    return ModelConfig.from_pretrained(path), CheckpointReader(path)


@torch.no_grad()
def load_weights(model: CausalLM, reader: CheckpointReader | GGUFCheckpointReader) -> None:
    """Copy (and convert to the model's dtype/device) every checkpoint tensor into ``model``."""
    used: set[str] = set()
    bar = tqdm(total=len(reader.names()), desc=f"loading {reader.path.name}", unit="tensor", disable=None)
    try:
        for name, param in model.named_parameters():
            if ".experts." in name:
                continue  # routed experts are loaded through their backend below
            for src in _sources(model.config, name, tuple(param.shape)):
                param[src.row:src.row + src.shape[0]].copy_(reader.get(src.name, src.shape))
                used.add(src.name)
                bar.update()
        for layer, block in enumerate(model.layers):
            if isinstance(block.mlp, MoEBlock):
                _load_experts(model.config, layer, block.mlp, reader, used, bar)
    finally:
        bar.close()
    unexpected = sorted(n for n in reader.names() - used if not _ignorable(model.config, n))
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{reader.path}: unexpected tensor(s) for {model.config.architecture}: "
                              f"{unexpected[:5]}{more}")


def _ignorable(config: ModelConfig, name: str) -> bool:
    return bool(_IGNORED.match(name)) or (config.tie_word_embeddings and name == "lm_head.weight")


def _sources(config: ModelConfig, name: str, shape: tuple[int, ...]) -> list[_Source]:
    """Checkpoint tensors filling our parameter ``name`` of ``shape``."""
    if name == "lm_head.weight":
        return [_Source(name, 0, shape)]
    hf = "model." + name
    if config.architecture == "MixtralForCausalLM" and name.endswith(".mlp.gate.weight"):
        hf = hf.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    module, _, leaf = hf.rpartition(".")
    parent, _, proj = module.rpartition(".")
    if proj not in _FUSED:
        return [_Source(hf, 0, shape)]
    if proj == "qkv_proj":
        rows = [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2
    else:
        rows = [shape[0] // 2] * 2
    sources, row = [], 0
    for part, n in zip(_FUSED[proj], rows):
        sources.append(_Source(f"{parent}.{part}.{leaf}", row, (n,) + shape[1:]))
        row += n
    return sources


def expert_tensor_names(config: ModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """Checkpoint names of one expert's (gate, up, down) weights."""
    if config.architecture == "MixtralForCausalLM":
        base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    base = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


def _load_experts(config: ModelConfig, layer: int, block: MoEBlock, reader: CheckpointReader,
                  used: set[str], bar: tqdm) -> None:
    """Hand every expert of ``layer`` to its backend as an ``ExpertSource`` (shapes checked
    here; the backend decides whether to read the weights now, later, or never)."""
    d, i = config.hidden_size, config.moe_intermediate_size
    shapes = [(i, d), (i, d), (d, i)]
    for expert in range(config.num_experts):
        names = expert_tensor_names(config, layer, expert)
        for name, shape in zip(names, shapes):
            if tuple(reader.shape(name)) != shape:
                raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {list(reader.shape(name))}, "
                                      f"expected {list(shape)}")
        locations = tuple(map(reader.locate, names)) if hasattr(reader, "locate") else None
        read = functools.partial(_read_expert, reader, names, shapes)
        block.experts.install_expert(expert, ExpertSource(read, locations))
        used.update(names)
        bar.update(3)


def _read_expert(reader, names, shapes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate, up, down = (reader.get(n, s) for n, s in zip(names, shapes))
    return gate, up, down
