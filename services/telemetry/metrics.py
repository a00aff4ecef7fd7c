"""Prometheus metrics of one process (the metric contract of issue 5) and its /metrics server.

Every process has its own ``CollectorRegistry`` and serves it as Prometheus text on
``http://HOST:PORT/metrics`` (see ``config.MetricsConfig``). Labels on every metric:
``model``, ``role`` ("router" | "unified" | "prefill" | "decode"), ``replica``; a few carry
one more bounded label (finish_reason, code, tier, op, direction). Never a request id.

Router: ``RouterMetrics`` (request-level histograms and counters, updated per request).
Workers: ``WorkerMetrics`` (queue time and KV transfer, updated per request) plus
``EngineCollector``, which reads the engine's gauges and the prefix store's counters at
scrape time, so nothing here imports the engine or the store.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.telemetry.config import WORKER_METRICS_PORTS, MetricsConfig

log = logging.getLogger("tandem.telemetry")
LABELS = ("model", "role", "replica")

# Buckets (seconds). Latencies of a 2-core box and of a GPU fleet both need to fit.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0, 160.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Fine enough below 1 ms to read the p50 of issue 3's "router adds <= 1 ms per token", and from
# 5 to 30 ms, where the 2-core box measures it (bench serve --router-metrics).
# one shard call per MoE layer and step: a Serve handle round trip is 3-8 ms on the 2-core box
EXPERT_CALL_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                       1.0, 2.5, 5.0, 10.0)
TOKEN_DELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
                       0.25, 0.5, 1.0, 2.5)

# The metric contract of issue 5: Prometheus name as exposed -> type (counters end in _total).
CONTRACT: dict[str, str] = {
    # router
    "tandem_time_to_first_token_seconds": "histogram",
    "tandem_inter_token_latency_seconds": "histogram",
    "tandem_e2e_request_latency_seconds": "histogram",
    "tandem_prompt_tokens_total": "counter",
    "tandem_generation_tokens_total": "counter",
    "tandem_requests_finished_total": "counter",
    "tandem_requests_failed_total": "counter",
    "tandem_requests_inflight": "gauge",
    "tandem_router_token_delay_seconds": "histogram",
    "tandem_router_dwell_seconds": "histogram",
    "tandem_migrations_total": "counter",
    # workers
    "tandem_request_queue_time_seconds": "histogram",
    "tandem_requests_running": "gauge",
    "tandem_requests_waiting": "gauge",
    "tandem_kv_blocks_used": "gauge",
    "tandem_kv_blocks_total": "gauge",
    "tandem_prefix_cache_queries_total": "counter",
    "tandem_prefix_cache_hits_total": "counter",
    "tandem_prefix_cache_corrupt_blobs_total": "counter",
    "tandem_redis_errors_total": "counter",
    "tandem_redis_breaker_open": "gauge",
    "tandem_kv_transfer_bytes_total": "counter",
    "tandem_kv_transfer_seconds": "histogram",
    "tandem_spec_decode_num_drafts_total": "counter",
    "tandem_spec_decode_num_draft_tokens_total": "counter",
    "tandem_spec_decode_num_accepted_tokens_total": "counter",
    "tandem_spec_decode_num_accepted_tokens_per_pos_total": "counter",
    "tandem_spec_decode_draft_worker_calls_total": "counter",
    "tandem_spec_decode_draft_worker_failures_total": "counter",
    "tandem_spec_decode_draft_worker_steps_without_drafts_total": "counter",
    "tandem_spec_decode_draft_worker_call_seconds_total": "counter",
    # MoE expert backends with a cache (offload), per layer and backend
    "tandem_expert_cache_hits_total": "counter",
    "tandem_expert_cache_misses_total": "counter",
    "tandem_expert_prefetch_loads_total": "counter",
    "tandem_expert_prefetch_hits_total": "counter",
    "tandem_expert_loaded_bytes_total": "counter",
    "tandem_expert_resident_bytes": "gauge",
    "tandem_expert_cache_capacity_bytes": "gauge",
    "tandem_expert_window_hit_rate": "gauge",
    "tandem_expert_window_oracle_hit_rate": "gauge",
    # MoE experts in ExpertWorker shards (remote), per shard, measured by the calling worker
    "tandem_expert_remote_call_seconds": "histogram",
    "tandem_expert_remote_call_failures_total": "counter",
}
FINISH_REASONS = ("stop", "length", "abort")
# Status codes a request fails with (router/errors.py), exported at 0 from the start so that
# rate() and alerts see them before the first failure; others appear when they happen.
FAILURE_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE",
                 "INTERNAL")
MIGRATION_REASONS = ("replica_died", "kv_lost")  # router/migration.py; exported at 0 from the start
PREFIX_TIERS = ("local", "redis")
REDIS_OPS = ("exists", "get", "set", "delete")  # always exported (zero until an error)
DIRECTIONS = ("send", "fetch")


@dataclass(frozen=True)
class Identity:
    """The constant labels of one process."""

    model: str  # served model id
    role: str  # "router" | "unified" | "prefill" | "decode"
    replica: str  # Serve replica id (or another id unique in the fleet)

    @property
    def values(self) -> tuple[str, str, str]:
        return (self.model, self.role, self.replica)


class RouterMetrics:
    """Request-level metrics of one router replica."""

    def __init__(self, identity: Identity, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg, ids = self.registry, identity.values
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Request arrival at the router to its first "
                              "token sent", LABELS, registry=reg, buckets=TTFT_BUCKETS).labels(*ids)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Time between output tokens as the client sees "
                             "them (a chunk of n tokens after t seconds counts n times t/n)", LABELS, registry=reg,
                             buckets=ITL_BUCKETS).labels(*ids)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Request arrival to its last token (finished "
                             "requests)", LABELS, registry=reg, buckets=E2E_BUCKETS).labels(*ids)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of the requests sent to the workers",
                                     LABELS, registry=reg).labels(*ids)
        self.generation_tokens = Counter("tandem_generation_tokens", "Output tokens sent to clients", LABELS,
                                         registry=reg).labels(*ids)
        finished = Counter("tandem_requests_finished", "Requests finished, by finish reason",
                           LABELS + ("finish_reason",), registry=reg)
        self.finished = {r: finished.labels(*ids, r) for r in FINISH_REASONS}
        self._failed = Counter("tandem_requests_failed", "Requests failed, by gRPC status code",
                               LABELS + ("code",), registry=reg)
        self._ids = ids
        for code in FAILURE_CODES:
            self.failed(code)
        self._migrations = Counter("tandem_migrations", "Streams moved to another worker replica after theirs "
                                   "failed (the client saw no error), by reason", LABELS + ("reason",), registry=reg)
        for reason in MIGRATION_REASONS:
            self.migrations(reason)
        self.inflight = Gauge("tandem_requests_inflight", "Requests this router replica is serving now", LABELS,
                              registry=reg).labels(*ids)
        self.token_delay = Histogram(
            "tandem_router_token_delay_seconds", "Engine output to the response message handed to the client's "
            "gRPC stream, once per message that carries tokens (its oldest token's delay): worker event loop, Ray "
            "streaming transport, router demux and encoding. CPU the serving processes take from the engine is not "
            "in it (that shows in throughput)", LABELS, registry=reg, buckets=TOKEN_DELAY_BUCKETS).labels(*ids)
        self.dwell = Histogram(
            "tandem_router_dwell_seconds", "Arrival at the router (its channel from the worker, or the prefill "
            "result) to the response message handed to the client's gRPC stream, once per message that carries "
            "tokens (its oldest token's): the router's own share of tandem_router_token_delay_seconds: demux, the "
            "wait in the request's inbox until its task runs, building the protobuf. Queueing behind other "
            "streams' messages on the router's event loop is in it", LABELS, registry=reg,
            buckets=TOKEN_DELAY_BUCKETS).labels(*ids)

    def failed(self, code_name: str):
        """The failed-requests counter of one status code (gRPC names: a bounded set)."""
        return self._failed.labels(*self._ids, code_name)

    def migrations(self, reason: str):
        """The migrations counter of one reason (MIGRATION_REASONS)."""
        return self._migrations.labels(*self._ids, reason)


class WorkerMetrics:
    """Per-request metrics of one worker replica (the gauges come from ``EngineCollector``)."""

    def __init__(self, identity: Identity, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg, ids = self.registry, identity.values
        self.queue_time = Histogram("tandem_request_queue_time_seconds", "Arrival in the engine to first scheduled "
                                    "(decode: to adopted, i.e. waiting for KV blocks)", LABELS, registry=reg,
                                    buckets=QUEUE_BUCKETS).labels(*ids)
        nbytes = Counter("tandem_kv_transfer_bytes", "KV payload bytes sent (prefill) or fetched (decode)",
                         LABELS + ("direction",), registry=reg)
        seconds = Histogram("tandem_kv_transfer_seconds", "Time to send (prefill) or fetch (decode) one request's "
                            "KV", LABELS + ("direction",), registry=reg, buckets=TRANSFER_BUCKETS)
        self.transfer_bytes = {d: nbytes.labels(*ids, d) for d in DIRECTIONS}
        self.transfer_seconds = {d: seconds.labels(*ids, d) for d in DIRECTIONS}
        self._ids = ids
        self._expert_seconds = Histogram(
            "tandem_expert_remote_call_seconds", "One ExpertWorker shard call of a MoE layer's step, sent to answered "
            "(handle round trip: transport + the shard's compute), by shard", LABELS + ("shard",), registry=reg,
            buckets=EXPERT_CALL_BUCKETS)
        self._expert_failures = Counter("tandem_expert_remote_call_failures", "ExpertWorker shard calls that failed "
                                        "or were not answered in time (the step's requests failed), by shard",
                                        LABELS + ("shard",), registry=reg)

    def expert_call(self, shard: int, seconds: float, ok: bool) -> None:
        """One remote expert call (services/expert_client.py ``ExpertCallLog`` observer)."""
        if ok:
            self._expert_seconds.labels(*self._ids, str(shard)).observe(seconds)
        else:
            self._expert_failures.labels(*self._ids, str(shard)).inc()


def _get(source: Any, name: str, default: float = 0) -> float:
    value = source.get(name, default) if isinstance(source, dict) else getattr(source, name, default)
    return float(value or 0)


def _spec_decode_counters(ids: list[str], s: Any) -> Iterable:
    """Speculative decoding counters with vLLM's names and meanings (``vllm:spec_decode_*``)."""
    for name, doc, field_name in (
            ("tandem_spec_decode_num_drafts", "Drafts verified (one per request and step with a draft)",
             "spec_num_drafts"),
            ("tandem_spec_decode_num_draft_tokens", "Draft tokens verified", "spec_num_draft_tokens"),
            ("tandem_spec_decode_num_accepted_tokens", "Draft tokens accepted", "spec_num_accepted_tokens")):
        c = CounterMetricFamily(name, doc, labels=LABELS)
        c.add_metric(ids, _get(s, field_name))
        yield c
    per_pos = CounterMetricFamily("tandem_spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by position in the draft", labels=LABELS + ("position",))
    # without a proposer one position-0 series at 0, so the family is always exported (the dashboards)
    for pos, n in enumerate(getattr(s, "spec_num_accepted_per_pos", None) or (0,)):
        per_pos.add_metric(ids + [str(pos)], float(n))
    yield per_pos
    yield from _draft_worker_counters(ids, getattr(s, "spec_remote", None))


