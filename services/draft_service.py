"""What a DraftWorker replica does, without Ray: per-sequence contexts from the engines' deltas,
and drafts from the engine's own ``DraftModelProposer`` (services/engine/spec_decode/draft_model.py).

Glossary
- client: one engine (a decode or unified replica) calling this DraftWorker; ``DraftCall.client_id``.
- session: what is held for one (client, sequence): a mirror ``Request`` whose prompt and output
  are the target's tokens as the client sent them, and the last time a call mentioned it.
- delta: ``DraftSequence``: the target's tokens from ``start`` on. The mirror holds ``known``
  tokens; a delta with ``start <= known`` whose overlap matches is applied (idempotent: a call
  repeated after a lost reply changes nothing twice); ``start == 0`` replaces the session; any
  other delta is a resync: the session is dropped and the answer is ``num_known = 0``.

The mirrors are what ``DraftModelProposer.propose`` sees as the target's requests, so it does
here exactly what it does inside an engine: its shadow of each sequence (the mirror's tokens plus
the last draft) is reconciled with the mirror at every call, the KV of draft tokens the target
rejected is rolled back, new tokens run as one chunk, then k - 1 single-token steps, batched over
every sequence of every call in the batch. A seeded sampled sequence draws its draft tokens from a
generator seeded by (seed, position) on a stream of its own (``draft_seed``), so the drafts are
reproducible and independent of the target's own draws.

Not thread-safe: the DraftWorker runs one ``propose`` / ``release`` at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.config import DraftWorkerConfig
from services.engine.config import resolve_device
from services.engine.model_config import ModelConfig
from services.engine.request import Request
from services.engine.runner import kv_bytes_per_block
from services.engine.sampler import position_seed
from services.engine.spec_decode.base import NO_DRAFT, Draft, Proposer, TargetInfo
from services.engine.spec_decode.draft_model import DraftModelProposer
from services.engine.tokenizer import Tokenizer
from services.types import DraftCall, DraftProposal, DraftReply, DraftSequence, DraftWorkerStats

DRAFT_STREAM = 0x6472616674  # "draft": the seed of a sequence's draft draws is position_seed(seed ^ this, i)


def draft_seed(seed: int, position: int) -> int:
    """The seed of the draft draws of output position ``position`` of a request seeded ``seed``."""
    return position_seed(seed ^ DRAFT_STREAM, position)


def target_info(config: DraftWorkerConfig) -> TargetInfo:
    """What an engine of ``config.target`` would tell its proposer (services/engine/assembly.py),
    read from the target's config and tokenizer only (its weights are not loaded here)."""
    target = config.target
    device, dtype = resolve_device(target)
    mc = ModelConfig.from_path(target.model)
    cache = target.cache
    num_blocks = cache.num_kv_blocks or max(1, cache.memory_bytes // kv_bytes_per_block(
        mc.num_layers, cache.block_size, mc.num_kv_heads, mc.head_dim, dtype))
    return TargetInfo(mc, Tokenizer(target.model), device, dtype, cache.block_size, num_blocks,
                      target.max_model_len or mc.max_position_embeddings, target.seed)


@dataclass
class _Session:
    mirror: Request  # the target's tokens of the sequence (prompt + output), as sent
    last_used: float  # monotonic time a call last mentioned it


