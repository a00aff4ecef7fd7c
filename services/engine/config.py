"""Engine configuration: one frozen tree, declared once, parsed and validated once.

    EngineConfig            model, device, dtype, max_model_len, seed
      cache: CacheConfig        paged KV cache sizing
      scheduler: SchedulerConfig  batching limits and admission
      experts: PluginSection      ExpertBackend variant (EXPERT_BACKENDS; key ``backend``)
      speculative: PluginSection | None  proposer (PROPOSERS; key ``method``); None = off
      quantization: PluginSection  weight quantizer (QUANTIZERS)

``EngineConfig.from_options(model, options, path)`` builds it from the flat keyword names users
know from vLLM (``LLM(model, block_size=16, max_num_seqs=64, speculative_config={...})`` and the
``engine:`` mapping of a Serve YAML): a key is a field of ``EngineConfig``, a section name with a
mapping, or the name of a field inside ``cache``/``scheduler`` (each such name is unique).
``with_options`` applies a per-role override the same way. Every error names the field by its
path (services/engine/config_parse.py). The resolved device and dtype (``auto``) are decided by
the process that runs the engine (``resolve_device``), never written back into the config.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.config_parse import ConfigError, construct, join, parse_field
from services.engine.kernels.cpu_features import CpuFeatures, auto_cpu_dtype, cpu_features
from services.engine.model.expert_backends import EXPERT_BACKENDS
from services.engine.model_config import ModelConfig
from services.engine.plugins import PluginSection
from services.engine.quantization import QUANTIZERS
from services.engine.spec_decode import PROPOSERS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block (prefill and decode must agree)
    num_kv_blocks: int | None = None  # explicit pool size; None = derive from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0  # KV pool budget in GiB when num_kv_blocks is None
    enable_prefix_caching: bool = True  # reuse hash-identified full blocks across requests

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        if not self.kv_cache_memory_gb > 0:
            raise ConfigError("kv_cache_memory_gb", f"must be > 0, got {self.kv_cache_memory_gb}")

    @property
    def memory_bytes(self) -> int:
        return int(self.kv_cache_memory_gb * (1 << 30))


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
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")


def _optional(parse):
    return lambda value, path: None if value is None else parse(value, path)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; each component receives only its part."""

    model: str  # checkpoint folder (config.json, *.safetensors, tokenizer.json)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda[:N]"
    dtype: str = "auto"  # "auto" (the device's best), "float32", "bfloat16", "float16" (or short names)
    max_model_len: int | None = None  # context limit; None = the model's max_position_embeddings
    seed: int = 0  # seed of the engine's generator for unseeded sampling
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    experts: PluginSection = field(default_factory=lambda: PluginSection("local"),
                                   metadata={"parse": EXPERT_BACKENDS.parse})  # MoE expert backend
    speculative: PluginSection | None = field(default=None, metadata={"parse": _optional(PROPOSERS.parse)})
    quantization: PluginSection = field(default_factory=lambda: PluginSection("none"),
                                        metadata={"parse": QUANTIZERS.parse})  # weight quantizer

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model", "must be a non-empty path")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError("device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"unknown dtype {self.dtype!r}; use auto or one of {sorted(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, Any] | None = None, path: str = "") -> "EngineConfig":
        """The config of ``model`` from flat or nested options (see the module docstring)."""
        return cls(model=str(model)).with_options(options, path)

    def with_options(self, options: Mapping[str, Any] | None, path: str = "") -> "EngineConfig":
        """This config with ``options`` applied (a per-role override), validated like ``from_options``."""
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(path, f"must be a mapping, got {type(options).__name__}")
        top, sections = _group(dict(options or {}), path)
        values = {}
        for name, (data, flat) in sections.items():
            values[name] = _build_section(getattr(self, name), data, flat, path, name)
        hints = _hints()
        for key, (value, written) in top.items():
            values[key] = parse_field(hints[key], _dtype_name(key, value), join(path, written),
                                      _FIELDS[key].metadata, getattr(self, key))
        return construct(EngineConfig, values, path, self)


def _dtype_name(key: str, value: Any) -> Any:
    """``LLM(dtype=torch.bfloat16)`` is accepted as the name it has in ``DTYPES``."""
    if key == "dtype" and isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig}
_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_FLAT = {f.name: name for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}  # field -> section
_ALIASES = {"speculative_config": "speculative"}  # vLLM's keyword names


def _hints() -> dict:
    return typing.get_type_hints(EngineConfig)


