"""The life of one generation request on the router, whatever protocol carried it.

A protocol adapter (gRPC: router/servicer.py) turns its request into a ``GenerateInput``
(router/validation.py), then::

    live = lifecycle.start(request)          # telemetry starts: live.trace_metadata names the trace
    async for chunk in live.stream():         # StreamChunk...; the last one has finish_reason set
        ...                                   # live.usage, live.routed: for the last message
    # failures raise RequestError (an ErrorKind + a message); the adapter maps the kind

and ``lifecycle.abort(request_id)`` for a client's abort.

Owners: with API keys on (router/auth.py) every request has an owner, its caller's key
fingerprint (``start(request, owner)``; "" when keys are off). Request ids are scoped by
owner: a duplicate id is one of the same owner's requests in flight (so "already in use"
never tells a caller about another's ids), ``abort(request_id, owner)`` finds only the
owner's own requests, and the workers see the id as ``<owner>/<id>`` (unique across owners). Order inside ``stream``:
request id (the client's, or generated; at most 256 characters) -> validation and
tokenization -> duplicate id (INVALID_ARGUMENT "already in use") -> admission
(``max_inflight_requests``, RESOURCE_EXHAUSTED) -> the pipeline (router/pipeline.py), whose
stream moves to another replica when its replica dies (router/migration.py).

Terms
- abort: ``abort(request_id)`` cancels the request's handle calls (the workers free its blocks
  within one step); its stream ends normally with a chunk whose finish_reason is "abort",
  carrying the usage so far.
- deadline: ``GenerateInput.deadline`` (unix time). When it passes the handle calls are
  cancelled the same way and the stream raises DEADLINE_EXCEEDED; the workers also stop
  on their own at the deadline (``GenerateCall.deadline``).
- cancellation: the adapter's task is cancelled (the client went away): ``CancelledError``
  propagates unchanged and telemetry records CANCELLED (DEADLINE_EXCEEDED once it passed).
- usage: prompt, completion and cached prompt tokens, updated from every chunk.
Telemetry (services/telemetry/router_telemetry.py) sees every step: start -> dispatched ->
per chunk ``on_chunk`` + ``handed_over`` (just before the chunk goes to the adapter), and
``migrated`` per migration -> finished | failed | cancelled -> end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.errors import ErrorKind, RequestError, classify, invalid, shown
from router.migration import MigrationConfig, migrating_stream
from router.pipeline import Control
from router.validation import GenerateInput, RequestValidator
from services.telemetry import RouterTelemetry
from services.telemetry.metrics import Identity
from services.types import GenerateCall, ModelInfo, StreamChunk

log = logging.getLogger("tandem.router")
LONG_PROMPT_CHARS = 4096  # text prompts longer than this are tokenized in a thread (the event loop stays free)


@dataclass(frozen=True)
class AdmissionLimits:
    """Router-side admission control."""

    max_inflight_requests: int  # requests served at once by one router replica; beyond: RESOURCE_EXHAUSTED


@dataclass
class Usage:
    """Token counts of one request so far (the last message of a stream reports them)."""

    prompt_tokens: int = 0  # tokens of the validated prompt
    completion_tokens: int = 0  # output tokens so far
    cached_prompt_tokens: int = 0  # prompt tokens served from a prefix cache (local + Redis tier)
    draft_steps: int = 0  # speculative decoding: steps that verified a draft of this request
    draft_tokens: int = 0  # draft tokens verified
    accepted_draft_tokens: int = 0  # of those, accepted

    def add(self, chunk: StreamChunk) -> None:
        self.completion_tokens = chunk.num_output_tokens or self.completion_tokens + len(chunk.token_ids)
        self.cached_prompt_tokens = chunk.num_cached_tokens
        self.draft_steps = chunk.num_drafts  # cumulative over placements (router/migration.py)
        self.draft_tokens = chunk.num_draft_tokens
        self.accepted_draft_tokens = chunk.num_accepted_draft_tokens


class RequestLifecycle:
    """Admission, ids, deadline, abort, usage and telemetry of the router's requests (module docstring)."""

    def __init__(self, pipeline, validator: RequestValidator, limits: AdmissionLimits,
                 telemetry: RouterTelemetry | None = None, migration: MigrationConfig = MigrationConfig()):
        self.pipeline = pipeline  # router/pipeline.py: run(GenerateCall, Control) -> AsyncIterator[StreamChunk]
        self.validator = validator
        self.limits = limits
        self.migration = migration
        self.telemetry = telemetry or RouterTelemetry(Identity(validator.info.model_id, "router", "local"))
        self.inflight: dict[tuple[str, str], Control] = {}  # (owner, request id) -> its control, admission to end

    @property
    def info(self) -> ModelInfo:
        return self.validator.info

    @property
    def num_inflight(self) -> int:
        return len(self.inflight)

    def start(self, request: GenerateInput, owner: str = "") -> "LiveRequest":
        """Begin ``owner``'s request (its telemetry starts now); iterate ``stream()`` to run it."""
        return LiveRequest(self, request, owner)

    def abort(self, request_id: str, owner: str = "") -> bool:
        """End ``owner``'s request in flight with finish_reason "abort"; False when ``owner`` has
        none of that id (another owner's request of that id is left alone)."""
        ctl = self.inflight.get((owner, request_id))
        if ctl is None:
            return False
        ctl.abort()
        return True

    async def tokenize(self, text: str, model: str = "") -> list[int]:
        """The prompt's token ids, as ``Generate`` would tokenize it (RequestError on bad input)."""
        self.validator.check_model(model)
        if not text:
            raise invalid("text: must not be empty")
        return await asyncio.to_thread(self.validator.tokenize, text, "text")

    # ---- used by LiveRequest -------------------------------------------------------------
    async def _build(self, request: GenerateInput, request_id: str, traceparent: str) -> GenerateCall:
        build = self.validator.build
        chat_chars = sum(len(m.content) for m in request.messages)
        if len(request.prompt) > LONG_PROMPT_CHARS or chat_chars > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(build, request, request_id, request.deadline, traceparent)
        return build(request, request_id, request.deadline, traceparent)

    def _admit(self, key: tuple[str, str], replica_hint: str) -> Control:
        owner, request_id = key
        if key in self.inflight:
            raise invalid(f"request_id: {shown(request_id)} is already in use")
        if len(self.inflight) >= self.limits.max_inflight_requests:
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"router at its limit of {self.limits.max_inflight_requests} requests in flight")
        ctl = self.inflight[key] = Control(replica_hint)
        return ctl

    def _release(self, key: tuple[str, str], ctl: Control) -> None:
        ctl.cancel()
        if self.inflight.get(key) is ctl:
            del self.inflight[key]