DRAFT_WORKER_FAILURES = (("timeout", "num_timeouts"), ("unavailable", "num_unavailable"), ("error", "num_errors"))


def _draft_worker_counters(ids: list[str], r: Any) -> Iterable:
    """The engine's calls to its DraftWorker deployment (``RemoteProposerStats``); families with no
    series when the drafts are made in this process."""
    for name, doc, value in (
            ("tandem_spec_decode_draft_worker_calls", "Calls to the DraftWorker deployment (one per engine step "
             "that asked for drafts)", lambda: _get(r, "num_calls")),
            ("tandem_spec_decode_draft_worker_steps_without_drafts", "Engine steps that wanted drafts and ran "
             "without them because of the DraftWorker (a failed call, or the pause after one)",
             lambda: _get(r, "num_steps_without_drafts")),
            ("tandem_spec_decode_draft_worker_call_seconds", "Summed round trip of the answered DraftWorker calls "
             "(divide its rate by the calls' for the mean)", lambda: _get(r, "call_seconds"))):
        c = CounterMetricFamily(name, doc, labels=LABELS)
        if r is not None:
            c.add_metric(ids, value())
        yield c
    failures = CounterMetricFamily("tandem_spec_decode_draft_worker_failures", "DraftWorker calls that got no "
                                   "drafts, by reason: timeout (no answer in deployment_timeout_s), unavailable (the "
                                   "replica is dead or unreachable), error (anything else, a malformed answer "
                                   "included); the step ran without speculation", labels=LABELS + ("reason",))
    for reason, field_name in DRAFT_WORKER_FAILURES if r is not None else ():
        failures.add_metric(ids + [reason], _get(r, field_name))
    yield failures


