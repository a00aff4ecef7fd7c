"""Start a local Ray head, deploy a Serve config, wait until the router answers health checks.

Used by ``tandem serve`` and by the integration tests, so that both run the deploy/*.yaml
files the way ``serve run`` does (``ServeDeploySchema`` -> ``deploy_apps``).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import re
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router import failed_head, ray_auth
from services.engine import env

LOOPBACK = "127.0.0.1"
log = logging.getLogger("tandem.launcher")


def load_config(path: str | Path, *, model: str | None = None, port: int | None = None,
                overrides: dict | None = None, deployments: dict | None = None) -> dict:
    """A deploy YAML as a dict, with the app args ``model``/``port``/``overrides`` and the
    per-deployment options ``deployments`` ({name: {option: value}}) applied."""
    config = yaml.safe_load(Path(path).read_text())
    return patch_config(config, model=model, port=port, overrides=overrides, deployments=deployments)


def patch_config(config: dict, *, model: str | None = None, port: int | None = None,
                 overrides: dict | None = None, deployments: dict | None = None) -> dict:
    config = copy.deepcopy(config)
    for name, options in (deployments or {}).items():
        entries = config["applications"][0].setdefault("deployments", [])
        entry = next((d for d in entries if d["name"] == name), None)
        if entry is None:
            entry = {"name": name}
            entries.append(entry)
        for key, value in options.items():
            if isinstance(value, dict) and isinstance(entry.get(key), dict):
                entry[key] = {**entry[key], **value}
            else:
                entry[key] = value
    app = config["applications"][0]
    args = app.setdefault("args", {})
    if model is not None:
        args["model"] = str(model)
    if port is not None:
        args["port"] = int(port)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    return config


BUILDER = "router.app:build_app"


def validate(config: dict) -> None:
    """Parse the args of every Tandem app in a Serve config as the builder will, before anything
    starts: a bad value raises ValueError naming it by its YAML path
    (``applications[0].args.engine.block_size: must be a power of two ...``)."""
    from router.app import parse_args

    for i, app in enumerate(config.get("applications") or []):
        if app.get("import_path") == BUILDER:
            parse_args(app.get("args"), f"applications[{i}].args")


def app_address(config: dict) -> str:
    args = config["applications"][0].get("args", {})
    return f"{args.get('host', LOOPBACK)}:{args.get('port', 50051)}"


# Environment defaults for the Ray processes this head starts (an operator's own value wins;
# listed with the same values in services/engine/env.py).
# RAY_SERVE_CONTROL_LOOP_INTERVAL_S: Serve's controller refreshes its node/resource view from
# the GCS on every loop (ClusterNodeInfoCache.update: ~80% of the control loop's py-spy samples);
# at Serve's 0.1 s that cost 4.2-5.7 CPU-s per 50 s benchmark on the 2-core box (~5% of the
# machine), at 0.5 s idle use fell from 0.81 to 0.38 CPU-s per 20 s. Autoscaling decisions
# and replica replacement react at most 0.4 s later.
RAY_ENV_DEFAULTS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
# Heads tried when a raylet does not register in time (router.failed_head says why that happens).
RAY_START_ATTEMPTS = 2
# Keeps a loopback node IP loopback (loopback_environment); must be set before `import ray`.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def loopback_environment(node_ip: str = LOOPBACK) -> None:
    """Before ``ray`` is first imported in this process: when ``node_ip`` is a loopback address,
    make Ray keep it (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, unless the operator set it).

    Why (measured, Ray 2.60, 2026-12-03): on Linux ``ray.init(_node_ip_address="127.0.0.1")``
    replaces a loopback address by the machine's outward one (``resolve_ip_for_localhost``),
    and every Ray process then binds that address or all interfaces (GCS, raylet, each core
    worker on ``::``; the dashboard agent, the autoscaler's and the dashboard's Prometheus
    endpoints on ``0.0.0.0``). Ray reads the variable once, when ``ray`` is imported, in every
    process; set here, the head's processes inherit it.
    """
    if is_loopback(node_ip):
        env.set_defaults(LOOPBACK_ENV)


def is_loopback(node_ip: str) -> bool:
    """Whether ``node_ip`` is a loopback address (ValueError naming it when it is no IP address)."""
    try:
        return ipaddress.ip_address(node_ip).is_loopback
    except ValueError:
        raise ValueError(f"node_ip: must be an IP address (e.g. 127.0.0.1), got {node_ip!r}") from None


def start_local_ray(*, num_cpus: int = 16, dashboard: bool = False, node_ip: str = LOOPBACK, **options):
    """A fresh single-node Ray head whose processes all listen on ``node_ip`` (default loopback;
    logical CPUs: Serve asks 1 per replica).

    Token authentication is on: Ray 2.60 enables it for a new local cluster unless
    ``RAY_AUTH_MODE`` says otherwise (it is read when ``ray`` is imported, so it can only be
    changed from the environment of this process). The token is made before ``ray.init``
    (``router.ray_auth``: Ray's own first write races with a second first start). A GCS that
    fails to start raises with its own log line. A raylet that did not register (its agents too
    slow to start on a loaded machine: ``router.failed_head``) gets one fresh head, after the
    failed one's processes are ended. ``RAY_ENV_DEFAULTS`` are put into this
    process's environment (unless set), which the head's processes inherit. A loopback
    ``node_ip`` stays loopback (``loopback_environment``, which ``tandem serve`` calls before
    anything imports ``ray``) unless the operator set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1.
    """
    loopback_environment(node_ip)
    import ray

    _keep_loopback_in_this_process(node_ip)
    env.set_defaults(RAY_ENV_DEFAULTS)
    if env.ray_auth_mode() != "token":
        log.warning("RAY_AUTH_MODE=%s: token authentication is off", env.ray_auth_mode())
    elif ray_auth.ensure_auth_token():  # before ray.init, which would write it non-atomically
        log.info("wrote a new Ray authentication token to %s", ray_auth.default_token_path())
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            return ray.init(address="local", _node_ip_address=node_ip, include_dashboard=dashboard,
                            dashboard_host=node_ip, num_cpus=num_cpus, namespace="serve", **options)
        except Exception as exc:
            reason = gcs_exit_reason(str(exc))
            if reason is not None:
                raise RuntimeError(f"{exc}\n{reason}") from exc
            if failed_head.RAYLET_STARTUP_TIMEOUT not in str(exc):
                raise
            reason = failed_head.abandon()
            if attempt == RAY_START_ATTEMPTS:
                raise RuntimeError(f"{exc}\n{reason} (after {attempt} attempts)") from exc
            log.warning("the Ray head did not come up (%s); starting a fresh one", reason)


def _keep_loopback_in_this_process(node_ip: str) -> None:
    """When ``ray`` was imported before ``loopback_environment`` (e.g. by a benchmark's imports),
    its flag was read as Ray's default: set it as the variable now says (the head's processes
    read the variable themselves). An operator's own true value wins, with a warning."""
    from ray._private import ray_constants

    if not (is_loopback(node_ip) and ray_constants.ENABLE_RAY_CLUSTER):
        return
    if env.ray_enable_cluster().lower() in ("1", "true"):
        log.warning("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=%s: Ray replaces node IP %s by this machine's address "
                    "and its processes listen there", env.ray_enable_cluster(), node_ip)
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets at import


def gcs_exit_reason(message: str) -> str | None:
    """What the GCS's log says when ``message`` is Ray's "Timed out waiting for file
    <session>/gcs_server_port_..." (Ray reports only the timeout; a GCS that exited before
    publishing its port says why in a fatal line of gcs_server.out); None for other errors."""
    found = re.search(r"(\S+)/gcs_server_port_", message)
    log_file = Path(found.group(1)) / "logs" / "gcs_server.out" if found else None
    if log_file is None or not log_file.is_file():
        return None
    fatal = [line for line in log_file.read_text(errors="replace").splitlines() if re.match(r"\[[^]]* [CF] \d", line)]
    if fatal:
        return f"the GCS exited: {fatal[0][:600]}"
    return (f"no fatal line in {log_file}: the GCS was still starting "
            "(RAY_gcs_server_port_wait_time_s lengthens Ray's 30 s wait)")


def deploy(config: dict, timeout_s: float = 300.0) -> str:
    """Deploy a Serve config (dict of a deploy YAML) on the connected Ray cluster; return the
    router's address once it reports SERVING."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    validate(config)
    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    address = app_address(config)
    wait_running([a.name for a in schema.applications], timeout_s)
    wait_serving(address, timeout_s=60)
    return address


def wait_running(app_names: list[str], timeout_s: float) -> None:
    """Until every app is RUNNING; raises with Serve's message when one fails to deploy."""
    from ray import serve

    end = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "NOT_STARTED" for name in app_names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(f"Serve app {failed[0]!r} failed to deploy: {apps[failed[0]].message}")
        if time.monotonic() > end:
            raise TimeoutError(f"Serve apps not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)


def wait_serving(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Until the gRPC health service at ``address`` says SERVING."""
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"router at {address} not SERVING after {timeout_s:.0f}s")
            time.sleep(0.25)


def shutdown() -> None:
    """Delete the Serve apps and stop the Ray head this process started."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
