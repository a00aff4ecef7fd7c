"""Remote MoE experts over gRPC on a multi-node Ray cluster (one machine, ``ray.cluster_utils.Cluster``):
deploy/moe.yaml (router, prefill and decode on the head; ExpertWorker0 and ExpertWorker1 pinned by
resources to two other nodes) serving a tiny Mixtral (shard call timeout 2 s). Greedy outputs are identical to the
in-process engine with every expert local; each shard holds only its half of the experts and
served calls; the decode worker's /metrics has the per-shard call latency histogram. Then one
shard's replica is SIGKILLed (its PID) mid-stream: every stream fails with UNAVAILABLE within
10 s of the kill (measured; the timeout bounds it), and once Serve has replaced the replica a new request completes
identically."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from router import launcher
from services.engine import LLM, SamplingParams
from services.engine.make_model import make_model
from tests.integration.helpers import (DEPLOY, TINY_ENGINE, free_port, request, run_concurrently, tokens,
                                       wait_all_free, worker_stats)
from tests.integration.kills import replica_actors, streams_with_a_kill, wait_replaced

GREEDY = dict(temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [30 + i for i in range(40)], [11, 300, 12, 301, 13], [42] * 20]
MAX_TOKENS = 24
KILL_TOKENS = 1500  # long enough that every stream is mid-way when the shard dies
NODES = {"ExpertWorker0": "experts_a", "ExpertWorker1": "experts_b"}
# moe.yaml's section with a call timeout shorter than a replacement replica takes to start here
# (Ray worker + torch import + shard load: 3-10 s), so that the kill below fails its streams: with a
# longer timeout a replacement that is up in time answers the waiting calls (a stall, no error)
CALL_TIMEOUT_S = 2.0
EXPERTS = {"backend": "remote", "deployment": "ExpertWorker", "num_shards": 2, "call_timeout_s": CALL_TIMEOUT_S}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> str:
    return str(make_model("tiny-mixtral", tmp_path_factory.mktemp("tiny-mixtral")))


@pytest.fixture(scope="module")
def oracle(moe_model):
    """Every expert in process (experts: local)."""
    return LLM(moe_model, device="cpu", num_kv_blocks=512)


@pytest.fixture(scope="module")
def address(moe_model):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # stay on 127.0.0.1 (tests/integration/test_multinode.py)
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 200 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 8, "resources": {"head": 1}})
    for resource in NODES.values():
        cluster.add_node(**node, num_cpus=2, resources={resource: 1})
    ray.init(address=cluster.address, namespace="serve", _node_ip_address="127.0.0.1")
    pin = {name: {"ray_actor_options": {"num_cpus": 0.5, "resources": {res: 0.5}}} for name, res in NODES.items()}
    on_head = {"ray_actor_options": {"num_cpus": 0.5, "resources": {"head": 0.1}}}
    pin.update({"Router": {"num_replicas": 1, **on_head}, "PrefillWorker": on_head, "DecodeWorker": on_head})
    config = launcher.load_config(DEPLOY / "moe.yaml", model=moe_model, port=free_port(),
                                  overrides={"engine": {**TINY_ENGINE, "experts": EXPERTS}}, deployments=pin)
    config["applications"][0]["logging_config"] = {"enable_access_log": False}
    try:
        yield launcher.deploy(config)
    finally:
        launcher.shutdown()
        cluster.shutdown()


def shard_call(deployment: str, method: str):
    return getattr(serve.get_deployment_handle(deployment, "tandem"), method).remote().result(timeout_s=30)


def actor_of(deployment: str):
    (victim,) = replica_actors(deployment)
    return victim, ray.get_actor(victim["name"], namespace=victim["namespace"])


def node_of(deployment: str) -> str:
    _, actor = actor_of(deployment)
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)


def metric(address: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def greedy(prompts, max_tokens=MAX_TOKENS):
    return [request(ids=p, max_tokens=max_tokens, **GREEDY) for p in prompts]


def test_shards_on_other_nodes_give_the_local_outputs(address, oracle):
    workers = {s.role: s for s in worker_stats(address)}
    nodes = {name: node_of(name) for name in NODES}
    assert len(set(nodes.values())) == 2 and workers["decode"].node_id not in nodes.values()
    assert workers["prefill"].node_id not in nodes.values()
    want = oracle.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
    got = run_concurrently(address, greedy(PROMPTS))
    for responses, w in zip(got, want):
        assert not isinstance(responses, Exception), responses
        assert tokens(responses) == w.token_ids
    wait_all_free(address, timeout_s=30)
    stats = [shard_call(name, "stats") for name in NODES]
    assert [(s.shard, s.first_expert, s.last_expert, s.num_layers) for s in stats] == [(0, 0, 2, 2), (1, 2, 4, 2)]
    expert = 3 * 64 * 128 * 4  # fp32 gate, up, down of tiny-mixtral
    assert all(s.weight_bytes == 2 * 2 * expert and s.num_calls > 0 and s.num_rows > 0 for s in stats)
    for role in ("prefill", "decode"):  # both roles called both shards, and timed every call
        m = workers[role].metrics_address
        for shard in ("0", "1"):
            assert metric(m, "tandem_expert_remote_call_seconds_count", shard=shard) > 0
        assert metric(m, "tandem_expert_remote_call_failures_total") == 0


def shard_killer(deployment: str):
    """kill(): SIGKILL the replica process of ``deployment`` (its PID asked now, before the streams);
    returns (its actor name, monotonic time of the kill)."""
    victim, actor = actor_of(deployment)
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    assert pid != os.getpid()

    def kill() -> tuple[str, float]:
        os.kill(pid, signal.SIGKILL)
        return victim["name"], time.monotonic()

    return kill


@pytest.mark.timeout(420)
def test_a_shard_killed_mid_stream_fails_its_requests_fast_then_service_resumes(address, oracle):
    prompts = [[3 + i, 40 + 7 * i, 5, 6 + i % 5] for i in range(4)]
    records, _, (victim, killed_at), migrations = streams_with_a_kill(
        address, greedy(prompts, KILL_TOKENS), [()] * len(prompts), shard_killer("ExpertWorker1"))
    waits = []
    for rec in records:
        assert rec.error is not None, f"a stream finished although a shard died ({rec.num_tokens} tokens)"
        assert rec.error.code() == grpc.StatusCode.UNAVAILABLE, (rec.error.code(), rec.error.details())
        assert "Traceback" not in rec.error.details()
        waits.append(rec.ended - killed_at)
    print(f"\n[expert shard kill] UNAVAILABLE {min(waits):.2f}-{max(waits):.2f} s after the kill")
    assert max(waits) <= 10.0, waits
    assert migrations == 0  # the workers are fine: nothing moved, the requests failed
    wait_replaced("ExpertWorker1", victim, 1)
    want = oracle.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))[0].token_ids
    end = time.monotonic() + 60
    while True:  # the workers' handles learn of the replacement shortly after Serve runs it
        (responses,) = run_concurrently(address, greedy([PROMPTS[1]]))
        if not isinstance(responses, Exception):
            break
        assert responses.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < end, responses
        time.sleep(1.0)
    assert tokens(responses) == want
    wait_all_free(address, timeout_s=30)
    decode = {s.role: s for s in worker_stats(address)}["decode"].metrics_address
    assert metric(decode, "tandem_expert_remote_call_failures_total", shard="1") > 0
