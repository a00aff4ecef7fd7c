"""Router side of the token channel, and the replica choice of one worker deployment.

See services/stream_channel.py for the worker side and why: per (router replica, worker
replica) one long-lived ``channel`` call streams a ``ChunkBatch`` per engine step; each
request is a unary ``submit`` call that lasts as long as the request.

- ``Inbox``: one request's chunks on the router, merged while the gRPC writer is busy.
- ``ReplicaLink``: the channel to one worker replica; dispatches batch entries to inboxes;
  when the channel breaks (the replica died), every inbox on it fails (UNAVAILABLE).
- ``WorkerDispatch``: one worker deployment as the router uses it: the replica set and
  routing stats (router/replica_router.py), the choice (router/prefix_routing.py), the
  links, and ``run`` (submit one request, yield its chunks).

A replica whose channel broke (it died or left) is not chosen again while it is still in the
replica set Serve reports (Serve notices a dead replica seconds later); with no other replica,
``choose`` raises ``NoReplicaError`` (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet

from router.errors import unwrap
from router.prefix_routing import BalanceConfig, ReplicaView, choose_replica, unpack_keys
from router.replica_directory import ReplicaDirectory, ReplicaInfo
from services.engine.outputs import merge_chunks
from services.types import Route, StreamChunk, WrongReplicaError

log = logging.getLogger("tandem.router")
FINISH_GRACE_S = 10.0  # after a submit returned, how long its last chunk may take on the channel
REPLICAS_WAIT_S = 30.0  # how long to wait for a deployment's first replica list
BROKEN_FOR_S = 30.0  # how long a replica whose channel broke is not chosen (unless it leaves the set first)


class NoReplicaError(ConnectionError):
    """No replica of the deployment may take the request now (none known, or all failed it)."""


class Inbox:
    """One request's chunks (merged while unread), or the error that ended it."""

    __slots__ = ("chunk", "error", "_waiter")

    def __init__(self):
        self.chunk: StreamChunk | None = None
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, chunk: StreamChunk) -> None:
        self.chunk = chunk if self.chunk is None else merge_chunks(self.chunk, chunk)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> StreamChunk:
        """The chunks that arrived since the last call (merged); raises the error once none are left."""
        while self.chunk is None:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk, self.chunk = self.chunk, None
        return chunk


class ReplicaLink:
    """The channel from this router to one worker replica."""

    def __init__(self, handle, router_id: str, replica_id: str, on_broken=None):
        self.replica_id = replica_id
        self._on_broken = on_broken  # called with the replica id when the channel broke (not when closed)
        self.inboxes: dict[str, Inbox] = {}
        self.closed = False
        self.retired = False  # the replica left the set (draining): close once its requests ended
        self._response = handle.options(stream=True).channel.remote(route=Route(router_id, replica_id))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        error: BaseException = ConnectionError(f"channel to replica {self.replica_id} ended")
        try:
            async for batch in self._response:
                inboxes = self.inboxes
                now = time.time()  # arrival at the router: the router dwell starts here
                for rid, chunk in batch.chunks:
                    box = inboxes.get(rid)
                    if box is not None:
                        chunk.arrived_at = now
                        box.put(chunk)
        except asyncio.CancelledError:
            error = ConnectionError(f"channel to replica {self.replica_id} closed")
            raise
        except Exception as exc:  # the replica died or left: its requests fail (UNAVAILABLE)
            error = exc if isinstance(unwrap(exc), (WrongReplicaError, ConnectionError)) else ConnectionError(
                f"channel to replica {self.replica_id} broke: {type(unwrap(exc)).__name__}")
            log.warning("channel to replica %s broke: %s", self.replica_id, type(unwrap(exc)).__name__)
            if self._on_broken is not None and not isinstance(unwrap(exc), WrongReplicaError):
                self._on_broken(self.replica_id)
        else:  # the stream ended: the replica is shutting down
            if self._on_broken is not None:
                self._on_broken(self.replica_id)
        finally:
            self.closed = True
            for box in list(self.inboxes.values()):
                box.fail(error)

    def close(self) -> None:
        self._response.cancel()
        self._task.cancel()


