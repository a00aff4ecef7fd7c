"""``experts: offload``: a byte budget of hot experts per layer over a slower tier.

    experts: {backend: offload, cache_bytes: 2147483648}     # or resident_fraction: 0.5

Each MoE layer gets ``num_slots`` expert slots on the model's device (the budget split evenly
over the MoE layers); every expert stays in the slower tier (services/engine/model/
expert_offload/store.py: the safetensors file on a CPU host, CPU memory on a GPU host) and is
copied into a slot when a step routes tokens to it. While layer l computes, the next MoE
layer's router is applied to layer l's input and the experts it ranks highest are loaded into
that layer's slots by a background thread (prefetch); layer l+1 waits for that load before it
looks at its cache. Misses of one step are loaded in one batch.

Outputs are bit-identical to ``local``: each expert's rows run the same two GEMMs on weights of
the same layout (``run_expert``), whatever slot they sit in and in whatever order the experts
are visited (each writes only its own rows of ``y``).

Resident memory: the slots (``num_slots`` x expert bytes per layer), nothing per expert; the
file tier reads with ``preadv`` into the slots and keeps no mapping.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.engine.config_parse import ConfigError
from services.engine.model.expert_backends import EXPERT_BACKENDS
from services.engine.model.expert_offload.cache import ExpertCache
from services.engine.model.expert_offload.policies import DEFAULT_POLICY, POLICIES
from services.engine.model.expert_offload.store import ExpertStore, FileStore, HostStore, OpenFiles
from services.engine.model.experts import (ExpertBackend, ExpertGroups, ExpertLayerStats, ExpertSource, ExpertSpec,
                                           Router, run_expert)
from services.engine.plugins import HostDeps

TIERS = ("auto", "file", "host")


@dataclass(frozen=True)
class OffloadOptions:
    """The budget and behaviour of the hot-expert cache (set exactly one of the two budgets)."""

    cache_bytes: int | None = None  # expert weight bytes resident over all MoE layers (split evenly)
    resident_fraction: float | None = None  # or: this share of each layer's experts (rounded, at least 1)
    policy: str = DEFAULT_POLICY  # eviction: lru | lfu | decay (default; measured: expert_offload/policies.py)
    prefetch: bool = True  # load the next layer's predicted experts while this layer computes
    tier: str = "auto"  # slower tier: file (safetensors, CPU), host (CPU memory); auto = file on CPU, else host
    trace_steps: int = 1024  # steps of routing trace kept per layer for the oracle hit rate (0 = none)

    def __post_init__(self) -> None:
        if (self.cache_bytes is None) == (self.resident_fraction is None):
            raise ConfigError("cache_bytes", "set exactly one of cache_bytes or resident_fraction")
        if self.cache_bytes is not None and self.cache_bytes < 1:
            raise ConfigError("cache_bytes", f"must be >= 1, got {self.cache_bytes}")
        if self.resident_fraction is not None and not 0 < self.resident_fraction <= 1:
            raise ConfigError("resident_fraction", f"must be in (0, 1], got {self.resident_fraction}")
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"unknown policy {self.policy!r}; one of {sorted(POLICIES)}")
        if self.tier not in TIERS:
            raise ConfigError("tier", f"must be one of {list(TIERS)}, got {self.tier!r}")
        if self.trace_steps < 0:
            raise ConfigError("trace_steps", f"must be >= 0, got {self.trace_steps}")


def expert_bytes(spec: ExpertSpec) -> int:
    """Bytes of one expert in the compute dtype: gate, up [I, D] and down [D, I]."""
    return 3 * spec.intermediate_size * spec.hidden_size * torch.empty(0, dtype=spec.dtype).element_size()


def num_slots(options: OffloadOptions, spec: ExpertSpec) -> int:
    """Expert slots of one layer under ``options``; ValueError when the budget holds none."""
    if options.resident_fraction is not None:
        return max(1, min(spec.num_experts, round(options.resident_fraction * spec.num_experts)))
    per_expert = expert_bytes(spec)
    slots = options.cache_bytes // (spec.num_moe_layers * per_expert)
    if slots < 1:
        raise ValueError(f"experts.cache_bytes: {options.cache_bytes} bytes hold no expert per MoE layer: one "
                         f"expert is {per_expert} bytes and the model has {spec.num_moe_layers} MoE layers, so at "
                         f"least {spec.num_moe_layers * per_expert}")
    return min(spec.num_experts, slots)


class OffloadRuntime:
    """The ``ExpertFactory`` of one model under ``offload``: builds every layer's backend and
    runs the prefetcher (one background thread) and the shared file descriptors."""

    def __init__(self, options: OffloadOptions):
        self.options = options
        self.files = OpenFiles()
        self.layers: dict[int, OffloadExperts] = {}  # decoder layer -> its backend
        self._next: dict[int, int] = {}  # MoE layer -> the next MoE layer
        self._pending: dict[int, Future] = {}  # layer -> its prefetch in flight
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if options.prefetch else None
        weakref.finalize(self, _shutdown, self.files, self._pool)

    def __call__(self, spec: ExpertSpec) -> "OffloadExperts":
        backend = OffloadExperts(spec, self)
        if self.layers:
            self._next[max(self.layers)] = spec.layer
        self.layers[spec.layer] = backend
        return backend

    def wait(self, layer: int) -> None:
        """Block until the prefetch into ``layer`` (if any) is done; re-raises its error."""
        pending = self._pending.pop(layer, None)
        if pending is not None:
            pending.result()

    def prefetch_after(self, layer: int, hidden: torch.Tensor) -> None:
        """Start loading what the next MoE layer's router predicts for ``hidden`` [T, D]."""
        nxt = self._next.get(layer)
        if self._pool is None or nxt is None or nxt in self._pending:
            return
        backend = self.layers[nxt]
        ids, _ = backend.route(hidden)  # [T, k]
        counts = torch.bincount(ids.flatten(), minlength=backend.spec.num_experts)
        ranked = [e for e in torch.argsort(counts, descending=True, stable=True).tolist() if counts[e] > 0]
        self._pending[nxt] = self._pool.submit(_prefetch, backend.cache, ranked)


