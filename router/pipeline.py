"""How the router drives the workers for one request: unified, or prefill then decode.

A pipeline turns a ``GenerateCall`` into an async iterator of ``StreamChunk``. The handle
call in flight is registered on the request's ``Control`` so that an abort, a client
cancel or a deadline cancels it; Serve then cancels the worker's coroutine, whose engine
stream aborts the engine request (all its blocks free within one step).

Unified and decode requests are per-request ``submit`` calls whose tokens arrive on the
router's channel to that replica (router/channels.py: one streamed item per engine step per
router-worker pair, not one per token per request); prefill is one streamed call per request
(one item: first token + KV handle). The unified / prefill replica is chosen by prompt
prefix and load (router/prefix_routing.py), decode by load.

A request that resumes (``GenerateCall.resume_token_ids``: router/migration.py moves it after its
replica died) skips prefill: in P/D mode a decode replica recomputes prompt + resumed tokens
itself (no KV to hand off); replicas in ``Control.excluded`` are never chosen for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from router.channels import WorkerDispatch, is_wrong_replica
from router.prefix_routing import BalanceConfig, prompt_keys
from services.types import DecodeCall, GenerateCall, ModelInfo, StreamChunk, WorkerStats


class Control:
    """Cancellation of one request's in-flight handle call; its replica hint and where it ran."""

    def __init__(self, replica_hint: str = ""):
        self.aborted = False
        self.cancelled = False  # cancel() was called (abort, deadline, the end): no new call may start
        self._calls: list = []
        self.replica_hint = replica_hint  # force the unified / prefill replica (Serve replica id); "" = policy
        self.routed: dict[str, str] = {}  # role -> replica id that served the request
        self.current: tuple[str, str] | None = None  # (role, replica id) of the call in flight last
        self.excluded: set[str] = set()  # replica ids this request must not be sent to (they failed it)

    def place(self, role: str, replica_id: str) -> str:
        """Record that the request's ``role`` part goes to ``replica_id`` now; returns it."""
        self.routed[role] = replica_id
        self.current = (role, replica_id)
        return replica_id

    def attach(self, response) -> None:
        if self.cancelled:  # cancelled while this call was being made: it must not run on
            response.cancel()
            return
        self._calls.append(response)

    def detach(self, response) -> None:
        if response in self._calls:
            self._calls.remove(response)

    def cancel(self) -> None:
        self.cancelled = True
        for response in list(self._calls):
            response.cancel()
        self._calls.clear()

    def abort(self) -> None:
        self.aborted = True
        self.cancel()


async def _gather_stats(handle, num_calls: int) -> list[WorkerStats]:
    """Stats of the deployment's replicas: concurrent calls spread over replicas, deduplicated."""
    results = await asyncio.gather(*(handle.stats.remote() for _ in range(num_calls)), return_exceptions=True)
    by_replica = {}
    for r in results:
        if isinstance(r, WorkerStats):
            by_replica[r.replica_id] = r
    return list(by_replica.values())


async def _submit(dispatch: WorkerDispatch, call, request_id: str, ctl: Control, role: str,
                  keys=(), hint: str = "", attempts: int = 3) -> AsyncIterator[StreamChunk]:
    """Choose a replica and stream the request's chunks over its channel (router/channels.py);
    choose again when the submit reached another replica than chosen (the set changed)."""
    for attempt in range(attempts):
        replica = ctl.place(role, await dispatch.choose(keys, hint, ctl.excluded))
        started = False
        try:
            async for chunk in dispatch.run(call, request_id, ctl, replica):
                started = True
                yield chunk
            return
        except Exception as exc:
            if started or attempt == attempts - 1 or not is_wrong_replica(exc):
                raise
            hint = ""


class UnifiedPipeline:
    """One worker does prefill and decode (no KV transfer)."""

    def __init__(self, worker, balance: BalanceConfig = BalanceConfig()):
        self.worker = worker
        self.dispatch = WorkerDispatch(worker, balance)
        self.info: ModelInfo | None = None

    async def model_info(self) -> ModelInfo:
        self.info = await self.worker.model_info.remote()
        return self.info

    def run(self, call: GenerateCall, ctl: Control) -> AsyncIterator[StreamChunk]:
        keys = prompt_keys(self.info.block_hash_seed, self.info.block_size,
                           call.prompt_token_ids + call.resume_token_ids)
        return _submit(self.dispatch, call, call.request_id, ctl, "unified", keys, ctl.replica_hint)

    async def worker_stats(self, num_calls: int = 8) -> list[WorkerStats]:
        return await _gather_stats(self.worker, num_calls)


class PrefillDecodePipeline:
    """Prefill on one deployment, KV through the transfer backend, decode on another."""

    def __init__(self, prefill, decode, balance: BalanceConfig = BalanceConfig()):
        self.prefill = prefill
        self.decode = decode
        self._prefill_stream = prefill.options(stream=True)
        self.prefill_dispatch = WorkerDispatch(prefill, balance)
        self.decode_dispatch = WorkerDispatch(decode, router_id=self.prefill_dispatch.router_id)
        self.info: ModelInfo | None = None

    async def model_info(self) -> ModelInfo:
        self.info = await self.prefill.model_info.remote()
        return self.info

    async def run(self, call: GenerateCall, ctl: Control) -> AsyncIterator[StreamChunk]:
        if call.resume_token_ids:  # migrated: a decode replica recomputes what the client has
            async for chunk in _submit(self.decode_dispatch, call, call.request_id, ctl, "decode"):
                yield chunk
            return
        keys = prompt_keys(self.info.block_hash_seed, self.info.block_size, call.prompt_token_ids)
        target = ctl.place("prefill", await self.prefill_dispatch.choose(keys, ctl.replica_hint, ctl.excluded))
        prefill = self._prefill_stream.prefill.remote(call, route=self.prefill_dispatch.route(target, call.traceparent))
        ctl.attach(prefill)
        inflight = self.prefill_dispatch.inflight
        inflight[target] += 1
        try:  # the prefill stream stays open (its replica holds the KV) until decode adopted it
            try:
                result = await prefill.__anext__()
            finally:
                inflight[target] -= 1
            first = result.first
            first.arrived_at = time.time()  # the first token reaches the router here, not on the channel
            yield first
            if first.finish_reason is not None or result.kv is None:
                return
            decode_call = DecodeCall(call, first.token_ids[0], (first.logprobs or [None])[0], result.kv,
                                     first.num_cached_tokens, call.traceparent)
            async for chunk in _submit(self.decode_dispatch, decode_call, call.request_id, ctl, "decode"):
                if prefill is not None:  # decode adopted the KV: the prefill replica may drop it
                    self._close(prefill, ctl)
                    prefill = None
                yield chunk
        finally:
            if prefill is not None:
                self._close(prefill, ctl)

    @staticmethod
    def _close(prefill, ctl: Control) -> None:
        ctl.detach(prefill)
        prefill.cancel()

    async def worker_stats(self, num_calls: int = 8) -> list[WorkerStats]:
        a, b = await asyncio.gather(_gather_stats(self.prefill, num_calls), _gather_stats(self.decode, num_calls))
        return a + b
