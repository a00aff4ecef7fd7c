"""Asyncio front of the engine: requests stream ``TokenChunk``s while one thread steps the engine.

The engine thread holds ``_lock`` (a fair ``StepLock``) for each step; ``add_request`` and
``abort`` take the same lock, so an abort frees the request's blocks before the next step
starts (at most one step after it is called). ``add_request_async`` waits for the lock in a
thread, so that an event loop that also forwards other requests' tokens never stalls for a
step. When several chunks of a request are ready before its consumer reads, the consumer
receives them merged into one chunk.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from services.engine.engine import LLMEngine
from services.engine.gc_tuning import freeze_startup_objects
from services.engine.llm import build_engine_config
from services.engine.model.experts import ExpertsUnavailableError
from services.engine.plugins import HostDeps
from services.engine.outputs import TokenChunk
from services.engine.sampling_params import SamplingParams
from services.engine.step_lock import StepLock, off_loop

log = logging.getLogger(__name__)


class _Stream:
    """Hand-off of one request's chunks from the engine thread to its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

    def put(self, item: TokenChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = StepLock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        freeze_startup_objects()  # no full GC pass over the model's and libraries' objects (gc_tuning.py)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str, **options) -> "AsyncEngine":
        """An engine for ``model`` with keyword options (as ``LLM``'s)."""
        return cls(LLMEngine(build_engine_config(model, **options)))

    @classmethod
    def from_config(cls, config, deps: HostDeps | None = None) -> "AsyncEngine":
        """An engine for a validated ``EngineConfig`` with the host's injected ``deps``."""
        return cls(LLMEngine(config, deps))

    # ---- client side (event loop) --------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    resume_token_ids: list[int] | None = None) -> AsyncIterator[TokenChunk]:
        """Queue a request now (ValueError / EngineOverloadedError raise here) and return its
        stream. Leaving the stream before its last chunk aborts the request. ``resume_token_ids``:
        output already produced elsewhere (``LLMEngine.add_request``)."""
        stream = _Stream(asyncio.get_running_loop())
        request_id = self._add(stream, prompt, params, request_id, priority, resume_token_ids)
        self._wake.set()
        return self._iterate(request_id, stream)

    async def add_request_async(self, prompt: str | list[int], params: SamplingParams | None = None,
                                request_id: str | None = None, priority: int = 0,
                                resume_token_ids: list[int] | None = None) -> AsyncIterator[TokenChunk]:
        """``add_request`` with the wait for the step lock in a worker thread (the event loop
        keeps running). Cancelled while the request is being added: it is aborted."""
        stream = _Stream(asyncio.get_running_loop())
        request_id = await off_loop(self._add, stream, prompt, params, request_id, priority, resume_token_ids,
                                    undo=self.abort)
        self._wake.set()
        return self._iterate(request_id, stream)

    def _add(self, stream: _Stream, prompt, params, request_id, priority, resume_token_ids=None) -> str:
        with self._lock:
            req = self.engine.add_request(prompt, params, request_id=request_id, priority=priority,
                                          resume_token_ids=resume_token_ids)
            self._streams[req.request_id] = stream
        return req.request_id

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[TokenChunk]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else item.merge(nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """Finish the request and free every block it holds; False if it is unknown or done."""
        with self._lock:
            chunk = self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
        if stream is not None and chunk is not None:
            stream.put(chunk)
        return chunk is not None

    def stats(self):
        with self._lock:
            return self.engine.snapshot_stats()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._lock.acquire_for_step()
            try:
                try:
                    chunks = self.engine.step()
                except ExpertsUnavailableError as exc:
                    log.warning("engine step failed; aborting all running requests: %s", exc)
                    self._fail_all(exc)
                    continue
                except Exception as exc:  # a bug in a step must not hang every client
                    log.exception("engine step failed; aborting all running requests")
                    self._fail_all(exc)
                    continue
                streams = [(self._streams.get(c.request_id), c) for c in chunks]
                for c in chunks:
                    if c.finished:
                        self._streams.pop(c.request_id, None)
            finally:
                self._lock.release()
            for stream, chunk in streams:
                if stream is not None:
                    stream.put(chunk)

    def _fail_all(self, exc: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            # remote experts out of reach keep their type: the request fails UNAVAILABLE, not INTERNAL
            kind = ExpertsUnavailableError if isinstance(exc, ExpertsUnavailableError) else RuntimeError
            stream.put(kind(f"engine step failed: {exc}"))
        self._streams.clear()

    # ---- routing report (any thread) -------------------------------------------------------
    def routing_snapshot(self, max_keys: int):
        """The engine's stats and the hashes of its newest ``max_keys`` cached full blocks
        (``LLMEngine.cached_block_hashes``), read together under the step lock. Blocks the
        caller for up to one step: call it off the event loop. Returns ``(EngineStats, list[bytes])``."""
        with self._lock:
            return self.engine.snapshot_stats(), self.engine.cached_block_hashes(max_keys)