def _group(options: dict, path: str) -> tuple[dict, dict]:
    """Split options into ``{field: (value, key as written)}`` and ``{section: (fields, names given flat)}``."""
    top, sections = {}, {}
    for written, value in options.items():
        key = _ALIASES.get(written, written)
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(join(path, key), f"must be a mapping, got {type(value).__name__}")
            data, flat = sections.setdefault(key, ({}, set()))
            _put(data, dict(value), path, key)
        elif key in _FLAT:
            data, flat = sections.setdefault(_FLAT[key], ({}, set()))
            _put(data, {key: value}, path, _FLAT[key])
            flat.add(key)
        elif key in _FIELDS and key != "model":
            top[key] = (value, written)
        else:
            known = sorted(set(_FIELDS) - {"model"} | set(_FLAT) | set(_ALIASES))
            raise ConfigError(join(path, str(key)), f"unknown engine option; known: {known}")
    return top, sections


def _put(data: dict, new: dict, path: str, section: str) -> None:
    for key, value in new.items():
        if key in data:
            raise ConfigError(join(path, key), f"given twice (flat and inside {section})")
        data[key] = value


def _build_section(base: Any, data: dict, flat: set[str], path: str, section: str) -> Any:
    """``base`` with ``data`` applied; a field given flat is named by its flat path."""
    cls = type(base)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    where = {k: join(path, k) if k in flat else join(join(path, section), k) for k in data}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(where[key], f"unknown key; known: {sorted(fields)}")
        values[key] = parse_field(hints[key], value, where[key], fields[key].metadata)
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as exc:
        prefix = path if exc.path in flat else join(path, section)
        raise exc.under(prefix) from None


# dtype auto on CPU follows cpu_auto_dtype (bf16 weights and KV on AVX512_BF16 / AMX-BF16 CPUs for
# the models the bf16 kernels take, fp32 elsewhere). It was off while the fresh-clone CI of 32c519b
# failed the Redis prefix tier with bf16 by default; the blocks were written, but the tests assumed
# fp32 (keys hashed with an fp32 seed, fp32 blocks handed to a bf16 store, which wrote blobs its own
# reader then rejected). The store now writes in its layout's dtype and bf16 blocks round-trip bit
# for bit (tests/integration/test_prefix_store_dtypes.py). False pins auto to fp32 on CPU.
CPU_AUTO_BF16 = True


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype this process runs ``config`` on: ``device: auto`` is CUDA when a GPU is
    present, else CPU; ``dtype: auto`` is bf16 on CUDA, and on CPU ``cpu_auto_dtype`` of the
    checkpoint's config (bf16 on CPUs that multiply bf16 natively, for the models the bf16
    kernels take; fp32 elsewhere)."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto" and device == "cpu" and CPU_AUTO_BF16:
        return torch.device(device), cpu_auto_dtype(ModelConfig.from_path(config.model), cpu_features())
    return torch.device(device), parse_dtype(config.dtype, device)


def cpu_auto_dtype(model: ModelConfig, features: CpuFeatures) -> torch.dtype:
    """``dtype: auto`` on CPU: bf16 weights and KV where the CPU has AVX512_BF16 or AMX-BF16
    (``auto_cpu_dtype``) and the model runs on the bf16 kernels (cpu_backend.bf16_kernels_fit:
    dense, head_dim a multiple of 8 up to 512); fp32 otherwise. MoE models stay fp32: their bf16
    path is plain torch, and the expert kernels and the offload tier are fp32.

    Measured, SmolLM2-135M (dense, head_dim 64), fp32 vs bf16 engines in one process,
    alternating, 1 thread, CPU time per step (so the shared box's load does not count), 128-token
    prompts -> 32 tokens (/tmp/s23/dtype_ab.py, AMD EPYC Zen 4, avx512-bf16, 2 cores,
    2026-12-03 08:42 UTC, 2 rounds): batch 1 24.6 / 27.9 -> 16.4 / 14.1 ms, batch 8 53.1 / 44.9
    -> 32.0 / 29.2, batch 32 265 / 253 -> 166 / 162; a 1,024-token prompt 2.81 / 2.58 -> 1.67 /
    1.85 s. On AVX2-only CPUs bf16 weights are widened in registers and torch's bf16 prompt GEMM
    is emulated (~7x slower than fp32), so fp32 stays."""
    dense = not model.is_moe and model.head_dim % 8 == 0 and model.head_dim <= 512
    return auto_cpu_dtype(features) if dense else torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map "float32"/"bfloat16"/"float16"/"auto" (or None) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
