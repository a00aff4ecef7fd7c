"""The engine as the workers host it: ``AsyncEngine`` plus the two halves of P/D hand-off.

- ``prefill``: run the prompt with ``max_tokens=1``; when the engine finishes the request,
  the KV of its prompt blocks is copied out in the engine thread, before the blocks are
  freed (the engine's finish hook). A seeded request needs no RNG state: its draws depend on
  (seed, position) only (services/engine/sampler.py), so the decode side continues at position 1.
- ``adopt``: allocate blocks in this engine's pool, copy the payload into them, and put the
  request straight into the running batch with the prompt computed and the first token as
  its first output, so the next step decodes it. Nothing is recomputed.

Terms: P = prompt length; the first token's own KV is computed by the decode side's first
step (it is the input of that step). Only public engine methods are used
(``LLMEngine.add_finish_hook``, ``read_kv_blocks``, ``check_adoptable``, ``adopt_request``),
under ``AsyncEngine``'s step lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from services.engine.async_engine import AsyncEngine, _Stream
from services.engine.outputs import TokenChunk
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.step_lock import off_loop
from services.engine.scheduler import EngineOverloadedError
from services.kv_transfer.base import KVPayload


def sendable_text_len(text: str, params: SamplingParams) -> int:
    """How much of an unfinished request's text may be sent: all but what could start a stop string."""
    return max(len(text) - max(params.max_stop_len - 1, 0), 0)


@dataclass
class PrefillOutput:
    """The first token of a request and, unless that finished it, its prompt KV."""

    chunk: TokenChunk  # the first token; finish_reason is the *request's* (None if it goes on)
    kv: KVPayload | None  # prompt KV; None when the request finished with the first token
    new_blocks: torch.Tensor | None = None  # [L, 2, n, bs, H, D] full prompt blocks from expect_export's block on


@dataclass
class _Capture:
    num_prompt_tokens: int
    kv: torch.Tensor | None = None
    want_kv: bool = False  # prefill: read every prompt block (the P/D hand-off)
    export_from: int | None = None  # read the full prompt blocks from this one on (write-back)
    new_blocks: torch.Tensor | None = None  # [L, 2, n, bs, H, D] what export_from asked for


