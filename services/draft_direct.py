"""Plain Ray actor calls to a DraftWorker replica, skipping the Serve handle.

Why (measured 2026-12-03 on the 2-core box, loaded, tiny Llama draft, one sequence, k=3): a
``propose`` through the Serve handle took 7.6-8.4 ms (p50; a no-op handle call 5.8 ms) where
the drafting itself took 1.8 ms; a no-op plain actor call took 1.1 ms. The handle's cost is its
request router (its own event loop and thread), the replica's hand-over to the user-code thread
and the executor hop. A plain actor call, waited on from the engine thread itself, has none.

Serve still owns the deployment: it places, health-checks, replaces and scales the replicas,
and the first call (and every call after a failure) goes through the handle. Each answer names
the replica's Ray actor (``DraftReply.actor``: ``ray.get_runtime_context()``); ``DirectCalls``
looks it up once (``ray.get_actor``) and sends the next calls to it as
``actor.__ray_call__.remote(propose_on_replica, call)``. ``propose_on_replica`` runs in the
replica's process and finds the ``DraftWorker`` through ``serve.get_replica_context()``. When
that replica dies or cannot be reached the client forgets it and goes back to the handle,
which routes to a live replica (and that answer names the new actor).

Cost on the replica: a direct call runs on the replica actor's event loop and blocks it while
its call is drafted (right there, no hand-over to the draft thread; a lock orders it with the
handle calls' batches, which run on the draft thread). Calls
from several engines are drafted one after the other, not batched together; Serve's
ongoing-request count does not see direct calls (the DraftWorker has no autoscaling config).
"""

from __future__ import annotations

import logging

import ray
from ray import serve

from services.types import DraftCall, DraftReply

log = logging.getLogger("tandem.draft")


def propose_on_replica(replica_actor, call: DraftCall) -> DraftReply:
    """``__ray_call__`` target (runs in the DraftWorker replica's process): the answer to ``call``."""
    return serve.get_replica_context().servable_object.propose_now(call)


class DirectCalls:
    """The client's side: the replica it calls directly (or none), and the blocking call."""

    def __init__(self):
        self.replica_id = ""  # the Serve replica the actor below belongs to ("" = none yet)
        self.actor = None  # its Ray actor handle

    def ready(self, replica_id: str) -> bool:
        """Whether the next call to ``replica_id`` can go directly."""
        return self.actor is not None and bool(replica_id) and replica_id == self.replica_id

    def bind(self, reply: DraftReply) -> None:
        """After an answer: call the replica that gave it directly from now on (a lookup when it
        is a new one; a failed lookup leaves the calls on the handle)."""
        namespace, name = reply.actor
        if not name or (self.actor is not None and reply.replica_id == self.replica_id):
            return
        try:
            self.actor = ray.get_actor(name, namespace=namespace)
            self.replica_id = reply.replica_id
        except Exception as exc:
            log.info("DraftWorker actor %s/%s not found (%s); calls stay on the Serve handle", namespace, name,
                     type(exc).__name__)
            self.forget()

    def forget(self) -> None:
        self.actor, self.replica_id = None, ""

    def propose(self, call: DraftCall, timeout_s: float) -> DraftReply:
        """One call, waited on here for at most ``timeout_s`` (TimeoutError after that; the call
        is cancelled, and its ``deadline`` makes a late one draft nothing)."""
        ref = self.actor.__ray_call__.remote(propose_on_replica, call)
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            try:
                ray.cancel(ref)
            except Exception:
                pass
            raise
