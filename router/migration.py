"""Live-stream migration: a request whose worker replica died goes on on another replica.

NVIDIA Dynamo's request migration, for Tandem. When the unified or decode replica streaming a
request dies (its channel breaks, its submit call fails with an actor error), or the KV of a
P/D hand-off is lost (the prefill replica died before decode fetched it), the router submits
the request again with ``GenerateCall.resume_token_ids`` = every output token the client
already has. The new replica recomputes prompt + those tokens (its prefix cache applies) and
the stream goes on where it stopped: the client sees a pause, no error. The continuation is
the uninterrupted one: greedy decoding is a function of the tokens; a seeded request's draws
depend on (seed, position) only (services/engine/sampler.py); the text goes on after the text
already sent (``LLMEngine.add_request``).

Terms
- migration: one resubmission after a failure; at most ``MigrationConfig.max_migrations`` per
  request, after that the failure reaches the client (UNAVAILABLE).
- reason: ``replica_died`` (the replica is excluded for the rest of the request:
  ``Control.excluded``) or ``kv_lost`` (the replica that failed is fine, the KV it was to adopt
  is gone: nothing excluded).
- A failure before any token (a prefill replica died before its hand-off, a new request went to
  a replica that had just died) is a migration with nothing to resume: the request starts over.

Not migrated: bad input, overload, the deadline, a client's cancel or abort (the lifecycle's),
and a request no other replica can take (``NoReplicaError``: UNAVAILABLE at once).
The usage a client sees stays the first placement's: ``num_cached_tokens`` is the prompt's
prefix-cache hit where the request started, not the recompute's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ray import exceptions as ray_exc

from router.channels import NoReplicaError
from router.errors import unwrap
from router.pipeline import Control
from services.types import GenerateCall, KVTransferError, StreamChunk, WrongReplicaError

log = logging.getLogger("tandem.router")
REPLICA_DIED = "replica_died"
KV_LOST = "kv_lost"  # the two reasons: services/telemetry/metrics.py MIGRATION_REASONS

_REPLICA_DIED = (ray_exc.RayActorError, ray_exc.WorkerCrashedError, ray_exc.NodeDiedError,
                 ray_exc.LocalRayletDiedError, WrongReplicaError, ConnectionError)
_KV_LOST = (KVTransferError, ray_exc.ObjectLostError)


@dataclass(frozen=True)
class MigrationConfig:
    """How often one request may move to another replica after its replica failed."""

    max_migrations: int = 2  # per request; 0 = off (a dead replica's streams fail with UNAVAILABLE)

    def __post_init__(self) -> None:
        n = self.max_migrations
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_migrations: must be an integer >= 0, got {n!r}")


@dataclass(frozen=True)
class Migration:
    """One migration of a request (telemetry: a span event and a counter)."""

    reason: str  # REPLICA_DIED | KV_LOST
    role: str  # the role of the replica that failed ("unified" | "prefill" | "decode")
    from_replica: str  # its Serve replica id ("" if none was placed yet)
    attempt: int  # 1 for the request's first migration
    num_resumed_tokens: int  # output tokens the next replica recomputes (the client has them)


def migration_reason(exc: BaseException) -> str | None:
    """REPLICA_DIED / KV_LOST when ``exc`` is a failure another replica can recover from, else None."""
    inner = unwrap(exc)
    if isinstance(inner, NoReplicaError) or isinstance(exc, NoReplicaError):
        return None
    if isinstance(inner, _KV_LOST):
        return KV_LOST
    if isinstance(inner, _REPLICA_DIED) or isinstance(exc, _REPLICA_DIED):
        return REPLICA_DIED
    return None


async def migrating_stream(run: Callable[[GenerateCall, Control], AsyncIterator[StreamChunk]], call: GenerateCall,
                           ctl: Control, config: MigrationConfig,
                           on_migration: Callable[[Migration], None] = lambda m: None) -> AsyncIterator[StreamChunk]:
    """``run(call, ctl)``'s chunks (a pipeline's ``run``); after a recoverable failure, those of
    ``run`` of the request resumed after the tokens yielded so far (module docstring)."""
    sent: list[int] = []  # output tokens yielded, in order
    cached = (0, 0)  # (num_cached_tokens, num_redis_cached_tokens) of the first placement
    drafts = _DraftCounts()  # speculative decoding counts: the earlier placements' plus this one's
    current, attempt = call, 0
    while True:
        try:
            async for chunk in run(current, ctl):
                if current.resume_token_ids:
                    chunk.num_cached_tokens, chunk.num_redis_cached_tokens = cached
                else:
                    cached = (chunk.num_cached_tokens, chunk.num_redis_cached_tokens)
                drafts.carry(chunk)
                sent.extend(chunk.token_ids)
                yield chunk
            return
        except Exception as exc:
            drafts.next_placement()
            reason = migration_reason(exc)
            if reason is None or ctl.cancelled or attempt >= config.max_migrations:
                raise
            attempt += 1
            role, replica = ctl.current or ("", "")
            if reason == REPLICA_DIED and replica:
                ctl.excluded.add(replica)
            log.warning("request %s: %s replica %s failed (%s: %s); migrating with %d tokens (attempt %d of %d)",
                        call.request_id, role, replica, reason, type(unwrap(exc)).__name__, len(sent), attempt,
                        config.max_migrations)
            on_migration(Migration(reason, role, replica, attempt, len(sent)))
            current = dataclasses.replace(call, resume_token_ids=list(sent))


class _DraftCounts:
    """A request's speculative decoding counts across placements: each replica counts from 0, so
    a chunk of a later placement gets the counts of the earlier ones added."""

    FIELDS = ("num_drafts", "num_draft_tokens", "num_accepted_draft_tokens")

    def __init__(self):
        self.earlier = [0, 0, 0]  # counts of the placements before the current one
        self.current = [0, 0, 0]  # the latest chunk's counts, the earlier ones included

    def carry(self, chunk: StreamChunk) -> None:
        for i, name in enumerate(self.FIELDS):
            setattr(chunk, name, getattr(chunk, name) + self.earlier[i])
            self.current[i] = getattr(chunk, name)

    def next_placement(self) -> None:
        self.earlier = list(self.current)
