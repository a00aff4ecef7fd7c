"""Every type that crosses a Ray handle between the router and the workers.

Seams (DESIGN.md "Seams"):

    router --GenerateCall--> unified worker --StreamChunk...--> router
    router --GenerateCall--> prefill worker --PrefillResult (first token + KVHandle)--> router
    router --DecodeCall (KVHandle)--> decode worker --StreamChunk...--> router
    engine (decode / unified worker) --DraftCall--> DraftWorker --DraftReply--> engine  (one per engine step)
    engine MoE layer --ExpertCall--> ExpertWorker shard --ExpertReply--> engine  (one per shard, layer and step)

Tensors never pass through the router: a ``KVHandle`` names the KV blocks inside the
transfer backend (an object-store reference for the Ray backend), the decode worker
fetches them itself. Each type carries ``traceparent`` (W3C trace context) so one trace
follows the request across processes.

Errors cross handles as exceptions; Ray re-raises them in the caller as ``RayTaskError``
subclasses of the original class, so the router maps them by ``isinstance``:
``ValueError`` (bad input, the message starts with the field name),
``EngineOverloadedError`` (admission limits), ``KVTransferError``, ``PrefillFailedError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.engine.outputs import TokenChunk
from services.engine.sampling_params import SamplingParams


class KVTransferError(RuntimeError):
    """The KV of a request could not be sent, fetched or adopted; the request fails."""


class PrefillFailedError(RuntimeError):
    """The prefill worker could not produce the first token and KV of a request."""


@dataclass(frozen=True)
class ModelInfo:
    """What the router needs to know about the served model."""

    model_id: str  # the id clients pass as GenerateRequest.model
    max_model_len: int  # prompt + output tokens at most
    vocab_size: int  # token ids must be < vocab_size
    eos_token_ids: tuple[int, ...]  # ids that end generation unless ignore_eos
    block_size: int  # tokens per KV block
    traceparent: str = ""  # W3C trace context of the call that asked
    block_hash_seed: bytes = b""  # seed of the engine's block-hash chain (model fingerprint, dtype, block size)


@dataclass
class GenerateCall:
    """One validated, tokenized request (router -> unified or prefill worker; a migrated one with
    ``resume_token_ids`` -> unified or decode worker)."""

    request_id: str  # unique among running requests; the engine request id on every worker
    prompt_token_ids: list[int]  # the prompt, already tokenized and checked against the vocabulary
    params: SamplingParams  # validated sampling parameters (the engine's own type)
    priority: int = 0  # lower is served first
    deadline: float | None = None  # unix time after which the request is abandoned; None = none
    traceparent: str = ""  # W3C trace context of the router's span
    # output the client already has (a request migrated after its replica died: router/migration.py);
    # recomputed with the prompt, the output goes on after it ([] = a new request)
    resume_token_ids: list[int] = field(default_factory=list)


@dataclass
class StreamChunk:
    """New output of one request since its previous chunk (worker -> router, streamed).

    Several engine steps' tokens are merged into one chunk when the router reads slower than
    the engine produces, so there is no handle message per token (``merge_chunks``, the same
    rule as the engine's ``TokenChunk``; ``from_engine`` converts one).
    """

    token_ids: list[int] = field(default_factory=list)  # new tokens
    text: str = ""  # new text (held back while it could begin a stop string)
    logprobs: list[dict[int, float]] | None = None  # per new token {token_id: logprob}, when asked
    finish_reason: str | None = None  # None until the last chunk; then "stop" | "length" | "abort"
    num_prompt_tokens: int = 0  # prompt length
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache (local + Redis tier)
    num_output_tokens: int = 0  # output tokens so far, this chunk included
    traceparent: str = ""  # W3C trace context of the worker's span
    num_redis_cached_tokens: int = 0  # of num_cached_tokens, loaded from the Redis tier (the rest: local)
    queue_time_s: float | None = None  # engine arrival -> first scheduled, on a worker's own chunks (telemetry)
    emitted_at: float | None = None  # time.time() the engine produced the oldest token here (router token delay)
    arrived_at: float | None = None  # time.time() the oldest token here reached the router (set there: router dwell)
    # speculative decoding so far, cumulative like num_output_tokens (the final usage reports them)
    num_drafts: int = 0  # engine steps that verified a draft of this request
    num_draft_tokens: int = 0  # draft tokens the target verified
    num_accepted_draft_tokens: int = 0  # of those, accepted

    @classmethod
    def from_engine(cls, chunk: TokenChunk, traceparent: str = "") -> "StreamChunk":
        """The wire form of an engine chunk, field by field. Not sent: ``request_id`` (the
        channel keys chunks by it) and ``stop_reason`` (the client sees ``finish_reason``).
        Two chunks of either type merge with ``services.engine.outputs.merge_chunks``."""
        return cls(token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs,
                   finish_reason=chunk.finish_reason, num_prompt_tokens=chunk.num_prompt_tokens,
                   num_cached_tokens=chunk.num_cached_tokens, num_output_tokens=chunk.num_output_tokens,
                   traceparent=traceparent, num_redis_cached_tokens=chunk.num_imported_cached_tokens,
                   queue_time_s=chunk.queue_time_s, emitted_at=chunk.emitted_at, num_drafts=chunk.num_drafts,
                   num_draft_tokens=chunk.num_draft_tokens, num_accepted_draft_tokens=chunk.num_accepted_draft_tokens)


@dataclass
class KVHandle:
    """Where the prompt KV of one request waits between prefill and decode.

    The payload behind it is one array ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
    head_dim]`` (K then V), blocks in prompt order; the last block may be partly filled.
    """

    backend: str  # name of the KVTransfer backend that holds it ("ray", later "redis", "nccl")
    request_id: str  # the request the KV belongs to
    num_tokens: int  # prompt tokens covered (the first sampled token is not in it)
    num_blocks: int  # blocks in the payload
    block_size: int  # tokens per block; must equal the decode engine's
    dtype: str  # torch dtype name of the KV ("float32", "bfloat16", ...)
    shape: tuple[int, ...]  # payload shape, see above
    locator: Any = None  # backend-specific reference (Ray: an ObjectRef; Redis: a key)
    traceparent: str = ""  # W3C trace context of the prefill span


@dataclass
class PrefillResult:
    """The prefill worker's answer: the first token, and the KV for decode unless finished."""

    request_id: str  # the request's id
    first: StreamChunk  # the first token; finish_reason set when the request already ended
    kv: KVHandle | None  # the prompt's KV; None when ``first`` finished the request
    traceparent: str = ""  # W3C trace context of the prefill span


