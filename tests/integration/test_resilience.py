"""pd.yaml under stress: admission limits (RESOURCE_EXHAUSTED) and a decode replica killed mid-stream."""

import time

import grpc
import pytest
import ray
from ray import serve

from tests.integration.contract import long_request, stream_in_background
from tests.integration.helpers import TINY_ENGINE, request, run_concurrently, serve_app, tokens, wait_all_free

# Prefill admits 1 running + 2 waiting requests, and computes 16 prompt tokens per step:
# a burst of long prompts overflows its queue deterministically.
PREFILL_LIMITS = {"max_num_seqs": 1, "max_waiting_requests": 2, "max_num_batched_tokens": 16}


@pytest.fixture(scope="module")
def address(tiny_model):
    with serve_app("pd.yaml", tiny_model, {"engine": TINY_ENGINE, "prefill_engine": PREFILL_LIMITS}) as addr:
        yield addr


def test_burst_beyond_admission_limits_gets_resource_exhausted(address):
    burst = [request(ids=[(7 * i + j) % 500 + 4 for j in range(600)], max_tokens=4, temperature=0,
                     ignore_eos=True) for i in range(12)]
    results = run_concurrently(address, burst)
    rejected = [r for r in results if isinstance(r, grpc.RpcError)]
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected), rejected
    assert rejected and admitted, f"{len(rejected)} rejected, {len(admitted)} admitted"
    for got in admitted:
        assert got[-1].finish_reason == "length" and len(tokens(got)) == 4
    wait_all_free(address)


def _decode_replica_actors():
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "DecodeWorker" in a["name"]]


def _decode_running_replicas() -> int:
    app = serve.status().applications.get("tandem")
    if app is None or "DecodeWorker" not in app.deployments:
        return 0
    return app.deployments["DecodeWorker"].replica_states.get("RUNNING", 0)


@pytest.mark.timeout(180)
def test_decode_replica_killed_mid_stream_gives_unavailable_then_recovers(address):
    thread, out = stream_in_background(address, long_request())
    deadline = time.monotonic() + 30
    while len(out["responses"]) < 3 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(out["responses"]) >= 3, out
    (victim,) = _decode_replica_actors()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    thread.join(timeout=15)
    assert not thread.is_alive(), "the stream hangs after its decode replica died"
    assert "error" in out, "the stream finished although its decode replica was killed"
    assert out["error"].code() == grpc.StatusCode.UNAVAILABLE, out["error"]
    assert out["error_time"] - killed_at < 10
    assert "Traceback" not in out["error"].details()

    end = time.monotonic() + 120  # Serve replaces the replica
    while not (_decode_running_replicas() == 1 and _decode_replica_actors()
               and _decode_replica_actors()[0]["name"] != victim["name"]):
        assert time.monotonic() < end, "Serve did not replace the killed decode replica"
        time.sleep(0.5)
    # two at a time: the prefill worker admits 1 running + 2 waiting (PREFILL_LIMITS), so a
    # larger burst could be rejected with RESOURCE_EXHAUSTED before the first is scheduled
    got = [r for _ in range(2)
           for r in run_concurrently(address, [request(ids=[5, 6, 7], max_tokens=6, temperature=0)] * 2)]
    for r in got:
        assert not isinstance(r, Exception), r
        assert len(tokens(r)) == 6
    wait_all_free(address)
