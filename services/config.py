"""Configuration of one worker replica, validated once at the edge (the app builder) and passed
whole through the Serve handle to the replica."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.config import EngineConfig
from services.engine.config_parse import ConfigError
from services.engine.plugins import PluginSection
from services.kv_transfer import KV_TRANSFERS
from services.prefix_store.config import PrefixStoreConfig

ROLES = ("unified", "prefill", "decode")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker replica needs."""

    role: str  # "unified" | "prefill" | "decode"
    model_id: str  # id clients use for the model
    engine: EngineConfig  # the engine of this role (its model path included), validated
    kv_transfer: PluginSection = field(default_factory=lambda: PluginSection("ray"),
                                       metadata={"parse": KV_TRANSFERS.parse})  # KVTransfer backend (P/D roles)
    adopt_timeout_s: float = 30.0  # decode: how long to wait for KV blocks before RESOURCE_EXHAUSTED
    kv_hold_s: float = 60.0  # prefill: release a sent KV payload nobody adopted after this long
    torch_threads: int | None = None  # intra-op threads; None = every core of the node (Ray would set 1)
    prefix_store: PrefixStoreConfig | None = None  # Redis tier of the prefix cache; None = local tier only

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError("role", f"must be one of {ROLES}, got {self.role!r}")

    @property
    def model(self) -> str:
        """The checkpoint this worker serves."""
        return self.engine.model


@dataclass(frozen=True)
class DraftWorkerConfig:
    """Everything one DraftWorker replica needs (services/draft_worker.py).

    ``target`` is the engine the drafts are for (its ``speculative`` section names this
    deployment): the draft checks the target's tokenizer, sizes its KV pool like the target's
    and runs on the target's device and dtype, exactly as an in-process draft would.
    """

    name: str  # the deployment's name (speculative.deployment)
    target: EngineConfig  # the target engine's config; target.speculative is the draft_model section
    session_ttl_s: float = 60.0  # a sequence no call mentioned for this long is dropped (its engine died)
    torch_threads: int | None = None  # intra-op threads; None = every core of the node

    def __post_init__(self) -> None:
        spec = self.target.speculative
        if spec is None or spec.name != "draft_model" or spec.options.deployment != self.name:
            raise ConfigError("speculative.deployment", f"the target's speculative section must be draft_model with "
                                                        f"deployment {self.name!r}")
        if isinstance(self.session_ttl_s, bool) or not isinstance(self.session_ttl_s, (int, float)) \
                or self.session_ttl_s <= 0:
            raise ConfigError("session_ttl_s", f"must be a positive number of seconds, got {self.session_ttl_s!r}")

    @property
    def draft(self):
        """The ``DraftModelOptions`` of the target's speculative section (model, k, KV pool)."""
        return self.target.speculative.options


@dataclass(frozen=True)
class ExpertWorkerConfig:
    """Everything one ExpertWorker replica needs (services/expert_worker.py): shard ``shard`` of
    the remote experts of ``target`` (an engine whose ``experts`` section is ``remote``), run on
    the target's device and dtype, as they would run in its process."""

    name: str  # the deployment's name (shard_names(target.experts.options)[shard])
    shard: int  # shard index: experts shard_ranges(E, num_shards)[shard] of every MoE layer
    target: EngineConfig  # the engine whose experts these are (its model path, device, dtype)
    torch_threads: int | None = None  # intra-op threads; None = every core of the node

    def __post_init__(self) -> None:
        from services.engine.model.expert_backends.remote import shard_names

        experts = self.target.experts
        if experts.name != "remote":
            raise ConfigError("experts.backend", f"the target's experts section must be remote, got {experts.name!r}")
        names = shard_names(experts.options)
        if isinstance(self.shard, bool) or not isinstance(self.shard, int) or not 0 <= self.shard < len(names):
            raise ConfigError("shard", f"must be a shard index in [0, {len(names)}), got {self.shard!r}")
        if self.name != names[self.shard]:
            raise ConfigError("name", f"shard {self.shard} is deployment {names[self.shard]!r}, got {self.name!r}")
        if self.torch_threads is not None and (isinstance(self.torch_threads, bool)
                                               or not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise ConfigError("torch_threads", f"must be a positive integer, got {self.torch_threads!r}")

    @property
    def options(self):
        """The ``RemoteOptions`` of the target's experts section (deployment, shards, timeout)."""
        return self.target.experts.options