@dataclass
class DecodeCall:
    """Continue a prefilled request on a decode worker (router -> decode worker)."""

    call: GenerateCall  # the original request
    first_token: int  # the token the prefill sampled (already sent to the client)
    first_logprobs: dict[int, float] | None  # its logprobs, when asked
    kv: KVHandle  # the prompt's KV to adopt
    num_cached_tokens: int = 0  # prompt tokens the prefill served from its prefix cache
    traceparent: str = ""  # W3C trace context of the router's span


@dataclass
class WorkerStats:
    """Gauges and counters of one worker replica (admin/debug call)."""

    role: str  # "unified" | "prefill" | "decode"
    replica_id: str  # Serve replica id ("" outside Serve)
    node_id: str  # Ray node id the replica runs on
    kv_blocks_total: int  # blocks in the engine's pool
    kv_blocks_free: int  # blocks not held by any request (cached-but-free count as free)
    num_running: int  # requests in the running batch
    num_waiting: int  # requests queued for admission
    num_open_streams: int  # requests this replica is serving now (streams, prefills, adoptions)
    num_kv_sent: int = 0  # KV payloads handed to the transfer backend since start
    num_kv_adopted: int = 0  # KV payloads adopted into the engine since start
    num_kv_held: int = 0  # KV payloads sent and not yet released (prefill; in flight to decode)
    traceparent: str = ""  # W3C trace context of the call that asked
    metrics_address: str = ""  # host:port of this replica's Prometheus /metrics ("" = not served)


# ---- the token channel (router <-> worker; services/stream_channel.py, router/channels.py) ----
class WrongReplicaError(RuntimeError):
    """A call meant for one replica reached another (it left the replica set); the router re-routes."""


