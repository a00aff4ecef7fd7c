"""How the router drives the workers for one request: unified, or prefill then decode.

A pipeline turns a ``GenerateCall`` into an async iterator of ``StreamChunk``. The handle
call in flight is registered on the request's ``Control`` so that an abort, a client
cancel or a deadline cancels it; Serve then cancels the worker's coroutine, whose engine
stream aborts the engine request (all its blocks free within one step).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.types import DecodeCall, GenerateCall, ModelInfo, StreamChunk, WorkerStats


class Control:
    """Cancellation of one request's in-flight handle call."""

    def __init__(self):
        self.aborted = False
        self._calls: list = []

    def attach(self, response) -> None:
        self._calls.append(response)

    def detach(self, response) -> None:
        if response in self._calls:
            self._calls.remove(response)

    def cancel(self) -> None:
        for response in list(self._calls):
            response.cancel()
        self._calls.clear()

    def abort(self) -> None:
        self.aborted = True
        self.cancel()


async def _stream(response, ctl: Control) -> AsyncIterator[StreamChunk]:
    """Iterate a streaming handle response; cancel it if left before its last chunk."""
    ctl.attach(response)
    finished = False
    try:
        async for chunk in response:
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        ctl.detach(response)
        if not finished:
            response.cancel()


async def _gather_stats(handle, num_calls: int) -> list[WorkerStats]:
    """Stats of the deployment's replicas: concurrent calls spread over replicas, deduplicated."""
    results = await asyncio.gather(*(handle.stats.remote() for _ in range(num_calls)), return_exceptions=True)
    by_replica = {}
    for r in results:
        if isinstance(r, WorkerStats):
            by_replica[r.replica_id] = r
    return list(by_replica.values())


class UnifiedPipeline:
    """One worker does prefill and decode (no KV transfer)."""

    def __init__(self, worker):
        self.worker = worker
        self._stream_handle = worker.options(stream=True)

    async def model_info(self) -> ModelInfo:
        return await self.worker.model_info.remote()

    def run(self, call: GenerateCall, ctl: Control) -> AsyncIterator[StreamChunk]:
        return _stream(self._stream_handle.generate.remote(call), ctl)

    async def worker_stats(self, num_calls: int = 8) -> list[WorkerStats]:
        return await _gather_stats(self.worker, num_calls)


class PrefillDecodePipeline:
    """Prefill on one deployment, KV through the transfer backend, decode on another."""

    def __init__(self, prefill, decode):
        self.prefill = prefill
        self.decode = decode
        self._prefill_stream = prefill.options(stream=True)
        self._decode_stream = decode.options(stream=True)

    async def model_info(self) -> ModelInfo:
        return await self.prefill.model_info.remote()

    async def run(self, call: GenerateCall, ctl: Control) -> AsyncIterator[StreamChunk]:
        prefill = self._prefill_stream.prefill.remote(call)
        ctl.attach(prefill)
        try:  # the prefill stream stays open (its replica holds the KV) until decode adopted it
            result = await prefill.__anext__()
            first = result.first
            yield first
            if first.finish_reason is not None or result.kv is None:
                return
            decode_call = DecodeCall(call, first.token_ids[0], (first.logprobs or [None])[0], result.kv,
                                     first.num_cached_tokens, result.generator_state, call.traceparent)
            async for chunk in _stream(self._decode_stream.decode.remote(decode_call), ctl):
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
