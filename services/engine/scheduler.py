"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Each step it hands out a token budget: running requests first (decodes take 1 token,
unfinished prompt chunks take what is left of their prompt), then waiting requests in
(priority, arrival) order, each possibly starting from a cached prefix. When the pool has
no room for a running request, the prefix pins of unadmitted requests are dropped first
(``_allocate``), then the lowest-priority running request is preempted: its blocks are freed
and it is recomputed from scratch later (its generated tokens are kept and recomputed as part
of its prompt).

Speculative decoding: a running request whose only uncomputed token is its last sampled one
(decode state) and that carries a draft (``Request.spec_token_ids``, set by the engine's
proposer) is scheduled for ``1 + k`` tokens, its draft trimmed to fit the budget (vLLM's
``scheduled_spec_decode_tokens``). A draft never causes a preemption: when its slots do not
fit, the request decodes one token as without speculation. After the step the rejected
drafts' slots are rolled back (``update_after_step``).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.engine.config import SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.request import Request, RequestStatus


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (request count or token limit); retry later."""


@dataclass
class SchedulerOutput:
    """What one step computes: ``{request_id: num_tokens}`` plus the diffs since the last step."""

    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # tokens to compute per request
    new_request_ids: list[str] = field(default_factory=list)  # admitted (or resumed) this step
    preempted_request_ids: list[str] = field(default_factory=list)  # lost their blocks this step
    num_cached_tokens: dict[str, int] = field(default_factory=dict)  # prefix-cache hits of new ones
    # draft tokens verified this step, per request (each also counted in num_scheduled_tokens)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 before_free: Callable[[Request, str], None] | None = None):
        self.config = config
        self.kv = kv
        self.before_free = before_free  # called as before_free(req, reason) when a request finishes, blocks still held
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting: list[tuple[int, float, int, Request]] = []  # heap
        self._counter = itertools.count()
        self.waiting_tokens = 0

    # ---- queue ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, req: Request) -> None:
        """Queue a request, or raise EngineOverloadedError when admission limits are hit."""
        if len(self._waiting) >= self.config.max_waiting_requests:
            raise EngineOverloadedError(
                f"waiting queue full ({len(self._waiting)} requests, limit max_waiting_requests="
                f"{self.config.max_waiting_requests})")
        if self.waiting_tokens + req.num_tokens > self.config.max_waiting_tokens:
            raise EngineOverloadedError(
                f"waiting queue full ({self.waiting_tokens} tokens queued, limit max_waiting_tokens="
                f"{self.config.max_waiting_tokens})")
        self.requests[req.request_id] = req
        self._push_waiting(req)

    def _push_waiting(self, req: Request) -> None:
        req.status = RequestStatus.WAITING if req.num_preemptions == 0 else RequestStatus.PREEMPTED
        heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._counter), req))
        self.waiting_tokens += req.num_tokens

    def _pop_waiting(self) -> Request:
        req = heapq.heappop(self._waiting)[3]
        self.waiting_tokens -= req.num_tokens
        return req

    def finish(self, req: Request, reason: str) -> None:
        """Mark a request finished (stop, length or abort) and free its blocks at once."""
        if req.is_finished:
            return
        if self.before_free is not None:
            self.before_free(req, reason)
        if req in self.running:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self._waiting = [e for e in self._waiting if e[3] is not req]
            heapq.heapify(self._waiting)
            self.waiting_tokens -= req.num_tokens
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    def add_running(self, req: Request) -> None:
        """Put a request whose prompt is already computed (its blocks allocated and filled, e.g.
        adopted from a prefill worker) straight into the running batch. The caller has checked
        that its id is not in use (``LLMEngine.adopt_request``)."""
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        preempted = self._schedule_running(out, budget)
        budget -= out.total_num_scheduled_tokens
        if not preempted:
            self._schedule_waiting(out, budget)
        return out

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        n = req.num_tokens - req.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return min(n, budget)
        return n if n <= budget else 0

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> bool:
        preempted = False
        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if n == 0:
                i += 1
                continue
            draft = self._fit_draft(req, budget)
            if draft:
                out.num_scheduled_tokens[req.request_id] = 1 + len(draft)
                out.scheduled_spec_decode_tokens[req.request_id] = draft
                budget -= 1 + len(draft)
                i += 1
                continue
            while not self._allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                out.num_scheduled_tokens[req.request_id] = n
                budget -= n
                i += 1
        return preempted

    def _allocate(self, req: Request, n: int, cached: list[int] = ()) -> bool:
        """``kv.allocate``, dropping prefix pins of unadmitted requests while the pool is short:
        other requests' first (newest first), ``req``'s own last (the blocks it finds stay
        cached; only duplicates go). Pins only keep cached blocks from LRU reuse until their
        request is admitted; without this, the pins of requests queued behind the head of the
        queue could hold the blocks it needs while nothing runs, and no step would ever free one
        (issue 18's hang). Dropping pins comes before preempting a running request (cheaper).
        So with nothing running the head always fits (``LLMEngine.check_lengths`` bounds it)."""
        while not self.kv.allocate(req, n, cached):
            if not self.kv.drop_newest_pins(last=req.request_id):
                return False
        return True

    def _fit_draft(self, req: Request, budget: int) -> list[int]:
        """The part of a decode-state request's draft that fits ``budget`` (with its last token)
        and whose slots could be reserved now, or []."""
        if not req.spec_token_ids or req.num_tokens - req.num_computed_tokens != 1:
            return []
        draft = req.spec_token_ids[:budget - 1]
        if draft and self.kv.allocate(req, 1 + len(draft)):
            return draft
        return []

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.spec_token_ids, req.spec_probs = [], None
        out.num_scheduled_tokens.pop(req.request_id, None)
        out.scheduled_spec_decode_tokens.pop(req.request_id, None)
        out.preempted_request_ids.append(req.request_id)
        self._push_waiting(req)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._waiting[0][3]
            cached = self.kv.find_cached_prefix(req)
            num_cached = len(cached) * self.kv.block_size
            n = self._num_new_tokens(_Shifted(req, num_cached), budget)
            if n == 0 or not self._allocate(req, n, cached):
                break
            self._pop_waiting()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.num_imported_cached_tokens = min(self.kv.num_imported_tokens(req.request_id), num_cached)
            self.kv.unpin(req.request_id)  # it holds its own references now
            if req.scheduled_time is None:
                req.scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.num_scheduled_tokens[req.request_id] = n
            out.new_request_ids.append(req.request_id)
            out.num_cached_tokens[req.request_id] = num_cached
            budget -= n

    def update_after_step(self, out: SchedulerOutput, num_rejected: Mapping[str, int] | None = None) -> None:
        """Advance computed-token counts and publish newly full blocks for reuse.

        ``num_rejected[rid]``: draft tokens of ``rid`` the verifier rejected; their slots are
        rolled back. Accepted drafts count as computed although the engine appends them to the
        request's output only afterwards, so blocks are published only up to the known tokens
        (the engine publishes the rest once it has appended them).
        """
        for rid, n in out.num_scheduled_tokens.items():
            req = self.requests[rid]
            rejected = num_rejected.get(rid, 0) if num_rejected else 0
            req.num_computed_tokens += n - rejected
            if rejected:
                self.kv.rollback(req, req.num_computed_tokens)
            self.kv.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))


class _Shifted:
    """A view of a request as if ``extra`` more tokens were already computed."""

    def __init__(self, req: Request, extra: int):
        self.num_tokens = req.num_tokens
        self.num_computed_tokens = req.num_computed_tokens + extra