_EXPERT_COUNTERS = (
    ("tandem_expert_cache_hits", "Expert uses served from resident weights (prefetched included)", "hits"),
    ("tandem_expert_cache_misses", "Expert uses that loaded the expert from the slower tier first", "misses"),
    ("tandem_expert_prefetch_loads", "Experts loaded ahead of use by the next-layer prefetcher", "prefetch_loads"),
    ("tandem_expert_prefetch_hits", "Hits on a prefetched expert before any other use of it", "prefetch_hits"),
    ("tandem_expert_loaded_bytes", "Expert weight bytes copied in from the slower tier", "bytes_loaded"))
_EXPERT_GAUGES = (
    ("tandem_expert_resident_bytes", "Expert weight bytes resident in the fast tier now", "resident_bytes"),
    ("tandem_expert_cache_capacity_bytes", "The layer's share of the expert cache budget", "capacity_bytes"))


def _expert_metrics(ids: list[str], s: Any) -> Iterable:
    """Per-layer expert cache counters (one series per MoE layer whose backend keeps them; no
    series for other engines), and the realised and oracle (Belady) hit rates over the last
    recorded routing trace."""
    layers = list(getattr(s, "experts", None) or ())
    labels = LABELS + ("layer", "backend")

    def series(layer) -> list[str]:
        return ids + [str(layer.layer), str(layer.backend)]

    for name, doc, field_name in _EXPERT_COUNTERS:
        c = CounterMetricFamily(name, doc, labels=labels)
        for layer in layers:
            c.add_metric(series(layer), _get(layer, field_name))
        yield c
    for name, doc, field_name in _EXPERT_GAUGES:
        g = GaugeMetricFamily(name, doc, labels=labels)
        for layer in layers:
            g.add_metric(series(layer), _get(layer, field_name))
        yield g
    realised = GaugeMetricFamily("tandem_expert_window_hit_rate", "Hit rate over the recorded routing trace "
                                 "(the last trace_steps steps)", labels=labels)
    oracle = GaugeMetricFamily("tandem_expert_window_oracle_hit_rate", "Belady's MIN hit rate on the same trace with "
                               "the same slots (no prefetch): the best any eviction policy could do", labels=labels)
    for layer in layers:
        uses = _get(layer, "window_uses")
        realised.add_metric(series(layer), _get(layer, "window_hits") / uses if uses else 0.0)
        oracle.add_metric(series(layer), _get(layer, "window_oracle_hits") / uses if uses else 0.0)
    yield realised
    yield oracle


