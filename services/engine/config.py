"""Engine configuration: one frozen dataclass per concern, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # explicit pool size; None = derive from memory_bytes
    memory_bytes: int = 2 << 30  # KV pool budget when num_blocks is None
    enable_prefix_caching: bool = True  # reuse hash-identified full blocks across requests

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and admission control."""

    max_num_batched_tokens: int = 2048  # token budget of one engine step (prefill chunks + decodes)
    max_num_seqs: int = 128  # running requests at most
    max_waiting_requests: int = 4096  # admission: queued requests beyond this are rejected
    max_waiting_tokens: int = 1 << 22  # admission: queued prompt tokens beyond this are rejected
    enable_chunked_prefill: bool = True  # split long prompts across steps under the budget

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_waiting_requests", "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; each component receives only its part."""

    model: str  # checkpoint folder (config.json, *.safetensors, tokenizer.json)
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    dtype: torch.dtype = torch.float32  # weights and activations
    max_model_len: int | None = None  # context limit; None = the model's max_position_embeddings
    seed: int = 0  # seed of the engine's generator for unseeded sampling
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @staticmethod
    def default_device() -> tuple[str, torch.dtype]:
        """CUDA bf16 when a GPU is present, else CPU fp32 (bf16 GEMM is ~7x slower on AVX2)."""
        if torch.cuda.is_available():
            return "cuda", torch.bfloat16
        return "cpu", torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map "float32"/"bfloat16"/"float16"/"auto" (or None) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]