class LiveRequest:
    """One request between ``RequestLifecycle.start`` and the end of its ``stream``."""

    def __init__(self, lifecycle: RequestLifecycle, request: GenerateInput, owner: str = ""):
        self._lifecycle = lifecycle
        self.request = request
        self.owner = owner  # the caller's key fingerprint ("" = keys off); scopes the id
        self.request_id = request.request_id or "?"  # the validated / generated id once stream() started
        self.usage = Usage()
        self._ctl: Control | None = None
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self.obs = lifecycle.telemetry.start((("traceparent", request.traceparent),
                                              ("tracestate", request.tracestate)))

    @property
    def trace_metadata(self) -> tuple[tuple[str, str], ...]:
        """(key, value) pairs naming the request's trace (x-trace-id), for response headers / trailers."""
        return self.obs.trailing_metadata()

    @property
    def routed(self) -> dict[str, str]:
        """Role ("unified" | "prefill" | "decode") -> the replica id that served it so far."""
        return self._ctl.routed if self._ctl is not None else {}

    async def stream(self) -> AsyncIterator[StreamChunk]:
        """The request's chunks (see the module docstring); raises ``RequestError``."""
        obs, lifecycle = self.obs, self._lifecycle
        try:
            self.request_id = lifecycle.validator.request_id(self.request.request_id)
            worker_id = f"{self.owner}/{self.request_id}" if self.owner else self.request_id
            call = await lifecycle._build(self.request, worker_id, obs.traceparent)
            ctl = self._ctl = lifecycle._admit((self.owner, self.request_id), self.request.replica_hint)
            self._arm_deadline()
            self.usage.prompt_tokens = len(call.prompt_token_ids)
            obs.dispatched(call)
            try:
                async for chunk in migrating_stream(lifecycle.pipeline.run, call, ctl, lifecycle.migration,
                                                    obs.migrated):
                    self.usage.add(chunk)
                    obs.on_chunk(chunk)
                    obs.handed_over(chunk)  # the router token delay ends here
                    yield chunk
            except (asyncio.CancelledError, Exception) as exc:
                if _being_cancelled() or not (ctl.aborted or self._expired):
                    raise
                if not ctl.aborted:
                    raise RequestError(ErrorKind.DEADLINE_EXCEEDED, "deadline exceeded") from None
                log.info("request %s aborted (%s)", self.request_id, type(exc).__name__)
                obs.finished("abort", self.usage.cached_prompt_tokens)
                yield self._abort_chunk()
        except asyncio.CancelledError:
            obs.cancelled(self._time_remaining())
            raise
        except Exception as exc:
            err = classify(exc, self.request_id)
            obs.failed(err.kind.name, err.kind.value, exc, err.message)
            if err is exc:
                raise
            raise err from exc
        finally:
            obs.end()
            if self._timer is not None:
                self._timer.cancel()
            if self._ctl is not None:
                lifecycle._release((self.owner, self.request_id), self._ctl)

    def _abort_chunk(self) -> StreamChunk:
        u = self.usage
        return StreamChunk(finish_reason="abort", num_prompt_tokens=u.prompt_tokens,
                           num_cached_tokens=u.cached_prompt_tokens, num_output_tokens=u.completion_tokens,
                           num_drafts=u.draft_steps, num_draft_tokens=u.draft_tokens,
                           num_accepted_draft_tokens=u.accepted_draft_tokens)

    def _arm_deadline(self) -> None:
        remaining = self._time_remaining()
        if remaining is not None:
            self._timer = asyncio.get_running_loop().call_later(max(remaining, 0.0), self._expire)

    def _expire(self) -> None:
        """The deadline passed: cancel the handle calls (the stream then raises DEADLINE_EXCEEDED)."""
        self._expired = True
        if self._ctl is not None:
            self._ctl.cancel()

    def _time_remaining(self) -> float | None:
        deadline = self.request.deadline
        return None if deadline is None else deadline - time.time()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
