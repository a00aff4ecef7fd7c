"""``tandem bench spec --draft-deployment``: the same draft hosted in a DraftWorker Serve deployment.

A local Ray head is started in this process (loopback, logical CPUs) and one ``DraftWorker``
replica is deployed with ``serve.run`` (its own process, as in a cluster); the bench's engines of
the ``worker-*`` and ``handle-*`` modes stay in this process and call it through
``services.draft_client.RemoteDraftProposer``, exactly as a decode replica's engine does:
``worker-*`` with ``deployment_transport: direct`` (plain actor calls, the default), ``handle-*``
with ``deployment_transport: handle`` (every call through the Serve handle). Both kinds of engine
share the one replica (each has its own client id, so their sequences never mix).
"""

from __future__ import annotations

import argparse

DEPLOYMENT = "DraftWorker"
TRANSPORTS = {"worker": "direct", "handle": "handle"}  # mode prefix -> deployment_transport


def is_remote(mode: str) -> bool:
    return mode.split("-", 1)[0] in TRANSPORTS


def remote_section(local: dict, mode: str, timeout_s: float) -> dict:
    """The speculative section of a remote mode: the local one plus the deployment's keys."""
    return {**local, "deployment": DEPLOYMENT, "deployment_transport": TRANSPORTS[mode.split("-", 1)[0]],
            "deployment_timeout_s": timeout_s, "deployment_retry_s": 0.2}


class DraftDeployment:
    """The Ray head and the DraftWorker deployment of one bench run (a context manager)."""

    def __init__(self, config, threads: int | None):
        self.config = config  # the target's EngineConfig whose speculative section names DEPLOYMENT
        self.threads = threads
        self.handle = None

    def __enter__(self) -> "DraftDeployment":
        from ray import serve

        from router import launcher
        from router.replica_router import request_router_config
        from services.config import DraftWorkerConfig
        from services.draft_worker import DraftWorkerDeployment

        launcher.start_local_ray(num_cpus=16)
        app = DraftWorkerDeployment.options(name=DEPLOYMENT, request_router_config=request_router_config(),
                                            ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}).bind(
            DraftWorkerConfig(DEPLOYMENT, self.config, torch_threads=self.threads))
        self.handle = serve.run(app, name="bench-spec", route_prefix=None,
                                logging_config={"enable_access_log": False})
        return self

    def replica_stats(self) -> dict:
        """The replica's calls and mean time per call spent drafting there (all modes together)."""
        s = self.handle.stats.remote().result(timeout_s=60)
        return {"calls": s.num_calls, "propose_ms_per_call": s.propose_seconds / s.num_calls * 1e3 if s.num_calls
                else None}

    def __exit__(self, *exc) -> None:
        from router import launcher

        launcher.shutdown()

    def engine(self, config):
        """An engine (in this process) whose draft_model proposer calls the deployment."""
        from services.draft_client import remote_proposers
        from services.engine.engine import LLMEngine
        from services.engine.plugins import HostDeps

        return LLMEngine(config, HostDeps(proposers=remote_proposers({DEPLOYMENT: self.handle}, "")))


def round_trip_ms(before, after) -> tuple[int, float | None]:
    """(answered calls, mean round trip in ms) between two ``EngineStats.spec_remote`` snapshots."""
    if after is None:
        return 0, None
    failed = lambda r: r.num_timeouts + r.num_errors + r.num_unavailable
    calls = (after.num_calls - failed(after)) - ((before.num_calls - failed(before)) if before else 0)
    seconds = after.call_seconds - (before.call_seconds if before else 0.0)
    return calls, (seconds / calls * 1e3 if calls else None)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--draft-deployment", action="store_true",
                    help="also run each speculating mode with the draft in a DraftWorker deployment (modes "
                         "worker-adaptive / worker-always: plain actor calls; name handle-* in --modes for every "
                         "call through the Serve handle)")
    ap.add_argument("--draft-timeout", type=float, default=1.0,
                    help="deployment_timeout_s of the remote modes (a loaded box answers late)")


def expand_modes(modes: list[str], draft_deployment: bool) -> list[str]:
    """``--draft-deployment`` adds the worker-* twin of every local speculating mode."""
    if not draft_deployment:
        return modes
    return modes + [f"worker-{m}" for m in modes if m in ("adaptive", "always") and f"worker-{m}" not in modes]
