"""Per process: which replicas each worker deployment has, as the handles' request routers see them.

Filled by ``router.replica_router.TargetedRequestRouter`` (which Serve builds inside each
deployment handle), read by ``router.channels.WorkerDispatch``. Kept apart from the router
class because Serve pickles that class's module by value: a registry there would be a copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica of a worker deployment and its last routing stats (services/routing_report.py)."""

    replica_id: str  # Serve replica id (unique_id)
    stats: dict[str, Any] = field(default_factory=dict)  # {"load", "kv_free", "block_keys"}; {} before the first report


class ReplicaDirectory:
    """Per process: deployment name -> the request router Serve built for it."""

    _lock = threading.Lock()
    _routers: dict[str, Any] = {}

    @classmethod
    def register(cls, name: str, router: Any) -> None:
        with cls._lock:
            cls._routers[name] = router

    @classmethod
    def replicas(cls, name: str) -> list[ReplicaInfo]:
        """The deployment's current replicas as this process's handles see them ([] until known)."""
        with cls._lock:
            router = cls._routers.get(name)
        if router is None:
            return []
        return [ReplicaInfo(r.replica_id.unique_id, dict(r.routing_stats or {})) for r in router.replica_list()]