class DraftService:
    """Sessions and drafts of one DraftWorker replica (module docstring)."""

    def __init__(self, proposer: Proposer, vocab_size: int, session_ttl_s: float = 60.0,
                 replica_id: str = "", clock: Callable[[], float] = time.monotonic):
        self.proposer = proposer  # a DraftModelProposer (any Proposer in tests)
        self.vocab_size = vocab_size  # token ids must be below it
        self.session_ttl_s = session_ttl_s
        self.replica_id = replica_id
        self.clock = clock
        self.sessions: dict[str, _Session] = {}  # "client/seq" -> session
        self.stats = DraftWorkerStats(replica_id, 0, 0, 0)
        self._next_sweep = 0.0

    @classmethod
    def from_config(cls, config: DraftWorkerConfig, replica_id: str = "") -> "DraftService":
        target = target_info(config)
        return cls(DraftModelProposer(config.draft, target), target.model_config.vocab_size, config.session_ttl_s,
                   replica_id)

    # ---- calls ---------------------------------------------------------------------------
    def propose(self, calls: Sequence[DraftCall], now: float | None = None) -> list[DraftReply]:
        """Apply every call's releases and deltas, then draft for all their sequences at once
        (one batched ``Proposer.propose``); one reply per call. A call past its ``deadline``
        (``now``: time.time()) keeps its contexts and gets no tokens."""
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        self._sweep()
        asks: list[Request] = []
        limits: list[int] = []
        known: list[list[tuple[str, Request | None, int]]] = []
        for call in calls:
            self.release(call.client_id, call.released)
            late = bool(call.deadline) and now > call.deadline
            self.stats.num_late_calls += late
            entries = []
            for i, seq in enumerate(call.sequences):
                mirror = self._apply(call.client_id, seq, f"sequences[{i}]")
                entries.append((seq.seq_id, mirror, seq.max_tokens))
                if mirror is not None and seq.max_tokens > 0 and not late:
                    asks.append(mirror)
                    limits.append(seq.max_tokens)
            known.append(entries)
        for mirror in asks:
            if mirror.generator is not None:
                mirror.generator.manual_seed(draft_seed(mirror.params.seed, len(mirror.output_token_ids)))
        drafts = dict(zip((m.request_id for m in asks), self.proposer.propose(asks, limits))) if asks else {}
        self.stats.num_calls += len(calls)
        replies = [DraftReply(self.replica_id, [self._proposal(sid, m, drafts) for sid, m, _ in entries])
                   for entries in known]
        self.stats.propose_seconds += time.perf_counter() - t0
        return replies

    def release(self, client_id: str, seq_ids: Sequence[str]) -> None:
        """Forget these sequences of ``client_id`` (their KV is freed); unknown ids are ignored."""
        for sid in seq_ids:
            self._drop(_key(client_id, sid))

    def snapshot(self) -> DraftWorkerStats:
        kv = getattr(self.proposer, "kv", None)
        s = self.stats
        s.num_sequences = len(self.sessions)
        s.kv_blocks_total = kv.pool.num_blocks if kv is not None else 0
        s.kv_blocks_free = kv.num_free_blocks if kv is not None else 0
        return DraftWorkerStats(**vars(s))

    # ---- sessions ------------------------------------------------------------------------
    def _apply(self, client_id: str, seq: DraftSequence, where: str) -> Request | None:
        """The sequence's mirror with ``seq``'s tokens applied, or None (dropped: a resync)."""
        self._check(seq, where)
        key = _key(client_id, seq.seq_id)
        session = self.sessions.get(key)
        if seq.start == 0:
            if session is not None and (session.mirror.num_tokens > len(seq.token_ids)
                                        or not _same_prefix(session.mirror, seq)):
                self._drop(key)
                session = None
            if session is None:
                session = self.sessions[key] = _Session(self._mirror(key, seq), self.clock())
        elif session is None or seq.start > session.mirror.num_tokens or not _same_prefix(session.mirror, seq):
            self._drop(key)
            self.stats.num_resyncs += 1
            return None
        mirror = session.mirror
        have = mirror.num_tokens - seq.start
        mirror.output_token_ids.extend(seq.token_ids[have:])
        session.last_used = self.clock()
        self.stats.num_accepted_tokens += seq.num_accepted
        return mirror

    def _mirror(self, key: str, seq: DraftSequence) -> Request:
        if seq.params is None:
            raise ValueError(f"params: required with start 0 (sequence {seq.seq_id!r})")
        n = seq.num_prompt_tokens
        mirror = Request(key, list(seq.token_ids[:n]), seq.params)
        mirror.output_token_ids = list(seq.token_ids[n:])
        if seq.params.seed is not None and not seq.params.greedy:
            mirror.generator = torch.Generator(device="cpu")
        return mirror

    def _check(self, seq: DraftSequence, where: str) -> None:
        if not isinstance(seq.seq_id, str) or not seq.seq_id:
            raise ValueError(f"{where}.seq_id: must be a non-empty string")
        if isinstance(seq.start, bool) or not isinstance(seq.start, int) or seq.start < 0:
            raise ValueError(f"{where}.start: must be an integer >= 0, got {seq.start!r}")
        if not 1 <= seq.num_prompt_tokens or (seq.start == 0 and seq.num_prompt_tokens > len(seq.token_ids)):
            raise ValueError(f"{where}.num_prompt_tokens: {seq.num_prompt_tokens} does not fit the tokens sent")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in seq.token_ids):
            raise ValueError(f"{where}.token_ids: must be token ids in [0, {self.vocab_size})")

    def _proposal(self, seq_id: str, mirror: Request | None, drafts: dict[str, Draft]) -> DraftProposal:
        if mirror is None:
            return DraftProposal(seq_id, 0)
        draft = drafts.get(mirror.request_id, NO_DRAFT)
        self.stats.num_proposed_tokens += len(draft.token_ids)
        probs = None
        if draft.probs is not None:
            probs = np.ascontiguousarray(draft.probs.detach().to("cpu", torch.float32).numpy())
        return DraftProposal(seq_id, mirror.num_tokens, list(draft.token_ids), probs)

    def _drop(self, key: str) -> None:
        if self.sessions.pop(key, None) is not None:
            self.proposer.release(key)

    def _sweep(self) -> None:
        """Drop the sessions no call mentioned for ``session_ttl_s`` (at most once a second)."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        stale = [k for k, s in self.sessions.items() if now - s.last_used > self.session_ttl_s]
        for key in stale:
            self._drop(key)
        self.stats.num_expired += len(stale)


def _key(client_id: str, seq_id: str) -> str:
    return f"{client_id}/{seq_id}"


def _same_prefix(mirror: Request, seq: DraftSequence) -> bool:
    """Whether the tokens ``seq`` sends that the mirror already holds are the same ones."""
    upto = min(mirror.num_tokens, seq.start + len(seq.token_ids))
    if seq.start == 0 and mirror.num_prompt_tokens != seq.num_prompt_tokens:
        return False
    return mirror.token_at(seq.start, upto) == list(seq.token_ids[:upto - seq.start])
