"""Helpers of the replica-kill tests: concurrent streams that record when each message arrived,
replicas found and killed by their Serve replica id, stalls and percentiles, router metrics."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class StreamRecord:
    """One stream as its client saw it."""

    responses: list = field(default_factory=list)  # GenerateResponse messages, in order
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() each message arrived
    trailing: dict = field(default_factory=dict)  # trailing metadata
    error: grpc.RpcError | None = None
    started: float = 0.0  # time.monotonic() the call was made
    ended: float = 0.0  # time.monotonic() it ended (last message or error)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.responses)

    @property
    def tokens(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)

    def longest_gap(self) -> float:
        """The longest wait between two messages of the stream (its stall), in seconds."""
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:])), default=0.0)


async def record_stream(stub, request, record: StreamRecord, metadata=(), timeout: float = 120.0) -> None:
    record.started = time.monotonic()
    call = stub.Generate(request, metadata=metadata, timeout=timeout)
    try:
        async for r in call:
            record.arrivals.append(time.monotonic())
            record.responses.append(r)
        record.trailing = dict(await call.trailing_metadata() or ())
    except grpc.RpcError as exc:
        record.error = exc
    record.ended = time.monotonic()


def every_stream_has(n: int):
    return lambda records: all(rec.num_tokens >= n for rec in records)


def streams_with_a_kill(address: str, requests, metadata, kill, ready=every_stream_has(10)):
    """Run ``requests`` concurrently on one channel (so through one router replica); once
    ``ready(records)``, call ``kill()`` (in a thread: the streams go on being read). Returns
    (records, monotonic time of the kill, what ``kill`` returned, the migrations that router
    counted meanwhile: ``tandem_migrations_total``, every reason)."""

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            metrics = (await stats_on(channel)).router_metrics_address
            before = router_metric(metrics, "tandem_migrations_total")
            stub = pb_grpc.GenerationStub(channel)
            records = [StreamRecord() for _ in requests]
            tasks = [asyncio.create_task(record_stream(stub, r, rec, md)) for r, rec, md in
                     zip(requests, records, metadata)]
            end = time.monotonic() + 60
            while not ready(records):
                ended = [rec for rec in records if rec.error is not None]
                assert not ended, ended[0].error
                assert time.monotonic() < end, [rec.num_tokens for rec in records]
                await asyncio.sleep(0.005)
            victim = await asyncio.to_thread(kill)
            killed_at = time.monotonic()
            await asyncio.gather(*tasks)
            assert (await stats_on(channel)).router_metrics_address == metrics  # still the same router
            return records, killed_at, victim, router_metric(metrics, "tandem_migrations_total") - before

    return asyncio.run(main())


# ---- replicas ------------------------------------------------------------------------------
def replica_actors(deployment: str) -> list[dict]:
    """The named actors of a deployment's Serve replicas (name, namespace)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def kill_replica(deployment: str, replica_id: str = "") -> str:
    """Kill a replica's actor (SIGKILL-like: no shutdown hooks), by Serve replica id or the first
    one; returns the actor name."""
    actors = [a for a in replica_actors(deployment) if not replica_id or a["name"].endswith(f"#{replica_id}")]
    assert actors, f"no replica {replica_id!r} of {deployment}"
    victim = actors[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def running_replicas(deployment: str) -> int:
    app = serve.status().applications.get("tandem")
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_replaced(deployment: str, killed: str, count: int, timeout_s: float = 120.0) -> None:
    """Until Serve runs ``count`` replicas of ``deployment`` again, none of them ``killed``."""
    end = time.monotonic() + timeout_s
    while not (running_replicas(deployment) == count and len(replica_actors(deployment)) == count
               and killed not in {a["name"] for a in replica_actors(deployment)}):
        assert time.monotonic() < end, f"Serve did not replace the killed {deployment} replica"
        time.sleep(0.5)


# ---- numbers ---------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def router_metric(metrics_address: str, name: str, **labels) -> float:
    """The sum of a router's samples ``name`` with ``labels`` (its /metrics over HTTP)."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def stats_of(address: str, role: str, count: int, timeout_s: float = 30.0) -> list:
    """Worker stats of the ``count`` replicas of ``role`` (Admin stats are gathered by calls spread
    over the replicas: best effort, so ask until every replica answered)."""
    from tests.integration.helpers import worker_stats

    end = time.monotonic() + timeout_s
    while True:
        found = {s.replica_id: s for s in worker_stats(address) if s.role == role}
        if len(found) >= count:
            return sorted(found.values(), key=lambda s: s.replica_id)
        assert time.monotonic() < end, f"{len(found)} of {count} {role} replicas answered"
        time.sleep(0.1)


def router_metrics_address(address: str) -> str:
    """The /metrics address of the router replica a new connection to ``address`` reaches."""
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).GetWorkerStats(admin_pb2.GetWorkerStatsRequest(),
                                                                timeout=30).router_metrics_address


async def stats_on(channel) -> admin_pb2.GetWorkerStatsResponse:
    """GetWorkerStats through ``channel`` (so from the router replica that channel is connected to)."""
    return await admin_pb2_grpc.AdminStub(channel).GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), timeout=30)
