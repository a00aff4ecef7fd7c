"""Redis prefix cache across replicas, over real Ray Serve + gRPC + a real redis-server.

Two independent Serve apps (A and B, deploy/pd.yaml, each its own router, one PrefillWorker
and one DecodeWorker) share one redis-server that this module starts on a free loopback
port and stops by PID. A request sent to B's router can only be prefilled by B's prefill
replica, so "replica 2" is forced without depending on the router's replica choice. A
third app (C, unified mode) serves a different model (other fingerprint) on the same Redis.
Cold references: the engine in-process with prefix caching off.
"""

from __future__ import annotations

import copy
import time
import urllib.request

import pytest
import redis

from router import launcher
from services.engine import LLM, SamplingParams
from services.engine.checkpoint import checkpoint_fingerprint
from services.engine.config import EngineConfig, resolve_device
from services.engine.kv_cache import block_hash_chain, hash_seed
from services.engine.make_model import make_model
from services.prefix_store import block_key
from services.prefix_store.server import LocalRedisServer
from tests.integration.helpers import DEPLOY, TINY_ENGINE, free_port, ray_head, request, run_concurrently, tokens, \
    worker_stats

pytestmark = pytest.mark.timeout(600)
BS = 16
MAX_TOKENS = 8
RETRY_S = 2.0
STORE = {"ttl_s": 600, "timeout_s": 0.5, "breaker_failures": 2, "breaker_retry_s": RETRY_S}


def prompt_of(seed: int, n: int) -> list[int]:
    return [(i * 37 + seed * 101 + 11) % 500 + 4 for i in range(n)]


def app_config(name: str, yaml: str, model: str, redis_url: str) -> dict:
    config = launcher.load_config(DEPLOY / yaml, model=model, port=free_port(), overrides={
        "engine": TINY_ENGINE, "prefix_store": {"url": redis_url, **STORE}},
        deployments={d: {"autoscaling_config": None, "num_replicas": 1} for d in ("PrefillWorker", "DecodeWorker")}
        if yaml == "pd.yaml" else None)
    app = config["applications"][0]
    app["name"] = name
    app["logging_config"] = {"enable_access_log": False}
    return config


@pytest.fixture(scope="module")
def redis_server():
    server = LocalRedisServer(maxmemory="128mb")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    return str(make_model("tiny-llama", tmp_path_factory.mktemp("other"), seed=1))


@pytest.fixture(scope="module")
def apps(tiny_model, other_model, redis_server):
    """{"A": address, "B": address, "C": address} of three apps on one Ray head."""
    configs = {"A": app_config("tandem-a", "pd.yaml", tiny_model, redis_server.url),
               "B": app_config("tandem-b", "pd.yaml", tiny_model, redis_server.url),
               "C": app_config("tandem-c", "local.yaml", other_model, redis_server.url)}
    merged = copy.deepcopy(configs["A"])
    merged["applications"] = [c["applications"][0] for c in configs.values()]
    with ray_head():
        launcher.deploy(merged)
        addresses = {k: launcher.app_address(c) for k, c in configs.items()}
        for address in addresses.values():
            launcher.wait_serving(address)
        yield addresses


@pytest.fixture()
def rclient(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def generate(address: str, prompt: list[int]):
    got = run_concurrently(address, [request(ids=prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)])[0]
    if isinstance(got, Exception):
        raise got
    return tokens(got), got[-1].usage.cached_prompt_tokens


def cold(model: str, prompt: list[int]) -> list[int]:
    llm = LLM(model, device="cpu", num_kv_blocks=256, block_size=BS, enable_prefix_caching=False)
    return llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0].token_ids


def keys_of(model: str, prompt: list[int]) -> list[str]:
    """The Redis keys the apps' workers write: their KV dtype (``dtype: auto`` as resolved on
    this machine, bf16 on AVX512_BF16 CPUs) is part of the hash seed."""
    fp = checkpoint_fingerprint(model)
    kv_dtype = str(resolve_device(EngineConfig(model, device="cpu"))[1]).removeprefix("torch.")
    return [block_key(fp, h) for h in block_hash_chain(hash_seed(fp, kv_dtype, BS), prompt, BS)]


