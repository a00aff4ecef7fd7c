"""The engine's side of a DraftWorker deployment: a ``Proposer`` whose drafts come from it.

``speculative: {method: draft_model, model: PATH, deployment: NAME}`` in a worker's engine
config makes ``EngineWorker`` inject ``remote_proposers`` (``HostDeps.proposers``); the engine's
``draft_model`` factory then builds a ``RemoteDraftProposer`` instead of loading the draft.

Each engine step (``propose``, on the engine thread, under the step lock) is one handle call,
``DraftWorker.propose(DraftCall)``, carrying every asked sequence's delta (services/types.py:
the target's tokens since what the DraftWorker last said it holds, and how many of the last
draft were accepted) and the ids of sequences that ended since the previous call. It fails
closed: no answer within ``deployment_timeout_s`` (a slow, dead or restarting replica), an
error, or a malformed answer means this step has no drafts; after a failure the next
``deployment_retry_s`` run without asking. Never an error to a request, never a hang.

Two paths (``deployment_transport``). Through the Serve handle: the call is made from a small
event loop of this proposer's own (thread ``tandem-draft-client``), never from the replica's event
loop, which may itself be waiting for the step lock; the engine thread waits on a
``concurrent.futures.Future`` with the timeout. The calls name the replica that answered last
(``Route.replica_id``, router/replica_router.py), since that replica holds this engine's sequences
and their KV; when it is gone Serve picks another, which answers ``num_known = 0`` for every
sequence, and the next call sends whole contexts. ``direct`` (the default): once an answer names
its replica's actor, the calls to that replica are plain Ray actor calls waited on from the engine
thread (services/draft_direct.py: a few ms less per call); any failure other than a timeout goes
back to the handle path. Releases of finished sequences travel with the next call, or
``RELEASE_DELAY_S`` later on their own through the handle (batched).

Failures are counted by reason (``RemoteProposerStats``; ``tandem_spec_decode_draft_worker_*``):
timeout, unavailable (the replica's actor is dead or unreachable, or Serve has no replica), error
(anything else, a malformed answer included).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from services.engine.request import Request
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from services.draft_direct import DirectCalls
from services.engine.spec_decode.base import NO_DRAFT, Draft, Proposer, RemoteProposerStats, TargetInfo
from services.engine.spec_decode.draft_model import DraftModelOptions, common_prefix
from services.types import DraftCall, DraftProposal, DraftRelease, DraftReply, DraftSequence, Route

log = logging.getLogger("tandem.draft")
RELEASE_DELAY_S = 0.05  # finished sequences wait this long for a propose call to carry them
RELEASE_TIMEOUT_S = 5.0  # a release call that takes longer is given up (the DraftWorker's TTL frees them)
# a replica (or every replica) that is gone or unreachable: failures counted as "unavailable"
UNAVAILABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class ClientLoop:
    """An event loop on a daemon thread of its own, for handle calls made from the engine thread."""

    def __init__(self, name: str = "tandem-draft-client"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class RemoteDraftProposer(Proposer):
    """Drafts from a DraftWorker deployment (module docstring). ``handle``: its Serve handle
    (anything with ``propose.remote(call, route=)`` and ``release.remote(release, route=)``
    returning awaitables); ``direct``: plain actor calls once a replica is known (None = every
    call through the handle)."""

    def __init__(self, handle, options: DraftModelOptions, target: TargetInfo, client_id: str,
                 loop: ClientLoop | None = None, clock: Callable[[], float] = time.monotonic,
                 direct: DirectCalls | None = None):
        self.handle = handle
        self.direct = direct
        self.num_speculative_tokens = options.num_speculative_tokens
        self.timeout_s = options.deployment_timeout_s
        self.retry_s = options.deployment_retry_s
        self.vocab_size = target.model_config.vocab_size
        self.client_id = client_id
        self.loop = loop or ClientLoop()
        self.clock = clock
        self.stats = RemoteProposerStats()
        self.replica_id = ""  # the DraftWorker replica that holds this engine's sequences ("" = any)
        self.acked: dict[str, int] = {}  # request id -> target tokens the DraftWorker holds (ever sent: a key)
        self.last: dict[str, tuple[int, list[int]]] = {}  # request id -> (its num_tokens then, the draft received)
        self._released: list[str] = []  # sequences ended and not yet released there
        self._lock = threading.Lock()  # _released: appended on the engine thread, taken on either
        self._flush_scheduled = False
        self._retry_at = 0.0

    # ---- Proposer ------------------------------------------------------------------------
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> list[Draft]:
        if self.clock() < self._retry_at:
            self.stats.num_skipped_steps += 1
            return [NO_DRAFT] * len(requests)
        seqs = [self._delta(r, k) for r, k in zip(requests, max_tokens)]
        released = self._take_released()
        call = DraftCall(self.client_id, seqs, released, deadline=time.time() + self.timeout_s)
        self.stats.num_calls += 1
        direct = self.direct is not None and self.direct.ready(self.replica_id)
        t0 = time.perf_counter()
        try:
            reply = self.direct.propose(call, self.timeout_s) if direct else self._via_handle(call)
            drafts = self._drafts(requests, max_tokens, reply)
        except Exception as exc:  # fail closed: this step runs without drafts
            self._failed(exc, released)
            return [NO_DRAFT] * len(requests)
        self.stats.call_seconds += time.perf_counter() - t0
        self.stats.num_direct_calls += direct
        self.replica_id = reply.replica_id
        if self.direct is not None:
            self.direct.bind(reply)
        return drafts

    def remote_stats(self) -> RemoteProposerStats:
        return RemoteProposerStats(**vars(self.stats))

    def release(self, request_id: str) -> None:
        """Finish hook (engine thread): forget the request here, free it there (batched)."""
        self.last.pop(request_id, None)
        if self.acked.pop(request_id, None) is None:
            return  # never sent: nothing is held for it
        with self._lock:
            self._released.append(request_id)
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            self.loop.submit(self._flush_later())

    # ---- deltas and answers ----------------------------------------------------------------
    def _delta(self, req: Request, k: int) -> DraftSequence:
        rid = req.request_id
        start = min(self.acked.setdefault(rid, 0), req.num_tokens)
        accepted = 0
        if rid in self.last:
            n0, draft = self.last.pop(rid)
            accepted = common_prefix(draft, req.token_at(n0, min(n0 + len(draft), req.num_tokens)))
        return DraftSequence(seq_id=rid, start=start, token_ids=req.token_at(start, req.num_tokens),
                             num_prompt_tokens=req.num_prompt_tokens, num_accepted=accepted, max_tokens=k,
                             params=req.params if start == 0 else None)

    def _drafts(self, requests: Sequence[Request], max_tokens: Sequence[int], reply: DraftReply) -> list[Draft]:
        if not isinstance(reply, DraftReply) or len(reply.proposals) != len(requests):
            raise ValueError("DraftWorker answered with the wrong number of proposals")
        drafts = []
        for req, k, p in zip(requests, max_tokens, reply.proposals):
            if not isinstance(p, DraftProposal) or p.seq_id != req.request_id:
                raise ValueError(f"DraftWorker answered for {getattr(p, 'seq_id', None)!r}, "
                                 f"not {req.request_id!r}")
            self.acked[req.request_id] = p.num_known if 0 <= p.num_known <= req.num_tokens else 0
            draft = self._checked(p, k)
            if draft.token_ids:
                self.last[req.request_id] = (req.num_tokens, list(draft.token_ids))
            drafts.append(draft)
        return drafts

    def _checked(self, p: DraftProposal, k: int) -> Draft:
        """The proposal as a ``Draft``; no draft when it is malformed (too long, ids outside
        the vocabulary, probabilities of the wrong shape or not finite)."""
        tokens = list(p.token_ids)
        if not tokens or len(tokens) > k or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in tokens):
            return NO_DRAFT
        if p.probs is None:
            return Draft(tokens)
        q = p.probs
        if not isinstance(q, np.ndarray) or q.dtype != np.float32 or q.shape != (len(tokens), self.vocab_size) \
                or not np.isfinite(q).all():
            return NO_DRAFT
        return Draft(tokens, torch.from_numpy(q if q.flags.writeable else q.copy()))

    def _failed(self, exc: BaseException, released: list[str]) -> None:
        if isinstance(exc, (TimeoutError, concurrent.futures.TimeoutError)):
            self.stats.num_timeouts += 1
        else:
            if isinstance(exc, UNAVAILABLE):
                self.stats.num_unavailable += 1
            else:
                self.stats.num_errors += 1
            self.replica_id = ""  # let Serve choose a live replica next time
            if self.direct is not None:
                self.direct.forget()
        if self.clock() >= self._retry_at:
            log.warning("DraftWorker call failed (%s: %s); steps run without speculation for %.1fs",
                        type(exc).__name__, str(exc)[:200], self.retry_s)
        self._retry_at = self.clock() + self.retry_s
        with self._lock:
            self._released[:0] = released  # not known to have arrived: send them again

    # ---- handle calls (on the client loop) -------------------------------------------------
    def _via_handle(self, call: DraftCall) -> DraftReply:
        """One call through the Serve handle, waited on for at most the timeout."""
        future = self.loop.submit(self._call(call))
        try:
            return future.result(timeout=self.timeout_s)
        except BaseException:
            future.cancel()
            raise

    async def _call(self, call: DraftCall) -> DraftReply:
        return await self.handle.propose.remote(call, route=Route(self.client_id, self.replica_id))

    def _take_released(self) -> list[str]:
        with self._lock:
            taken, self._released = self._released, []
        return taken

    async def _flush_later(self) -> None:
        await asyncio.sleep(RELEASE_DELAY_S)
        with self._lock:
            self._flush_scheduled = False
        seq_ids = self._take_released()
        if not seq_ids:
            return  # a propose call carried them meanwhile
        try:
            await asyncio.wait_for(self.handle.release.remote(DraftRelease(self.client_id, seq_ids),
                                                              route=Route(self.client_id, self.replica_id)),
                                   RELEASE_TIMEOUT_S)
        except Exception as exc:  # the DraftWorker's TTL frees them
            log.info("DraftWorker release of %d sequences failed: %s", len(seq_ids), type(exc).__name__)


def remote_proposers(handles: Mapping[str, object], client_id: str = "") -> dict[str, Callable]:
    """``HostDeps.proposers`` for DraftWorker deployments by name: build(options, target) -> Proposer.
    ``client_id``: this engine's name in their calls (its replica id; "" = a random one)."""
    client_id = client_id or uuid.uuid4().hex

    def build(handle, options: DraftModelOptions, target: TargetInfo) -> RemoteDraftProposer:
        direct = DirectCalls() if options.deployment_transport == "direct" else None
        return RemoteDraftProposer(handle, options, target, client_id, direct=direct)

    return {name: (lambda options, target, h=handle: build(h, options, target)) for name, handle in handles.items()}