@dataclass(frozen=True)
class Route:
    """Where a per-request ``submit`` or a ``channel`` call must run, and whose channel gets the chunks."""

    router_id: str  # the calling router replica (its channel on this worker receives the chunks); on a
    #   DraftWorker call: the calling engine's client id (DraftCall.client_id)
    replica_id: str  # the Serve replica id the call is meant for ("" = any replica)
    traceparent: str = ""  # W3C trace context of the router's span


@dataclass
class ChunkBatch:
    """New output of every request one router has on one worker since the previous batch
    (worker -> router, one streamed item per engine step or fewer when the router reads slowly)."""

    chunks: list[tuple[str, StreamChunk]]  # (request_id, chunk), at most one chunk per request
    traceparent: str = ""  # W3C trace context (unused: batches mix requests)


# ---- routing stats (worker -> every handle's request router; services/routing_report.py) ----
@dataclass(frozen=True)
class RoutingStats:
    """What a worker replica reports to the routers each stats interval (Serve's
    ``record_routing_stats``; read by router/channels.py when it chooses a replica).

    Crosses Serve as a plain dict (``as_dict`` on the worker, ``from_dict`` on the router):
    Serve 2.60 types the value ``Dict[str, Any]`` and its controller unpickles it in its own
    process, which must not need our code to do so. No traceparent: no request's.
    """

    load: int = 0  # requests running + waiting in the engine
    kv_free: int = 0  # free KV blocks (cached-but-free ones count as free)
    block_keys: bytes = b""  # keys of the newest cached full blocks, uint64 LE (router/prefix_routing.py); b"": decode

    def as_dict(self) -> dict:
        return {"load": self.load, "kv_free": self.kv_free, "block_keys": self.block_keys}

    @classmethod
    def from_dict(cls, data: dict | None) -> "RoutingStats":
        """The stats Serve passed on ({} before the replica's first report: all zero)."""
        data = data or {}
        return cls(load=int(data.get("load", 0)), kv_free=int(data.get("kv_free", 0)),
                   block_keys=data.get("block_keys", b""))


# ---- speculative decoding: engine <-> DraftWorker (services/draft_client.py, services/draft_worker.py) ----
# One ``propose`` call per engine step carries every running sequence's context delta; the
# DraftWorker keeps each sequence's tokens and its own paged KV between calls, keyed by
# (client_id, seq_id). Deltas are idempotent: ``start`` says where the tokens begin, so a call
# whose reply was lost (timeout) can be repeated; a DraftWorker that does not hold a sequence
# (a new replica, a TTL drop) answers ``num_known=0`` and the client sends the whole context next.
@dataclass
class DraftSequence:
    """One sequence's context delta in a ``DraftCall``."""

    seq_id: str  # the engine's request id (unique among the client's running requests)
    start: int  # position in prompt + output of token_ids[0]: what the DraftWorker last said it holds (0 = all)
    token_ids: list[int]  # the target's tokens from ``start`` to the last known one (accepted drafts included)
    num_prompt_tokens: int  # the prompt's length (prompt + output = the first num_prompt_tokens + the rest)
    num_accepted: int = 0  # of the previous draft the client received for it, tokens the target accepted
    max_tokens: int = 0  # draft tokens wanted this step (<= k); 0 = keep the context only
    params: SamplingParams | None = None  # the request's sampling parameters; sent with start == 0 only


@dataclass
class DraftCall:
    """The drafts one engine wants for this step (engine -> DraftWorker ``propose``)."""

    client_id: str  # the calling engine (its replica id, or a random id); scopes seq ids
    sequences: list[DraftSequence]  # every sequence to propose for (or to keep up to date)
    released: list[str] = field(default_factory=list)  # seq ids that finished or were aborted: freed first
    deadline: float = 0.0  # time.time() after which the client no longer waits: nothing is proposed then
    traceparent: str = ""  # W3C trace context ("": a step mixes requests)


