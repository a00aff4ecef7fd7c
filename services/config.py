"""Configuration of the worker deployments, validated once at the edge (the app builder)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.prefix_store.config import PrefixStoreConfig

ROLES = ("unified", "prefill", "decode")


@dataclass(frozen=True)
class EngineOptions:
    """Engine options of one worker role (the keyword options of ``build_engine_config``)."""

    device: str | None = None  # "cpu" / "cuda"; None = CUDA when present
    dtype: str | None = None  # "float32" / "bfloat16" / ...; None = the device's default
    max_model_len: int | None = None  # context limit; None = the model's
    seed: int = 0  # seed of unseeded sampling
    block_size: int = 16  # tokens per KV block (prefill and decode must agree)
    num_kv_blocks: int | None = None  # explicit KV pool size; None = from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # KV pool budget when num_kv_blocks is None
    enable_prefix_caching: bool = True  # reuse hash-identified full blocks
    max_num_batched_tokens: int = 2048  # token budget of one engine step
    max_num_seqs: int = 128  # running requests at most
    max_waiting_requests: int = 4096  # admission limit: queued requests
    max_waiting_tokens: int = 1 << 22  # admission limit: queued tokens

    @classmethod
    def from_dict(cls, values: dict | None, where: str) -> "EngineOptions":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def merged(self, overrides: dict | None, where: str) -> "EngineOptions":
        """These options with ``overrides`` applied (for a per-role section)."""
        return EngineOptions.from_dict({**dataclasses.asdict(self), **(overrides or {})}, where)

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker replica needs."""

    role: str  # "unified" | "prefill" | "decode"
    model: str  # checkpoint folder
    model_id: str  # id clients use for the model
    engine: EngineOptions = field(default_factory=EngineOptions)
    kv_transfer: str = "ray"  # KVTransfer backend name (prefill and decode roles)
    adopt_timeout_s: float = 30.0  # decode: how long to wait for KV blocks before RESOURCE_EXHAUSTED
    kv_hold_s: float = 60.0  # prefill: release a sent KV payload nobody adopted after this long
    torch_threads: int | None = None  # intra-op threads; None = every core of the node (Ray would set 1)
    prefix_store: PrefixStoreConfig | None = None  # Redis tier of the prefix cache; None = local tier only

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {self.role!r}")
