"""Prefill and decode on different nodes of a multi-node Ray cluster (one machine): the KV
crosses nodes through the object store and outputs stay identical to the in-process engine."""

import pytest
import ray

from router import launcher
from services.engine import LLM, SamplingParams
from tests.integration.helpers import (DEPLOY, TINY_ENGINE, free_port, request, run_concurrently, text, tokens,
                                       wait_all_free, worker_stats)


@pytest.fixture(scope="module")
def address(tiny_model):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # ray.init(address=...) rewrites a loopback address to the machine's outward IP unless
    # "cluster mode" is off; everything here stays on 127.0.0.1.
    ray_constants.ENABLE_RAY_CLUSTER = False
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 200 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 4})
    cluster.add_node(**node, num_cpus=4, resources={"prefill_node": 1})
    cluster.add_node(**node, num_cpus=4, resources={"decode_node": 1})
    ray.init(address=cluster.address, namespace="serve", _node_ip_address="127.0.0.1")
    pin = {"PrefillWorker": {"ray_actor_options": {"resources": {"prefill_node": 0.5}}},
           "DecodeWorker": {"ray_actor_options": {"resources": {"decode_node": 0.5}}},
           "Router": {"ray_actor_options": {"num_cpus": 0.5}}}
    config = launcher.load_config(DEPLOY / "pd.yaml", model=tiny_model, port=free_port(),
                                  overrides={"engine": TINY_ENGINE}, deployments=pin)
    try:
        yield launcher.deploy(config)
    finally:
        launcher.shutdown()
        cluster.shutdown()


def test_prefill_and_decode_run_on_different_nodes(address):
    stats = {s.role: s for s in worker_stats(address)}
    assert set(stats) == {"prefill", "decode"}
    assert stats["prefill"].node_id and stats["decode"].node_id
    assert stats["prefill"].node_id != stats["decode"].node_id


def test_kv_crosses_nodes_and_outputs_match(address, tiny_model):
    prompts = [list(range(10, 10 + n)) for n in (5, 16, 40, 77)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = LLM(tiny_model, device="cpu", num_kv_blocks=256).generate(prompts, params)
    before = {s.role: s for s in worker_stats(address)}
    got = run_concurrently(address, [request(ids=p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts])
    for g, w in zip(got, want):
        assert not isinstance(g, Exception), g
        assert tokens(g) == w.token_ids and text(g) == w.text
    after = {s.role: s for s in wait_all_free(address)}
    assert after["decode"].num_kv_adopted - before["decode"].num_kv_adopted == len(prompts)
