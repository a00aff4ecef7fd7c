"""Prometheus /metrics of every process after real traffic (deploy/pd.yaml), scraped over HTTP.

The router reports its own /metrics address and the workers' (Admin.GetWorkerStats); the
test scrapes each, parses the text with prometheus_client's parser, and checks the metric
contract of issue 5 and that the counts match the requests sent. The last test checks every
PromQL expression of deploy/grafana/*.json against the metric names really exported.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from tests.dashboard_queries import dashboard_paths, load, metric_names, queries
from tests.integration.helpers import TINY_ENGINE, environment, free_port, request, run_concurrently, wait_all_free

N, PROMPT, MAX_TOKENS = 6, list(range(30, 70)), 5  # 40-token prompts: 2 full blocks of 16
ROUTER_METRICS = {"tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds",
                  "tandem_e2e_request_latency_seconds", "tandem_prompt_tokens", "tandem_generation_tokens",
                  "tandem_requests_finished", "tandem_requests_failed", "tandem_requests_inflight",
                  "tandem_router_token_delay_seconds", "tandem_router_dwell_seconds"}
WORKER_METRICS = {"tandem_request_queue_time_seconds", "tandem_requests_running", "tandem_requests_waiting",
                  "tandem_kv_blocks_used", "tandem_kv_blocks_total", "tandem_prefix_cache_queries",
                  "tandem_prefix_cache_hits", "tandem_prefix_cache_corrupt_blobs", "tandem_redis_errors",
                  "tandem_redis_breaker_open", "tandem_kv_transfer_bytes", "tandem_kv_transfer_seconds"}


# sample-name suffixes of a declared family by type (the text parser strips a counter's _total)
EMPTY_FAMILY_SAMPLES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


class Scrape:
    """One /metrics page: sample values by (name, labels)."""

    def __init__(self, address: str):
        self.address = address
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels) -> float:
        found = [s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v
                                                                          for k, v in labels.items())]
        assert len(found) == 1, f"{name} {labels}: {len(found)} samples at {self.address}"
        return found[0]

    def names(self) -> set[str]:
        """Sample names, plus the sample names of families declared with no series yet (the
        expert-cache counters of a dense model: their series appear with an offload backend)."""
        names = {s.name for s in self.samples}
        for f in self.families.values():
            if not f.samples:
                names |= {f.name + suffix for suffix in EMPTY_FAMILY_SAMPLES.get(f.type, ("",))}
        return names


@pytest.fixture(scope="module")
def traffic(tiny_model):
    """A pd.yaml cluster after N finished requests (the last N-1 reuse the first one's prefix)
    and one rejected request; yields (stats response, model id, response messages with tokens)."""
    from tests.integration.helpers import serve_app

    # one router (pd.yaml runs two): every request of the fixture then lands on the router scraped
    with environment(TANDEM_METRICS_PORT=str(free_port())), \
            serve_app("pd.yaml", tiny_model, {"engine": TINY_ENGINE}, {"Router": {"num_replicas": 1}}) as address:
        first = run_concurrently(address, [request(ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)])
        rest = run_concurrently(address, [request(ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                  ignore_eos=True) for _ in range(N - 1)])
        bad = run_concurrently(address, [request(ids=[10 ** 9], max_tokens=2)])
        for got in first + rest:
            assert not isinstance(got, Exception), got
        assert isinstance(bad[0], grpc.RpcError) and bad[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_all_free(address)
        with grpc.insecure_channel(address) as channel:
            stats = admin_pb2_grpc.AdminStub(channel).GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), timeout=30)
        messages = sum(1 for got in first + rest for r in got if r.token_ids)
        yield stats, Path(tiny_model).name, messages


@pytest.fixture(scope="module")
def scrapes(traffic):
    stats, _, _ = traffic
    assert stats.router_metrics_address and all(w.metrics_address for w in stats.workers)
    return {"router": Scrape(stats.router_metrics_address),
            **{w.role: Scrape(w.metrics_address) for w in stats.workers}}


def test_every_contract_metric_is_served_with_the_labels(traffic, scrapes):
    stats, model, _ = traffic
    assert set(scrapes) == {"router", "prefill", "decode"}
    replicas = {w.role: w.replica_id for w in stats.workers}
    for role, scrape in scrapes.items():
        wanted = ROUTER_METRICS if role == "router" else WORKER_METRICS
        assert wanted <= set(scrape.families), f"{role}: missing {sorted(wanted - set(scrape.families))}"
        for s in scrape.samples:
            if s.name.startswith("tandem_"):
                assert s.labels["model"] == model and s.labels["role"] == role, s
                assert s.labels["replica"] and (role == "router" or s.labels["replica"] == replicas[role]), s
                assert not {"request_id", "trace_id"} & set(s.labels), s


def test_router_counts_match_the_requests(scrapes):
    r = scrapes["router"]
    assert r.value("tandem_time_to_first_token_seconds_count") == N
    assert r.value("tandem_e2e_request_latency_seconds_count") == N
    assert r.value("tandem_inter_token_latency_seconds_count") == N * (MAX_TOKENS - 1)
    assert r.value("tandem_prompt_tokens_total") == N * len(PROMPT)
    assert r.value("tandem_generation_tokens_total") == N * MAX_TOKENS
    assert r.value("tandem_requests_finished_total", finish_reason="length") == N
    assert r.value("tandem_requests_finished_total", finish_reason="stop") == 0
    assert r.value("tandem_requests_failed_total", code="INVALID_ARGUMENT") == 1
    assert r.value("tandem_requests_inflight") == 0
    assert 0 < r.value("tandem_time_to_first_token_seconds_sum") <= r.value("tandem_e2e_request_latency_seconds_sum")


def test_router_token_delay_counts_every_message_with_tokens(traffic, scrapes):
    _, _, messages = traffic
    r = scrapes["router"]
    count = r.value("tandem_router_token_delay_seconds_count")
    # pd.yaml: the prefill's first token is a message of its own (stamped by the prefill engine),
    # decode's tokens follow in at least one more.
    assert count == messages >= 2 * N, f"{count} delays observed for {messages} messages with tokens"
    mean = r.value("tandem_router_token_delay_seconds_sum") / count
    assert 0 < mean < 1.0, f"mean router token delay {mean:.3f} s"
    # The router's dwell is observed for the same messages (every one was stamped on arrival:
    # the channel's chunks and the prefill's first token) and is a part of their delay.
    assert r.value("tandem_router_dwell_seconds_count") == count
    dwell = r.value("tandem_router_dwell_seconds_sum")
    assert 0 < dwell <= r.value("tandem_router_token_delay_seconds_sum"), f"dwell {dwell:.4f} s in all"


def test_worker_metrics_match_the_requests(scrapes):
    p, d = scrapes["prefill"], scrapes["decode"]
    for w in (p, d):
        assert w.value("tandem_request_queue_time_seconds_count") == N
        assert w.value("tandem_requests_running") == 0 and w.value("tandem_requests_waiting") == 0
        assert w.value("tandem_kv_blocks_total") == TINY_ENGINE["num_kv_blocks"]
        assert w.value("tandem_kv_blocks_used") == 0
        assert w.value("tandem_redis_breaker_open") == 0
        assert w.value("tandem_prefix_cache_corrupt_blobs_total") == 0
    assert p.value("tandem_kv_transfer_seconds_count", direction="send") == N
    assert d.value("tandem_kv_transfer_seconds_count", direction="fetch") == N
    sent = p.value("tandem_kv_transfer_bytes_total", direction="send")
    assert sent > 0 and d.value("tandem_kv_transfer_bytes_total", direction="fetch") == sent
    # The N-1 later prompts found the first one's 2 full blocks in the prefill replica's cache.
    hits = p.value("tandem_prefix_cache_hits_total", tier="local")
    assert hits >= (N - 1) * 32 and p.value("tandem_prefix_cache_queries_total", tier="local") >= hits
    assert p.value("tandem_prefix_cache_hits_total", tier="redis") == 0


def test_dashboards_query_only_exported_metrics(scrapes):
    paths = dashboard_paths()
    assert paths, "no dashboards in deploy/grafana/"
    exported = set().union(*(s.names() for s in scrapes.values()))
    for path in paths:
        for where, expr in queries(load(path)):
            names = metric_names(expr)
            assert names and names <= exported, f"{path.name} {where}: {sorted(names - exported)} not exported"