class EngineCollector:
    """Scrape-time gauges of an engine and counters of its prefix store.

    ``engine_stats()`` returns an object with ``num_running``, ``num_waiting``,
    ``kv_blocks_total``, ``kv_blocks_free``, ``num_prompt_tokens`` and
    ``num_cached_prompt_tokens`` (the engine's ``EngineStats``). ``store_stats()`` returns
    the prefix store's ``stats()`` dict (``PrefixStore.stats``: ``queries_tokens`` and
    ``hits_tokens`` by tier, ``errors`` by op, ``corrupt_blobs``, ``breaker_open``), or None
    when the worker has no store; then the local tier comes from the engine's counters.
    """

    def __init__(self, identity: Identity, engine_stats: Callable[[], Any],
                 store_stats: Callable[[], dict | None] = lambda: None):
        self.identity = identity
        self.engine_stats = engine_stats
        self.store_stats = store_stats

    def collect(self) -> Iterable:
        ids = list(self.identity.values)
        s = self.engine_stats()
        try:
            store = self.store_stats() or {}
        except Exception:  # a scrape must not fail because the store is in a bad state
            log.exception("prefix store stats() failed")
            store = {}
        for name, doc, value in (
                ("tandem_requests_running", "Requests in the engine's running batch", _get(s, "num_running")),
                ("tandem_requests_waiting", "Requests queued for admission in the engine", _get(s, "num_waiting")),
                ("tandem_kv_blocks_used", "KV blocks held by requests",
                 _get(s, "kv_blocks_total") - _get(s, "kv_blocks_free")),
                ("tandem_kv_blocks_total", "KV blocks in the engine's pool", _get(s, "kv_blocks_total")),
                ("tandem_redis_breaker_open", "1 while the Redis circuit breaker is open (Redis skipped)",
                 _get(store, "breaker_open"))):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(ids, value)
            yield g
        queries = dict(store.get("queries_tokens") or {"local": _get(s, "num_prompt_tokens")})
        hits = dict(store.get("hits_tokens") or {"local": _get(s, "num_cached_prompt_tokens")})
        for name, doc, by_tier in (
                ("tandem_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, by tier", queries),
                ("tandem_prefix_cache_hits", "Prompt tokens served from the prefix cache, by tier", hits)):
            c = CounterMetricFamily(name, doc, labels=LABELS + ("tier",))
            for tier in sorted(set(PREFIX_TIERS) | set(by_tier)):
                c.add_metric(ids + [str(tier)], float(by_tier.get(tier, 0) or 0))
            yield c
        yield from _spec_decode_counters(ids, s)
        yield from _expert_metrics(ids, s)
        corrupt = CounterMetricFamily("tandem_prefix_cache_corrupt_blobs", "Redis KV blobs that failed their "
                                      "format check (deleted, counted as misses)", labels=LABELS)
        corrupt.add_metric(ids, _get(store, "corrupt_blobs"))
        yield corrupt
        errors = CounterMetricFamily("tandem_redis_errors", "Redis calls that failed, by operation",
                                     labels=LABELS + ("op",))
        by_op = dict(store.get("errors") or {})
        for op in sorted(set(REDIS_OPS) | set(by_op)):
            errors.add_metric(ids + [str(op)], float(by_op.get(op, 0) or 0))
        yield errors

    def describe(self) -> Iterable:
        return []  # unchecked collector: registering it does not call the engine