def _prefetch(cache: ExpertCache, ranked: list[int]) -> None:
    with torch.no_grad():
        cache.prefetch(ranked)


def _shutdown(files: OpenFiles, pool: ThreadPoolExecutor | None) -> None:
    if pool is not None:
        pool.shutdown(wait=True)
    files.close()


class OffloadExperts(ExpertBackend):
    """One MoE layer's experts under ``offload``: ``gate_up`` [S, 2I, D] and ``down`` [S, D, I]
    slots on the model's device, an ``ExpertCache`` over them, and the slower tier's store."""

    name = "offload"

    def __init__(self, spec: ExpertSpec, runtime: OffloadRuntime):
        super().__init__(spec)
        self.runtime = runtime
        s, d, i = num_slots(runtime.options, spec), spec.hidden_size, spec.intermediate_size
        self.register_buffer("gate_up", torch.empty(s, 2 * i, d, dtype=spec.dtype), persistent=False)
        self.register_buffer("down", torch.empty(s, d, i, dtype=spec.dtype), persistent=False)
        self.cache = ExpertCache(s, expert_bytes(spec), POLICIES[runtime.options.policy](), self._fill,
                                 runtime.options.trace_steps)
        self.store: ExpertStore | None = None  # chosen at the first install (the slots' device is known then)
        self.route: Router | None = None  # this layer's router (the previous layer's prefetch calls it)

    def attach_router(self, route: Router) -> None:
        self.route = route

    def install_expert(self, expert: int, source: ExpertSource) -> None:
        if self.store is None:
            self.store = self._make_store(source)
        self.store.put(expert, source)

    def load_expert(self, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        self.install_expert(expert, ExpertSource(lambda: (gate, up, down)))

    def _make_store(self, source: ExpertSource) -> ExpertStore:
        device, tier = self.gate_up.device, self.runtime.options.tier
        if tier == "auto":
            tier = "file" if device.type == "cpu" and source.locations is not None else "host"
        if tier == "file":
            return FileStore(self.runtime.files, self.spec.intermediate_size)
        return HostStore(self.spec.dtype, pin=device.type == "cuda")

    @torch.no_grad()
    def _fill(self, pairs: list[tuple[int, int]]) -> None:
        for expert, slot in sorted(pairs):
            self.store.read_into(expert, self.gate_up[slot], self.down[slot])

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.runtime.wait(self.spec.layer)
        groups = ExpertGroups.of(hidden, topk_ids, self.spec.num_experts)
        self.runtime.prefetch_after(self.spec.layer, hidden)
        for expert, slot in self.cache.acquire(list(groups.rows)):
            run_expert(groups.x, groups.y, groups.rows[expert], self.gate_up[slot], self.down[slot])
        return groups.combine(hidden, topk_weights)

    def stats(self) -> ExpertLayerStats:
        c = self.cache
        uses, hits, oracle = c.window()
        return ExpertLayerStats(self.spec.layer, self.name, c.hits, c.misses, c.prefetch_loads, c.prefetch_hits,
                                c.bytes_loaded, c.resident_bytes, c.num_slots * c.expert_bytes, uses, hits, oracle)


@EXPERT_BACKENDS.register("offload", options=OffloadOptions)
def offload_experts(options: OffloadOptions, deps: HostDeps) -> OffloadRuntime:
    return OffloadRuntime(options)