class ServingEngine(AsyncEngine):
    """``AsyncEngine`` that can export a prefilled request's KV and adopt one from elsewhere."""

    def __init__(self, engine):
        super().__init__(engine)
        self._captures: dict[str, _Capture] = {}
        self._capture_lock = threading.Lock()
        engine.add_finish_hook(self._capture)  # runs in the engine thread, under _lock

    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive()

    # ---- prefill side --------------------------------------------------------------------
    async def prefill(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      priority: int = 0) -> PrefillOutput:
        """Compute the prompt and sample the first token; raises ValueError/EngineOverloadedError."""
        with self._capture_lock:
            self._captures.setdefault(request_id, _Capture(len(prompt_ids))).want_kv = True
        try:
            stream = await self.add_request_async(prompt_ids, dataclasses.replace(params, max_tokens=1),
                                                  request_id=request_id, priority=priority)
            last = None
            async for chunk in stream:
                last = chunk if last is None else last.merge(chunk)
        finally:
            with self._capture_lock:
                cap = self._captures.pop(request_id, None)
        chunk = dataclasses.replace(last)
        if not self._really_finished(chunk, params):
            chunk.finish_reason = None
            chunk.stop_reason = None
            chunk.text = self._first_text(Request(request_id, prompt_ids, params), chunk.token_ids[0])
            if cap is None or cap.kv is None:
                raise RuntimeError(f"prefill of {request_id!r} finished without capturing its KV")
            return PrefillOutput(chunk, KVPayload(request_id, cap.kv, cap.num_prompt_tokens), cap.new_blocks)
        return PrefillOutput(chunk, None, cap.new_blocks if cap is not None else None)

    def _really_finished(self, chunk: TokenChunk, params: SamplingParams) -> bool:
        """A max_tokens=1 run ends with "length"; the request itself ends only on a stop or its limits."""
        if chunk.finish_reason != "length":
            return True
        return params.max_tokens <= 1 or chunk.num_prompt_tokens + 1 >= self.engine.max_model_len

    def _first_text(self, req: Request, first_token: int) -> str:
        """Text of the first token as an unfinished request sends it; sets the request's
        detokenizer state exactly as the decode side must continue from."""
        req.output_token_ids = [first_token]
        self.engine.detokenizer.step(req)
        req.sent_text_len = sendable_text_len(req.text, req.params)
        return req.text[:req.sent_text_len]

    def _capture(self, req: Request, reason: str) -> None:
        """Finish hook: copy out what a capture asked for while the request's blocks are held."""
        cap = self._captures.get(req.request_id) if reason != "abort" else None
        if cap is None:
            return
        table = self.engine.request_block_ids(req.request_id)
        if cap.want_kv and req.num_computed_tokens == cap.num_prompt_tokens:
            cap.kv = self.engine.read_kv_blocks(table[:self.engine.kv.blocks_needed(cap.num_prompt_tokens)])
        self._capture_new_blocks(req, cap, table)

    def _capture_new_blocks(self, req: Request, cap: _Capture, table: list[int]) -> None:
        """Full prompt blocks ``[export_from, P // bs)`` (all computed by now), for write-back."""
        bs = self.engine.kv.block_size
        full = min(cap.num_prompt_tokens, req.num_computed_tokens) // bs
        if cap.export_from is None or full <= cap.export_from:
            return
        if cap.kv is not None:  # already read for the P/D hand-off: a view, no second copy
            cap.new_blocks = cap.kv[:, :, cap.export_from:full]
        else:
            cap.new_blocks = self.engine.read_kv_blocks(table[cap.export_from:full])

    # ---- external prefix tier (services/prefix_store) ------------------------------------
    def pin_prefix(self, request_id: str, hashes: list[bytes]) -> int:
        """``LLMEngine.pin_cached_prefix`` under the step lock."""
        with self._lock:
            return self.engine.pin_cached_prefix(request_id, hashes)

    def import_prefix(self, request_id: str, hashes: list[bytes], kv: torch.Tensor, num_prompt_tokens: int) -> int:
        """``LLMEngine.import_prefix_blocks`` under the step lock."""
        with self._lock:
            return self.engine.import_prefix_blocks(request_id, hashes, kv, num_prompt_tokens)

    def release_prefix(self, request_id: str) -> None:
        """Drop the pins of a request that was not (or is no longer) queued."""
        with self._lock:
            if not self.engine.has_request(request_id):
                self.engine.release_prefix_pins(request_id)

    def expect_export(self, request_id: str, num_prompt_tokens: int, from_block: int) -> None:
        """When the request ends (not aborted), copy its full prompt blocks ``[from_block, P // bs)``
        out before they are freed; collect them with ``pop_export`` (or ``PrefillOutput.new_blocks``)."""
        with self._capture_lock:
            self._captures.setdefault(request_id, _Capture(num_prompt_tokens)).export_from = from_block

    def pop_export(self, request_id: str) -> torch.Tensor | None:
        """The blocks ``expect_export`` asked for (``[L, 2, n, bs, H, D]``), or None; forgets the request."""
        with self._capture_lock:
            cap = self._captures.pop(request_id, None)
        return cap.new_blocks if cap is not None else None

    # ---- decode side ---------------------------------------------------------------------
    async def adopt(self, request_id: str, prompt_ids: list[int], params: SamplingParams, first_token: int,
                    kv: KVPayload, *, first_logprobs: dict[int, float] | None = None, priority: int = 0,
                    num_cached_tokens: int = 0, timeout_s: float = 30.0) -> AsyncIterator[TokenChunk]:
        """Continue a request prefilled elsewhere; returns its stream (from the second token on).

        Waits up to ``timeout_s`` for free blocks, then raises ``EngineOverloadedError``.
        """
        req = self._adoptable_request(request_id, prompt_ids, params, first_token, kv, first_logprobs,
                                      priority, num_cached_tokens)
        stream = _Stream(asyncio.get_running_loop())
        deadline = time.monotonic() + timeout_s

        def undo(adopted: bool) -> None:  # adopted, but the caller was cancelled: nobody reads the stream
            if adopted:
                self.abort(request_id)

        while not await off_loop(self._try_adopt, req, kv.kv, stream, undo=undo):
            if time.monotonic() > deadline:
                raise EngineOverloadedError(
                    f"decode KV pool full: {kv.kv.shape[2]} blocks for {request_id!r} not free within {timeout_s}s")
            await asyncio.sleep(0.01)
        self._wake.set()
        return self._iterate(request_id, stream)

    def _adoptable_request(self, request_id, prompt_ids, params, first_token, kv, first_logprobs, priority,
                           num_cached_tokens) -> Request:
        eng = self.engine
        eng.check_adoptable(len(prompt_ids), params, tuple(kv.kv.shape), kv.block_size, kv.num_tokens)
        req = Request(request_id, list(prompt_ids), params, priority=priority)
        req.output_token_ids = [first_token]
        req.num_cached_tokens = num_cached_tokens
        req.first_token_time = time.monotonic()
        if params.logprobs is not None:
            req.logprobs = [first_logprobs]
        if params.seed is not None:
            req.generator = torch.Generator(device=eng.device)  # seeded per position (Request.sampling_generator)
        return req

    def _try_adopt(self, req: Request, kv: torch.Tensor, stream: _Stream) -> bool:
        with self._lock:
            req.scheduled_time = time.monotonic()  # queue time of an adoption: waiting for blocks
            if not self.engine.adopt_request(req, kv):
                return False
            self._first_text(req, req.output_token_ids[0])  # before the next step (we hold the lock)
            self._streams[req.request_id] = stream
        return True
