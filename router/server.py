"""The router deployment: a grpc.aio server inside a Ray Serve replica.

Serve's own gRPC proxy is several times slower per message and has no health or
reflection service, so the router replica runs its own server on the replica's event loop
and talks to the workers through Serve handles. Several router replicas on one node share
the port (SO_REUSEPORT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray import serve

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.auth import AuthConfig, AuthInterceptor, Authenticator
from router.pipeline import PrefillDecodePipeline, UnifiedPipeline
from router.prefix_routing import BalanceConfig
from router.lifecycle import AdmissionLimits, RequestLifecycle
from router.migration import MigrationConfig
from router.request_decoding import DecodingInterceptor
from router.servicer import AdminServicer, GenerationServicer
from router.validation import Limits, RequestValidator
from services.engine.config_parse import ConfigError
from services.engine.gc_tuning import freeze_startup_objects
from services.replica_bind import bind_replica_grpc_to_node_ip
from services.engine.tokenizer import Tokenizer
from services.telemetry import RouterTelemetry

log = logging.getLogger("tandem.router")
GENERATION = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class RouterConfig:
    """The router's part of the app config."""

    model: str  # checkpoint folder (the router loads only its tokenizer.json)
    host: str = "127.0.0.1"  # address the gRPC server binds
    port: int = 50051  # gRPC port
    max_inflight_requests: int = 1024  # per router replica; beyond: RESOURCE_EXHAUSTED
    max_prompt_bytes: int = Limits.max_prompt_bytes  # text prompts larger than this: INVALID_ARGUMENT
    max_message_bytes: int = 64 << 20  # gRPC receive limit (above it the transport answers RESOURCE_EXHAUSTED)
    max_request_bytes: int = 4 << 20  # larger serialized requests: INVALID_ARGUMENT (router/request_decoding.py)
    max_prompt_token_ids: int = Limits.max_prompt_token_ids  # the other input limits: router/validation.py Limits
    max_messages: int = Limits.max_messages
    max_stop_strings: int = Limits.max_stop_strings
    max_stop_chars: int = Limits.max_stop_chars
    max_stop_token_ids: int = Limits.max_stop_token_ids
    grace_s: float = 2.0  # how long in-flight streams may finish on shutdown
    prefix_routing: bool = True  # prefill/unified replica by longest cached prefix; False: least load only
    max_migrations: int = 2  # per request: moves to another replica after its replica died (router/migration.py)

    def __post_init__(self) -> None:
        """ConfigError naming the field (router/app.py puts the YAML path in front)."""
        for name in ("max_inflight_requests", "max_message_bytes", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.max_request_bytes > self.max_message_bytes:
            raise ConfigError("max_request_bytes", f"must be <= max_message_bytes ({self.max_message_bytes}), "
                                                   f"got {self.max_request_bytes}")
        self.limits()  # checks the input limits

    def limits(self) -> Limits:
        """The input limits the request validator enforces."""
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})


async def start_grpc_server(generation: GenerationServicer, admin: AdminServicer, config: RouterConfig,
                            authenticator: Authenticator | None = None):
    """Bind and start the server with Generation, Admin, Health and reflection; returns (server, health).
    Every call passes the DecodingInterceptor (bad bytes: INVALID_ARGUMENT); with ``authenticator``
    (API keys on) router/auth.py's AuthInterceptor first, so a caller without a key is refused
    before its bytes are parsed."""
    interceptors = [AuthInterceptor(authenticator)] if authenticator is not None else []
    interceptors.append(DecodingInterceptor(config.max_request_bytes))
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", config.max_message_bytes),
                                      ("grpc.so_reuseport", 1)])
    pb_grpc.add_GenerationServicer_to_server(generation, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [GENERATION, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"router: cannot bind {address}")
    await server.start()
    for name in ("", GENERATION):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("router: gRPC server listening on %s", address)
    return server, health_servicer


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class Router:
    async def __init__(self, config: RouterConfig, unified=None, prefill=None, decode=None):
        bind_replica_grpc_to_node_ip()  # Serve's in-replica gRPC server: node IP, not all interfaces
        balance = BalanceConfig(prefix_aware=config.prefix_routing)
        if unified is not None:
            self.pipeline = UnifiedPipeline(unified, balance)
        else:
            self.pipeline = PrefillDecodePipeline(prefill, decode, balance)
        self.config = config
        info = await self.pipeline.model_info()
        validator = RequestValidator(info, Tokenizer(config.model), config.limits())
        # spans from OTEL_*, /metrics on TANDEM_METRICS_PORT (services/telemetry)
        self.telemetry = RouterTelemetry.for_replica(info.model_id, _replica_id())
        lifecycle = RequestLifecycle(self.pipeline, validator, AdmissionLimits(config.max_inflight_requests),
                                     self.telemetry, MigrationConfig(config.max_migrations))  # every adapter's
        auth = AuthConfig.from_env()  # API keys from TANDEM_*API_KEYS(_FILE) (router/auth.py); none = open
        authenticator = Authenticator(auth) if auth.enabled else None
        self.generation = GenerationServicer(lifecycle, authenticator)
        admin = AdminServicer(self.pipeline, lifecycle)
        self.server, self.health = await start_grpc_server(self.generation, admin, config, authenticator)
        freeze_startup_objects()  # no full GC pass over start-up objects while serving (services/engine/gc_tuning.py)

    async def worker_stats(self):
        return await self.pipeline.worker_stats()

    async def check_health(self) -> None:
        # grpc.aio has no "is serving" query; a stopped server has no bound ports left.
        if self.server is None:
            raise RuntimeError("gRPC server stopped")

    async def __del__(self):
        server, self.server = getattr(self, "server", None), None
        if server is not None:
            await self.health.enter_graceful_shutdown()
            await server.stop(self.config.grace_s)
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.shutdown()  # flushes buffered spans


def _replica_id() -> str:
    """This Serve replica's id ("" outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""
