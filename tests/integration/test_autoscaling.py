"""pd.yaml with short autoscaling delays: under load DecodeWorker goes 1 -> 2 replicas, and
back to 1 once the load stops."""

import asyncio
import threading
import time

import grpc
import pytest
from ray import serve

from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.contract import long_request
from tests.integration.helpers import TINY_ENGINE, environment, serve_app, wait_all_free

FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
DECODE_AUTOSCALING = {"autoscaling_config": {
    "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
    "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2}}


@pytest.fixture(scope="module")
def address(tiny_model):
    with environment(**FAST_METRICS), serve_app("pd.yaml", tiny_model, {"engine": TINY_ENGINE},  # inherited by Ray
                                                 deployments={"DecodeWorker": DECODE_AUTOSCALING}) as addr:
        yield addr


def decode_replicas() -> int:
    app = serve.status().applications["tandem"]
    return app.deployments["DecodeWorker"].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - start


class Load:
    """``concurrency`` long streams, restarted as they finish, until ``stop``."""

    def __init__(self, address: str, concurrency: int):
        self.address, self.concurrency = address, concurrency
        self.stopping = threading.Event()
        self.errors: list[grpc.RpcError] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, stub):
        while not self.stopping.is_set():
            call = stub.Generate(long_request(), timeout=60)
            try:
                async for _ in call:
                    if self.stopping.is_set():
                        call.cancel()
                        break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self.errors.append(exc)

    async def _main(self):
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            await asyncio.gather(*(self._one(stub) for _ in range(self.concurrency)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(timeout=30)


@pytest.mark.timeout(300)
def test_decode_scales_up_under_load_and_back_down(address):
    assert decode_replicas() == 1
    with Load(address, concurrency=8) as load:
        wait_for(lambda: decode_replicas() == 2, 150, "a second decode replica")
    assert not load.errors, load.errors[:3]
    wait_for(lambda: decode_replicas() == 1, 120, "the decode deployment to scale back to 1")
    wait_all_free(address)