def wait_written(client, keys: list[str], timeout_s: float = 10.0) -> None:
    """Write-back is asynchronous: until every key exists."""
    end = time.monotonic() + timeout_s
    while client.exists(*keys) < len(keys):
        if time.monotonic() > end:
            raise AssertionError(f"only {client.exists(*keys)} of {len(keys)} blocks written back")
        time.sleep(0.05)


def redis_hit_tokens(address: str) -> float:
    """tandem_prefix_cache_hits_total{tier="redis"} summed over the prefill workers the app reports."""
    total = 0.0
    for addr in {s.metrics_address for s in worker_stats(address) if s.role == "prefill"}:
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tandem_prefix_cache_hits_total") and 'tier="redis"' in line)
    return total


def test_prefix_computed_on_replica_1_is_loaded_by_replica_2(apps, tiny_model, rclient):
    prefix = prompt_of(1, 1024)
    out_a, cached_a = generate(apps["A"], prefix)
    assert cached_a == 0 and out_a == cold(tiny_model, prefix)
    keys = keys_of(tiny_model, prefix)
    wait_written(rclient, keys)
    assert all(0 < t <= STORE["ttl_s"] for t in (rclient.ttl(k) for k in keys[:3]))
    second = prefix + prompt_of(2, 40)
    before = redis_hit_tokens(apps["B"])
    out_b, cached_b = generate(apps["B"], second)
    assert cached_b >= 1008
    assert out_b == cold(tiny_model, second)
    after = redis_hit_tokens(apps["B"])
    assert after - before == cached_b, (before, after, worker_stats(apps["B"]))  # B: all from Redis


def test_other_model_gets_no_hits(apps, tiny_model, other_model, rclient):
    prompt = prompt_of(3, 1024)
    generate(apps["A"], prompt)
    wait_written(rclient, keys_of(tiny_model, prompt))
    out, cached = generate(apps["C"], prompt + [5] * 16)
    assert cached == 0 and out == cold(other_model, prompt + [5] * 16)


def test_corrupt_blob_is_detected_deleted_and_recomputed(apps, tiny_model, rclient):
    prompt = prompt_of(4, 1024)
    generate(apps["A"], prompt)
    keys = keys_of(tiny_model, prompt)
    wait_written(rclient, keys)
    blob = bytearray(rclient.get(keys[20]))
    blob[-7] ^= 0x5A  # one flipped byte in layer L-1's V
    rclient.set(keys[20], bytes(blob))
    second = prompt + [6] * 24
    out, cached = generate(apps["B"], second)
    assert cached == 20 * BS  # blocks 0..19 from Redis; 20 was corrupt, so the chain ends there
    assert out == cold(tiny_model, second)
    end = time.monotonic() + 10  # deleted, then written back by B after it recomputed it
    while rclient.get(keys[20]) in (None, bytes(blob)):
        assert time.monotonic() < end, "corrupt blob neither deleted nor rewritten"
        time.sleep(0.05)


def test_redis_outage_requests_succeed_and_hits_resume(apps, tiny_model, redis_server, rclient):
    results = []
    for i in range(8):
        if i == 3:
            redis_server.stop()
        prompt = prompt_of(10 + i, 256)
        results.append(generate(apps["A" if i % 2 else "B"], prompt) + (prompt,))
    for out, _, prompt in results:  # every request succeeded, with the cold output
        assert out == cold(tiny_model, prompt)
    redis_server.start()  # same port, empty
    restarted = time.monotonic()
    hit_after = None
    for i in range(40):
        prompt = prompt_of(100 + i, 512)
        generate(apps["A"], prompt)
        try:
            wait_written(rclient, keys_of(tiny_model, prompt), timeout_s=0.5)
        except AssertionError:
            continue  # A's breaker still open: its write-back was dropped
        _, cached = generate(apps["B"], prompt + [7] * 20)
        if cached >= 512:
            hit_after = time.monotonic() - restarted
            break
    assert hit_after is not None, "no Redis hit after the restart"
    assert hit_after <= RETRY_S + 3.0  # the retry interval, plus two requests and a write-back