@dataclass
class MetricsServer:
    """A running /metrics endpoint."""

    address: str  # "host:port" to scrape
    server: Any  # the WSGI server (``shutdown()`` stops it)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def advertised_host(bind_host: str) -> str:
    """The host others should scrape: the bind address, or this machine's address for a wildcard."""
    if bind_host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return bind_host


def serve_metrics(registry: CollectorRegistry, config: MetricsConfig, *, ports: Iterable[int]) -> MetricsServer | None:
    """Serve ``registry`` on the first free port of ``ports`` (None when disabled or none free)."""
    if not config.enabled:
        return None
    disable_created_metrics()  # no *_created series next to every counter and histogram (as vLLM)
    tried = []
    for port in ports:
        try:
            server, _thread = start_http_server(port, addr=config.host, registry=registry)
        except OSError:
            tried.append(port)
            continue
        address = f"{advertised_host(config.host)}:{server.server_port}"
        log.info("metrics: serving Prometheus text on http://%s/metrics", address)
        return MetricsServer(address, server)
    log.warning("metrics: no free port among %s on %s; /metrics not served", tried, config.host)
    return None


def router_ports(config: MetricsConfig) -> list[int]:
    """The router's port, then (when it is taken, e.g. by a second router replica) the workers' range."""
    return [config.port] + [p for p in WORKER_METRICS_PORTS if p != config.port]
