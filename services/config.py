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
