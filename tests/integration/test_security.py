"""The attack surface of a real `tandem serve` (issue 18 item 5).

1. Listener audit, default config: every listening TCP socket of every process of the cluster
   (the serve process and everything below it: redis-server, GCS, raylet, dashboard and
   runtime-env agents, the autoscaler monitor, the Serve controller and replicas) is on
   loopback. The child runs without the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that conftest.py
   sets for in-process clusters, so the test sees what a user's shell gets.
2. Keys on (TANDEM_API_KEYS, an admin key file, TANDEM_REDIS_PASSWORD): no key or a wrong one
   is UNAUTHENTICATED over real gRPC, health stays open, `tandem generate` sends
   TANDEM_API_KEY, Admin takes only its own key, one key's caller can neither abort nor
   collide with another's request ids, the redis-server tandem started requires AUTH
   while the workers (which have the password) fill it, and `tandem bench serve` sends
   TANDEM_API_KEY too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.helpers import free_port, tandem_serve
from router.processes import descendants
from tests.integration.listeners import listeners

KEY_A, KEY_B, ADMIN = "alice-" + "a" * 24, "bob-" + "b" * 24, "admin-" + "c" * 24
REDIS_PASSWORD = "s3cret \"pass\" word"
# what a user's shell has: none of the variables the test session or a developer may have set
DROPPED = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "TANDEM_API_KEYS", "TANDEM_API_KEYS_FILE", "TANDEM_ADMIN_API_KEYS",
           "TANDEM_ADMIN_API_KEYS_FILE", "TANDEM_API_KEY", "TANDEM_REDIS_PASSWORD")


def user_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(values)
    return env


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0


def generate(port: int, prompt: str = "The for statement", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", "generate", "--address", f"127.0.0.1:{port}",
                           "--max-tokens", "4", prompt], capture_output=True, text=True, timeout=90,
                          env=user_env(**env))


def bench_serve(port: int, summary, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", "bench", "serve", "--address", f"127.0.0.1:{port}",
                           "--num-prompts", "4", "--concurrency", "2", "--input-len", "24", "--output-len", "4",
                           "--warmup", "1", "--no-progress", "--json", str(summary)],
                          capture_output=True, text=True, timeout=120, env=user_env(**env))


def test_default_tandem_serve_listens_on_loopback_only(tiny_model, tmp_path):
    port = free_port()
    with tandem_serve(tiny_model, port, tmp_path / "serve.log", env=user_env()) as proc:
        assert generate(port).returncode == 0  # the cluster serves (every lazy listener is up)
        time.sleep(2)  # the agents' and monitor's HTTP endpoints start a moment after Ray's own
        found = listeners(descendants(proc.pid))
        names = " ".join(sorted({item.name for item in found}))
        off = [item for item in found if not item.loopback]
        router_ports = {(item.address, item.port) for item in found if "Router" in item.name}
        stop(proc)
    print(f"\n[listener audit] {len(found)} listening TCP sockets of {len({i.pid for i in found})} processes, "
          f"{len(off)} off loopback")
    # the audit saw the whole cluster: Ray's core, its agents, Serve's replicas, redis, the router
    for part in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ServeController",
                 "ServeReplica:tandem:Router", "ServeReplica:tandem:UnifiedWorker", "redis-server"):
        assert part in names, names
    assert ("127.0.0.1", port) in router_ports and len(found) >= 15
    assert off == [], "listening off loopback:\n" + "\n".join(map(str, off))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _redis_reply(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(256)


def test_keys_on_guard_generation_admin_abort_and_the_started_redis(tiny_model, tmp_path):
    import redis

    admin_file = tmp_path / "admin-keys"
    admin_file.write_text(f"# operators\n{ADMIN}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    env = user_env(TANDEM_API_KEYS=f"{KEY_A},{KEY_B}", TANDEM_ADMIN_API_KEYS_FILE=str(admin_file),
                   TANDEM_REDIS_PASSWORD=REDIS_PASSWORD)
    with tandem_serve(tiny_model, port, log, env=env) as proc:
        redis_port = int(re.search(r"Redis at redis://127\.0\.0\.1:(\d+)/0", log.read_text()).group(1))
        assert "AUTH required" in log.read_text() and REDIS_PASSWORD not in log.read_text()
        long_prompt = "The for statement in Python iterates over the items of any sequence " * 6  # > 1 KV block
        refused, allowed = generate(port), generate(port, long_prompt, TANDEM_API_KEY=KEY_B)
        bench_summary = tmp_path / "bench.json"
        bench_ok = bench_serve(port, bench_summary, TANDEM_API_KEY=KEY_A)
        bench_refused = bench_serve(port, tmp_path / "refused.json")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            gen, adm = pb_grpc.GenerationStub(channel), admin_pb2_grpc.AdminStub(channel)
            info = pb.GetModelInfoRequest()
            codes = {"none": _code(lambda: gen.GetModelInfo(info, timeout=30)),
                     "wrong": _code(lambda: gen.GetModelInfo(info, timeout=30, metadata=bearer(KEY_A[:-1] + "x"))),
                     "right": _code(lambda: gen.GetModelInfo(info, timeout=30, metadata=bearer(KEY_A))),
                     "admin/api-key": _code(lambda: adm.GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), timeout=30,
                                                                       metadata=bearer(KEY_A)))}
            stats = adm.GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), timeout=30, metadata=bearer(ADMIN))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            aborts, ends = _abort_across_keys(gen)
        store = redis.Redis(port=redis_port, password=REDIS_PASSWORD)
        end = time.monotonic() + 30
        while store.dbsize() == 0 and time.monotonic() < end:  # write-back of the prompts' blocks is async
            time.sleep(0.5)
        written = store.dbsize()
        noauth = _redis_reply(redis_port, b"PING\r\n")
        found = listeners(descendants(proc.pid))
        stop(proc)
    assert refused.returncode == 1 and "UNAUTHENTICATED: missing API key" in refused.stderr
    assert allowed.returncode == 0 and "completion_tokens=4" in allowed.stdout, allowed.stderr
    assert bench_ok.returncode == 0, bench_ok.stderr[-2000:]
    summary = json.loads(bench_summary.read_text())
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert bench_refused.returncode == 2 and "UNAUTHENTICATED: missing API key" in bench_refused.stderr
    assert "Traceback" not in bench_refused.stderr
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert codes == {"none": unauth, "wrong": unauth, "right": grpc.StatusCode.OK, "admin/api-key": unauth}
    assert stats.workers and health.status == health_pb2.HealthCheckResponse.SERVING
    assert aborts == {"bob": True, "bob-again": False, "alice-still-running": True, "stranger": "UNAUTHENTICATED",
                      "alice": True}
    assert ends == {"alice": "abort", "bob": "abort"}
    assert noauth.startswith(b"-NOAUTH") and written > 0  # redis refuses a stranger; the workers got in
    assert [item for item in found if not item.loopback] == []


def _abort_across_keys(gen) -> tuple[dict[str, object], dict[str, str]]:
    """Alice and Bob each stream a long request with the same id (no "already in use" across
    keys). Bob's Abort ends his own only; a second one finds nothing although Alice's request of
    that id still runs; an unknown key's Abort is refused; Alice's ends hers. Returns the Abort
    answers and each stream's finish_reason."""
    def long_request():
        return pb.GenerateRequest(prompt="The for statement " * 8, request_id="job-1",
                                  sampling=pb.SamplingParams(max_tokens=1800, ignore_eos=True, temperature=0.0))

    abort = pb.AbortRequest(request_id="job-1")
    alice = gen.Generate(long_request(), timeout=120, metadata=bearer(KEY_A))
    next(alice)  # in flight
    bob = gen.Generate(long_request(), timeout=120, metadata=bearer(KEY_B))
    next(bob)
    answers = {"bob": gen.Abort(abort, timeout=30, metadata=bearer(KEY_B)).found}
    ends = {"bob": [r for r in bob][-1].finish_reason}
    answers["bob-again"] = gen.Abort(abort, timeout=30, metadata=bearer(KEY_B)).found
    answers["alice-still-running"] = next(alice).finish_reason == ""
    answers["stranger"] = _code(lambda: gen.Abort(abort, timeout=30, metadata=bearer("stranger-" + "z" * 20))).name
    answers["alice"] = gen.Abort(abort, timeout=30, metadata=bearer(KEY_A)).found
    ends["alice"] = [r for r in alice][-1].finish_reason
    return answers, ends