@dataclass
class DraftProposal:
    """The draft of one sequence (DraftWorker -> engine)."""

    seq_id: str  # DraftSequence.seq_id
    num_known: int  # target tokens the DraftWorker holds for it now (the next delta's start); 0 = none
    token_ids: list[int] = field(default_factory=list)  # the proposed tokens, at most max_tokens (maybe none)
    probs: np.ndarray | None = None  # [len(token_ids), V] float32 draft probabilities q (sampled); None = one-hot


@dataclass
class DraftReply:
    """The DraftWorker's answer to one ``DraftCall``."""

    replica_id: str  # the replica that answered: the client's next calls go there (its KV is there)
    proposals: list[DraftProposal]  # one per DraftCall.sequences entry, in order
    traceparent: str = ""  # W3C trace context (unused)
    # the answering replica's Ray actor as (namespace, name), for plain actor calls that skip the
    # Serve handle (services/draft_direct.py); ("", "") = none (outside Serve)
    actor: tuple[str, str] = ("", "")


@dataclass
class DraftRelease:
    """Sequences that ended (engine -> DraftWorker ``release``, batched; also ``DraftCall.released``)."""

    client_id: str  # DraftCall.client_id
    seq_ids: list[str]  # their KV is freed; unknown ids are ignored
    traceparent: str = ""  # W3C trace context (unused)


@dataclass
class DraftWorkerStats:
    """Gauges and counters of one DraftWorker replica (admin/debug call, tests)."""

    replica_id: str  # Serve replica id ("" outside Serve)
    num_sequences: int  # sequences held (their tokens and KV)
    kv_blocks_total: int  # blocks in the draft's KV pool
    kv_blocks_free: int  # of those, not held by a sequence (cached-but-free count as free)
    num_calls: int = 0  # propose calls answered
    num_proposed_tokens: int = 0  # draft tokens returned
    num_accepted_tokens: int = 0  # of those, accepted by the targets (as the clients reported)
    num_late_calls: int = 0  # calls that arrived past their deadline (contexts kept, nothing proposed)
    num_resyncs: int = 0  # sequences answered num_known=0 (unknown here, or a delta that did not fit)
    num_expired: int = 0  # sequences dropped by the TTL (their engine went away without releasing them)
    propose_seconds: float = 0.0  # summed time spent applying deltas and drafting (the rest of a round trip is transport)
    traceparent: str = ""  # W3C trace context of the call that asked


# ---- engine (MoE layer) <-> ExpertWorker shard (services/expert_worker.py) -------------------
# One call per shard per MoE layer per engine step. Rows travel as raw numpy arrays (Ray moves
# them through the object store without a pickled copy); bfloat16 rows as their bits (uint16).
@dataclass
class ExpertCall:
    """One MoE layer's rows for one shard in one engine step (engine -> ExpertWorker ``run``)."""

    layer: int  # decoder layer index (a MoE layer)
    experts: list[int]  # the shard's experts that got rows this step, ascending
    counts: list[int]  # rows of each of them (>= 1), in that order
    hidden: np.ndarray  # [sum(counts), D] the rows grouped by expert; float32/float16, or bfloat16 bits as uint16
    dtype: str  # "float32" | "float16" | "bfloat16": what hidden's elements are (the engine's compute dtype)
    traceparent: str = ""  # W3C trace context ("": a step mixes requests)


@dataclass
class ExpertReply:
    """A shard's answer to one ``ExpertCall``."""

    output: np.ndarray  # [sum(counts), D] expert outputs of the rows, same row order and dtype encoding
    replica_id: str  # the replica that answered
    compute_s: float = 0.0  # seconds the shard spent computing (the rest of the call is transport)
    traceparent: str = ""  # W3C trace context (unused)


@dataclass
class ExpertWorkerStats:
    """What one ExpertWorker replica holds and did (admin/debug call, tests)."""

    replica_id: str  # Serve replica id ("" outside Serve)
    shard: int  # shard index
    first_expert: int  # the shard's experts are [first_expert, last_expert) of every MoE layer
    last_expert: int  # one past the last
    num_layers: int  # MoE layers held
    weight_bytes: int  # expert weight bytes held
    num_calls: int = 0  # run calls answered
    num_rows: int = 0  # token rows computed (a token routed to two of its experts counts twice)
    pid: int = 0  # the replica's process id
    traceparent: str = ""  # W3C trace context of the call that asked