class WorkerDispatch:
    """One worker deployment as seen from one router replica (module docstring)."""

    def __init__(self, handle, balance: BalanceConfig = BalanceConfig(), router_id: str | None = None):
        self.handle = handle
        self.name = handle.deployment_name
        self.balance = balance
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self.links: dict[str, ReplicaLink] = {}
        self.inflight: Counter[str] = Counter()  # replica id -> this router's requests there now
        self._keys: dict[str, tuple[bytes, frozenset[int]]] = {}  # replica id -> (reported bytes, unpacked)
        self.broken: dict[str, float] = {}  # replica id -> monotonic time its channel broke (see BROKEN_FOR_S)
        self._rotation = itertools.count()

    # ---- replica choice ------------------------------------------------------------------
    async def replicas(self, wait: bool = True) -> list[ReplicaInfo]:
        """The current replicas (``wait``: for the first list, up to REPLICAS_WAIT_S; raises
        ``NoReplicaError`` if none)."""
        infos = ReplicaDirectory.replicas(self.name)
        end = time.monotonic() + REPLICAS_WAIT_S
        while not infos:  # the handle learns its replicas after its first call
            if not wait or time.monotonic() > end:
                raise NoReplicaError(f"no replica of {self.name} is known")
            await asyncio.wait_for(self.handle.model_info.remote(), REPLICAS_WAIT_S)
            infos = ReplicaDirectory.replicas(self.name)
            if not infos:
                await asyncio.sleep(0.05)
        self._forget_gone({r.replica_id for r in infos})
        return infos

    def _forget_gone(self, current: set[str]) -> None:
        for rid in [r for r in self.links if r not in current]:
            link = self.links.pop(rid)
            link.retired = True  # a draining replica finishes its requests: keep their channel till then
            if not link.inboxes:
                link.close()
        for rid in [r for r in self._keys if r not in current]:
            del self._keys[rid]
        now = time.monotonic()
        for rid in [r for r, t in self.broken.items() if r not in current or now - t > BROKEN_FOR_S]:
            del self.broken[rid]

    def _mark_broken(self, replica_id: str) -> None:
        self.broken[replica_id] = time.monotonic()

    def _view(self, info: ReplicaInfo) -> ReplicaView:
        data = info.stats.block_keys
        cached = self._keys.get(info.replica_id)
        if cached is None or cached[0] is not data:
            cached = self._keys[info.replica_id] = (data, unpack_keys(data))
        return ReplicaView(info.replica_id, self.inflight[info.replica_id], info.stats.load, cached[1])

    async def choose(self, prompt_keys: Sequence[int] = (), hint: str = "", exclude: AbstractSet[str] = frozenset()
                     ) -> str:
        """The replica for a request: ``hint`` when it names a current replica, else the policy;
        never one in ``exclude`` or ``broken``: ``NoReplicaError`` when no other is left. A request
        that excludes replicas (it lost one) does not wait for a replica to appear."""
        known = await self.replicas(wait=not exclude)
        infos = [r for r in known if r.replica_id not in exclude and r.replica_id not in self.broken]
        if not infos:
            raise NoReplicaError(f"no live replica of {self.name} can take the request")
        if hint:
            if any(r.replica_id == hint for r in infos):
                return hint
            if not any(r.replica_id == hint for r in known):  # (a failed one is ignored silently)
                log.warning("replica hint %s is not a current replica of %s; ignored", hint, self.name)
        choice = choose_replica([self._view(r) for r in infos], prompt_keys, self.balance, next(self._rotation))
        return choice.replica_id

    def route(self, replica_id: str, traceparent: str = "") -> Route:
        return Route(self.router_id, replica_id, traceparent)

    # ---- one request ---------------------------------------------------------------------
    def _link(self, replica_id: str) -> ReplicaLink:
        link = self.links.get(replica_id)
        if link is None or link.closed:
            link = self.links[replica_id] = ReplicaLink(self.handle, self.router_id, replica_id,
                                                                self._mark_broken)
        return link

    async def run(self, call, request_id: str, ctl, replica_id: str) -> AsyncIterator[StreamChunk]:
        """Submit ``call`` (``GenerateCall`` or ``DecodeCall``) to ``replica_id``; yield its chunks.

        A mis-delivered submit (the replica left the set) raises ``WrongReplicaError`` before any
        chunk; the caller may choose again. Leaving early cancels the submit (the worker aborts).
        """
        link = self._link(replica_id)
        box = link.inboxes[request_id] = Inbox()
        if link.closed:  # the channel broke between _link and now
            box.fail(ConnectionError(f"channel to replica {replica_id} closed"))
        self.inflight[replica_id] += 1
        response = self.handle.submit.remote(call, route=self.route(replica_id, getattr(call, "traceparent", "")))
        ctl.attach(response)
        watcher = asyncio.get_running_loop().create_task(_watch(response, box))
        finished = False
        try:
            while not finished:
                chunk = await box.get()
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            ctl.detach(response)
            if not finished:
                response.cancel()
            watcher.cancel()
            link.inboxes.pop(request_id, None)
            if link.retired and not link.inboxes:
                link.close()
            self.inflight[replica_id] -= 1
            if self.inflight[replica_id] <= 0:
                del self.inflight[replica_id]


async def _watch(response, box: Inbox) -> None:
    """Fail the inbox with the submit call's error; after a normal return, give the last chunk
    ``FINISH_GRACE_S`` to arrive on the channel."""
    try:
        await response
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise  # the request ended on the router: nothing to report
        box.fail(asyncio.CancelledError())
        return
    except Exception as exc:
        box.fail(exc)
        return
    await asyncio.sleep(FINISH_GRACE_S)
    box.fail(ConnectionError("the channel lost the last chunk of the request"))


def is_wrong_replica(exc: BaseException) -> bool:
    return isinstance(unwrap(exc), WrongReplicaError)
