"""Per process: which replicas each worker deployment has, as the handles' request routers see them.

Filled by ``router.replica_router.TargetedRequestRouter`` (which Serve builds inside each
deployment handle), read by ``router.channels.WorkerDispatch``. Kept apart from the router
class because Serve pickles that class's module by value: a registry there would be a copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from services.types import RoutingStats


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica of a worker deployment and its last routing stats (services/routing_report.py)."""

    replica_id: str  # Serve replica id (unique_id)
    stats: RoutingStats = RoutingStats()  # its last report (all zero before the first one)


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
        # Serve passes the report on as the dict the replica returned (RoutingStats.as_dict)
        return [ReplicaInfo(r.replica_id.unique_id, RoutingStats.from_dict(r.routing_stats))
                for r in router.replica_list()]


