"""A Serve request router that sends a call to the replica the Tandem router chose.

Serve picks replicas inside each deployment handle (power of two choices by default). The
Tandem router wants to choose itself (prefix match and load: router/prefix_routing.py) and
must know where each request runs (its chunks arrive on that replica's channel:
router/channels.py). So worker deployments use ``TargetedRequestRouter``:

- a call with a ``route`` keyword argument whose ``replica_id`` is a current replica goes
  exactly there (``choose_replicas`` returns that one replica);
- any other call (admin calls, or a target that just left the replica set) falls back to
  power of two choices; the worker rejects a mis-delivered ``submit`` (``WrongReplicaError``)
  and the router chooses again.

Serve constructs the request router itself, inside the handle, possibly on the handle's own
event-loop thread. To let the Tandem router read the replica set and each replica's routing
stats, each instance registers itself in ``ReplicaDirectory`` under its deployment name; the
reads take an immutable snapshot (Serve replaces its replica list, never mutates it).
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica

from router.replica_directory import ReplicaDirectory

STATS_PERIOD_S = 1.0  # how often each worker replica reports load and cached block keys


class TargetedRequestRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices, except for calls that name their replica (module docstring)."""

    def initialize_state(self, **kwargs):
        super().initialize_state(**kwargs)
        ReplicaDirectory.register(self._deployment_id.name, self)

    def replica_list(self) -> list[RunningReplica]:
        return self._replicas_list

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        target = getattr(route, "replica_id", "")
        if target:
            for r in candidate_replicas:
                if r.replica_id.unique_id == target:
                    return [[r]]
        return await super().choose_replicas(candidate_replicas, pending_request)


def request_router_config() -> RequestRouterConfig:
    """The ``request_router_config`` of every worker deployment (set by router/app.py)."""
    return RequestRouterConfig(request_router_class=TargetedRequestRouter,
                               request_routing_stats_period_s=STATS_PERIOD_S,
                               request_routing_stats_timeout_s=5.0)
