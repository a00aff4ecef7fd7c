"""Worker side of the token channel: one stream per router replica instead of one per request.

A Serve streaming call costs 0.5-0.7 ms per streamed item (DESIGN.md "Facts measured"); at
concurrency 32 an engine step yields 32 tokens for 32 requests, so one stream per request
costs 32 items per step. Here each router replica keeps one long-lived ``channel`` call open
to each worker replica, and per engine step the worker sends one ``ChunkBatch`` holding the
new output of every request of that router.

Requests themselves are unary ``submit`` calls that last as long as the request and return
nothing: Serve still counts one ongoing request per request (autoscaling, max_ongoing_requests),
cancelling the call still cancels the worker coroutine (the engine aborts the request and frees
its blocks before the next step), and a dead replica still fails the call (UNAVAILABLE).
The call's chunks go to its router's ``Outbox``; the channel drains it.

Terms: outbox = the chunks waiting for one router's channel, at most one (merged) chunk per
request, so a slow reader gets fewer, larger chunks and never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from services.engine.outputs import merge_chunks  # the one merge rule (also the router's inbox)
from services.types import ChunkBatch, Route, StreamChunk, WrongReplicaError

log = logging.getLogger("tandem.worker")


class Outbox:
    """Chunks waiting for one router's channel (see module docstring)."""

    def __init__(self):
        self.pending: dict[str, StreamChunk] = {}
        self.ready = asyncio.Event()

    def put(self, request_id: str, chunk: StreamChunk) -> None:
        prev = self.pending.get(request_id)
        self.pending[request_id] = chunk if prev is None else merge_chunks(prev, chunk)
        self.ready.set()

    def take(self) -> list[tuple[str, StreamChunk]]:
        items, self.pending = list(self.pending.items()), {}
        self.ready.clear()
        return items


class ChannelHub:
    """The outboxes of one worker replica, keyed by router id."""

    def __init__(self, replica_id: str):
        self.replica_id = replica_id
        self.outboxes: dict[str, Outbox] = {}

    def check(self, route: Route) -> None:
        """Raise ``WrongReplicaError`` when a call routed for another replica landed here."""
        if route.replica_id and self.replica_id and route.replica_id != self.replica_id:
            raise WrongReplicaError(f"call for replica {route.replica_id} reached {self.replica_id}")

    def outbox(self, router_id: str) -> Outbox:
        box = self.outboxes.get(router_id)
        if box is None:
            box = self.outboxes[router_id] = Outbox()
        return box

    async def pump(self, route: Route, request_id: str, source: AsyncIterator[StreamChunk]) -> None:
        """Forward one request's chunks to its router's outbox until the last one.

        Cancelled (the router cancelled the submit call): the cancellation reaches ``source``,
        whose engine stream aborts the request.
        """
        box = self.outbox(route.router_id)
        async for chunk in source:
            box.put(request_id, chunk)

    async def stream(self, route: Route) -> AsyncIterator[ChunkBatch]:
        """The channel: one ``ChunkBatch`` each time chunks are waiting, until the router closes it."""
        self.check(route)
        box = self.outbox(route.router_id)
        log.info("channel from router %s open", route.router_id)
        try:
            while True:
                await box.ready.wait()
                items = box.take()
                if items:
                    yield ChunkBatch(items)
        finally:
            log.info("channel from router %s closed", route.router_id)
