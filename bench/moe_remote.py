"""``tandem bench moe``'s ``remote`` run: the experts in ExpertWorker shards hosted as Ray Serve deployments.

A local Ray head is started in this process (loopback, logical CPUs) and the shards are composed
exactly as a Serve app composes them: ``router.app.parse_args`` validates the engine options
(``experts: {backend: remote, num_shards: N}``) into the worker's ``EngineConfig`` and the shard
configs, and ``router.app.expert_shard_deployments`` binds them; each shard is deployed with
``serve.run`` (its own replica process, as in a cluster). The engine stays in this process and
calls the shards' handles through ``services.expert_client.remote_expert_shards``, as a decode
replica's engine does (``HostDeps.expert_shards``). Every shard call's latency is read from the
``ExpertCallLog`` that feeds the workers' ``tandem_expert_remote_call_seconds`` histogram.

On exit Serve and Ray are shut down, and every process this one started (the Ray head's
processes and the replicas, listed before the shutdown) is waited for; any still alive after
``EXIT_WAIT_S`` is killed by its PID (counted in ``processes_killed``).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

from router.processes import descendants

DEPLOYMENT = "ExpertWorker"
CALL_TIMEOUT_S = 60.0  # a loaded 2-core box answers late; the bench measures, it does not fail fast
EXIT_WAIT_S = 20.0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def peak_rss_of(pid: int) -> int | None:
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    except OSError:
        return None
    return int(fields["VmHWM"].split()[0]) * 1024


class ExpertShardApps:
    """The Ray head and the ExpertWorker shard deployments of one bench run (a context manager)."""

    def __init__(self, model: str, engine_options: dict, num_shards: int, threads: int | None = None):
        from router.app import parse_args

        experts = {"backend": "remote", "deployment": DEPLOYMENT, "num_shards": num_shards,
                   "call_timeout_s": CALL_TIMEOUT_S}
        threads = threads or max(1, (os.cpu_count() or 1) // num_shards)
        self.app = parse_args({"model": model, "engine": {**engine_options, "experts": experts},
                               "expert_worker": {"torch_threads": threads}})
        self.config = self.app.workers["unified"].engine  # the bench engine's config
        self.handles: dict = {}
        self.latencies: list[float] = []
        self.pids: list[int] = []
        self.processes_killed = 0
        self.deploy_s = 0.0

    def __enter__(self) -> "ExpertShardApps":
        from ray import serve

        from router import launcher
        from router.app import expert_shard_deployments

        t0 = time.perf_counter()
        launcher.start_local_ray(num_cpus=16)
        try:  # idle OpenMP threads of a replica sleep instead of spinning on the shared cores
            actor = {"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
            for name, app in expert_shard_deployments(self.app.experts, ray_actor_options=actor).items():
                self.handles[name] = serve.run(app, name=f"bench-moe-{name}", route_prefix=None,
                                               logging_config={"enable_access_log": False})
        except BaseException:
            self.__exit__()
            raise
        self.deploy_s = time.perf_counter() - t0  # Ray head start + every shard up
        return self

    def engine(self):
        """An engine (in this process) whose MoE layers call the shards; each call's latency is recorded."""
        from services.engine.engine import LLMEngine
        from services.engine.plugins import HostDeps
        from services.expert_client import ExpertCallLog, remote_expert_shards

        self.log = ExpertCallLog()
        self.log.observers.append(lambda shard, seconds, ok: ok and self.latencies.append(seconds))
        return LLMEngine(self.config, HostDeps(expert_shards=remote_expert_shards(self.handles, self.log)))

    def call_stats(self, since: int = 0) -> dict:
        """The answered shard calls' latency (ms) since ``len(self.latencies)`` was ``since``, and
        the process's call totals."""
        lat = sorted(self.latencies[since:])
        t = self.log.totals()
        out = {"calls": len(lat), "total_calls": t.num_calls, "failures": t.num_failures}
        if lat:
            out.update(mean_ms=statistics.fmean(lat) * 1e3, p50_ms=lat[len(lat) // 2] * 1e3,
                       p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, max_ms=lat[-1] * 1e3)
        return out

    def shard_stats(self) -> list[dict]:
        """Per shard: its experts, weight bytes, calls, rows, replica PID and peak RSS."""
        rows = []
        for name, handle in self.handles.items():
            s = handle.stats.remote().result(timeout_s=60)
            self.pids.append(s.pid)
            rows.append({"deployment": name, "shard": s.shard, "experts": [s.first_expert, s.last_expert],
                         "weight_bytes": s.weight_bytes, "calls": s.num_calls, "rows": s.num_rows, "pid": s.pid,
                         "peak_rss_bytes": peak_rss_of(s.pid)})
        return rows

    def __exit__(self, *exc) -> None:
        from router import launcher

        started = sorted(descendants(os.getpid()) - {os.getpid()})
        try:
            launcher.shutdown()
        finally:
            self.processes_killed = reap(started)


def reap(pids: list[int], wait_s: float = EXIT_WAIT_S) -> int:
    """Wait for ``pids`` (processes this one started) to end; SIGKILL those left; how many were."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)
