"""The Serve application builder: ``import_path: router.app:build_app`` in deploy/*.yaml.

``args`` of the application (all optional):

    mode: unified | pd          # one worker deployment, or PrefillWorker + DecodeWorker
    model: PATH                 # checkpoint folder or model name (services/engine/model_catalog.py);
                                #   default: the default model
    model_id: NAME              # id clients pass as GenerateRequest.model; default: folder name
    host: 127.0.0.1             # gRPC bind address
    port: 50051                 # gRPC port
    kv_transfer: ray            # KVTransfer backend (pd mode): a name or {name, options}
    torch_threads: N            # intra-op threads per worker; default: every core of its node;
                                #   or per role: {prefill: N, decode: M} (pd mode; unset roles: default)
    engine: {...}               # EngineConfig options of every worker (services/engine/config.py):
                                #   flat vLLM names (block_size, max_num_seqs, ...) or sections
                                #   (cache, scheduler, experts, speculative, quantization)
    prefill_engine: {...}       # overrides for PrefillWorker (pd mode)
    decode_engine: {...}        # overrides for DecodeWorker (pd mode)
    router: {max_inflight_requests: N, max_prompt_bytes: N, prefix_routing: true,  # false: least load only
             max_migrations: 2}  # a stream moves on at most this often when its replica dies (router/migration.py)
                                # input limits (INVALID_ARGUMENT naming the field and the limit; defaults):
                                #   max_request_bytes: 4194304 (serialized request; grpc's own transport
                                #   limit max_message_bytes: 67108864 answers RESOURCE_EXHAUSTED above it),
                                #   max_prompt_bytes: 1048576, max_prompt_token_ids: 262144,
                                #   max_messages: 1024, max_stop_strings: 16, max_stop_chars: 1024,
                                #   max_stop_token_ids: 256
    prefix_store: {url: redis://127.0.0.1:6379, ttl_s: 3600, timeout_s: 0.5, ...}
                                # Redis tier of the prefix cache (services/prefix_store/config.py);
                                # absent or null = local tier only
    draft_worker: {session_ttl_s: 60, torch_threads: N}
                                # DraftWorker replicas (services/draft_worker.py), deployed when an
                                #   engine's speculative section is {method: draft_model, model: PATH,
                                #   deployment: NAME}: NAME is the deployment (spec.yaml: DraftWorker)

    expert_worker: {torch_threads: N}
                                # ExpertWorker shards (services/expert_worker.py), deployed when an
                                #   engine's experts section is {backend: remote, deployment: NAME,
                                #   num_shards: N}: deployments NAME0 .. NAME{N-1} (moe.yaml: ExpertWorker0, 1)

Speculative decoding is for the roles that decode: a ``speculative`` section in ``engine`` does
not reach PrefillWorker (it samples one token per request and would never propose).

Replica counts, autoscaling and resources are per deployment in the YAML's ``deployments``
section (names: Router, UnifiedWorker, PrefillWorker, DecodeWorker, each DraftWorker's NAME and each
ExpertWorker shard's NAME{s}).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from router.migration import MigrationConfig
from router.replica_router import request_router_config
from router.server import Router, RouterConfig
from services.config import DraftWorkerConfig, ExpertWorkerConfig, WorkerConfig
from services.draft_worker import DraftWorkerDeployment
from services.engine.gguf_file import is_gguf_path
from services.engine.model.expert_backends.remote import shard_names, shard_ranges
from services.engine.model_config import ModelConfig
from services.expert_worker import ExpertWorkerDeployment
from services.engine.config import EngineConfig
from services.engine.config_parse import ConfigError, join
from services.engine.model_catalog import check_model_path, resolve_model
from services.kv_transfer import KV_TRANSFERS
from services.prefix_store.config import PrefixStoreConfig
from services.workers import DecodeWorker, PrefillWorker, UnifiedWorker

MODES = ("unified", "pd")
_ROUTER_KEYS = ("max_inflight_requests", "max_prompt_bytes", "max_message_bytes", "max_request_bytes",
                "max_prompt_token_ids", "max_messages", "max_stop_strings", "max_stop_chars", "max_stop_token_ids",
                "grace_s", "prefix_routing", "max_migrations")
_KEYS = ("mode", "model", "model_id", "host", "port", "kv_transfer", "engine", "prefill_engine", "decode_engine",
         "router", "torch_threads", "prefix_store", "draft_worker", "expert_worker")
_DRAFT_KEYS = ("session_ttl_s", "torch_threads")
_EXPERT_KEYS = ("torch_threads",)
_WORKER_NAMES = ("Router", "UnifiedWorker", "PrefillWorker", "DecodeWorker")


@dataclass(frozen=True)
class AppConfig:
    """The validated application args."""

    mode: str
    router: RouterConfig
    workers: dict[str, WorkerConfig]  # role -> config
    drafts: dict[str, DraftWorkerConfig] = field(default_factory=dict)  # DraftWorker deployment name -> config
    experts: dict[str, ExpertWorkerConfig] = field(default_factory=dict)  # ExpertWorker shard deployment -> config


def parse_args(args: dict | None, path: str = "args") -> AppConfig:
    """Validate a Serve app's ``args``; every error is a ValueError naming the field by ``path``
    (``tandem serve`` passes ``applications[0].args``)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(_KEYS))
    if unknown:
        raise ConfigError(path, f"unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    mode = args.get("mode", "unified")
    if mode not in MODES:
        raise ConfigError(join(path, "mode"), f"must be one of {MODES}, got {mode!r}")
    model = resolve_model(args.get("model"))
    try:
        check_model_path(model)
    except ValueError as exc:
        raise ConfigError(join(path, "model"), str(exc)) from None
    model_id = args.get("model_id") or Path(model).name
    router = _router_config(args, model, path)
    engine = EngineConfig.from_options(model, args.get("engine"), join(path, "engine"))
    threads = _torch_threads(args.get("torch_threads"), mode, path)
    store = (PrefixStoreConfig.from_dict(args["prefix_store"], join(path, "prefix_store"))
             if args.get("prefix_store") else None)
    if mode == "unified":
        workers = {"unified": WorkerConfig("unified", model_id, engine, torch_threads=threads["unified"],
                                           prefix_store=store)}
        return AppConfig(mode, router, workers, _draft_workers(workers, args.get("draft_worker"), path),
                         _expert_workers(workers, args.get("expert_worker"), path))
    transfer = KV_TRANSFERS.parse(args.get("kv_transfer", "ray"), join(path, "kv_transfer"))
    workers = {}
    for role in ("prefill", "decode"):
        key = f"{role}_engine"
        role_engine = engine.with_options(args.get(key), join(path, key))
        if role == "prefill":  # one token per request: a proposer would never propose
            role_engine = dataclasses.replace(role_engine, speculative=None)
        workers[role] = WorkerConfig(role, model_id, role_engine, kv_transfer=transfer, torch_threads=threads[role],
                                     prefix_store=store if role == "prefill" else None)
    if workers["prefill"].engine.cache.block_size != workers["decode"].engine.cache.block_size:
        raise ConfigError(path, "prefill_engine.block_size and decode_engine.block_size must be equal")
    return AppConfig(mode, router, workers, _draft_workers(workers, args.get("draft_worker"), path),
                     _expert_workers(workers, args.get("expert_worker"), path))


def _expert_workers(workers: dict[str, WorkerConfig], options, path: str) -> dict[str, ExpertWorkerConfig]:
    """The ExpertWorker shard deployments the workers' ``experts: remote`` sections name. Roles
    that name the same deployment must agree on what it holds (model, device, dtype, shards)."""
    options = dict(options or {})
    bad = sorted(set(options) - set(_EXPERT_KEYS))
    if bad:
        raise ConfigError(join(path, "expert_worker"), f"unknown key(s) {bad}; known: {list(_EXPERT_KEYS)}")
    shards: dict[str, ExpertWorkerConfig] = {}
    for role, worker in workers.items():
        experts = worker.engine.experts
        if experts.name != "remote":
            continue
        where = join(path, f"{role}_engine" if role != "unified" else "engine")
        _check_shardable(worker.engine, join(where, "experts"))
        for s, name in enumerate(shard_names(experts.options)):
            if name in _WORKER_NAMES:
                raise ConfigError(join(where, "experts.deployment"), f"{name!r} is a worker deployment's name")
            try:
                config = ExpertWorkerConfig(name, s, worker.engine, **options)
            except ConfigError as exc:
                raise exc.under(join(path, "expert_worker")) from None
            seen = shards.setdefault(name, config)
            e = worker.engine
            if (seen.target.model, seen.target.device, seen.target.dtype, seen.options) != \
                    (e.model, e.device, e.dtype, experts.options):
                raise ConfigError(join(where, "experts"), f"shard deployment {name!r} is named by roles whose "
                                                          f"model, device, dtype or experts options differ")
    return shards


def _draft_workers(workers: dict[str, WorkerConfig], options, path: str) -> dict[str, DraftWorkerConfig]:
    """The DraftWorker deployments the workers' speculative sections name, and a check of every
    draft model's path (a missing draft fails here, not in a replica)."""
    options = dict(options or {})
    bad = sorted(set(options) - set(_DRAFT_KEYS))
    if bad:
        raise ConfigError(join(path, "draft_worker"), f"unknown key(s) {bad}; known: {list(_DRAFT_KEYS)}")
    drafts: dict[str, DraftWorkerConfig] = {}
    for role, worker in workers.items():
        spec = worker.engine.speculative
        if spec is None or spec.name != "draft_model":
            continue
        where = join(path, "decode_engine" if role == "decode" else "engine")
        try:
            check_model_path(resolve_model(spec.options.model))
        except ValueError as exc:
            raise ConfigError(join(where, "speculative.model"), str(exc)) from None
        name = spec.options.deployment
        if not name:
            continue
        if name in _WORKER_NAMES:
            raise ConfigError(join(where, "speculative.deployment"), f"{name!r} is a worker deployment's name")
        try:
            drafts[name] = DraftWorkerConfig(name, worker.engine, **options)
        except ConfigError as exc:
            raise exc.under(join(path, "draft_worker")) from None
    return drafts


def _check_shardable(engine: EngineConfig, where: str) -> None:
    """A remote experts section needs a MoE safetensors checkpoint with at least one expert per shard."""
    if is_gguf_path(engine.model):
        raise ConfigError(join(where, "backend"), "remote experts need a safetensors checkpoint folder, not .gguf")
    mc = ModelConfig.from_pretrained(engine.model)
    if not mc.is_moe:
        raise ConfigError(join(where, "backend"), f"remote experts need a MoE model; {engine.model} is dense")
    try:
        shard_ranges(mc.num_experts, engine.experts.options.num_shards)
    except ValueError as exc:
        raise ConfigError(join(where, "num_shards"), str(exc).split(": ", 1)[1]) from None


def _router_config(args: dict, model: str, path: str) -> RouterConfig:
    router_args = dict(args.get("router") or {})
    bad = sorted(set(router_args) - set(_ROUTER_KEYS))
    if bad:
        raise ConfigError(join(path, "router"), f"unknown key(s) {bad}; known: {list(_ROUTER_KEYS)}")
    try:
        config = RouterConfig(model=model, host=args.get("host", "127.0.0.1"), port=int(args.get("port", 50051)),
                              **router_args)
    except ConfigError as exc:
        raise exc.under(join(path, "router")) from None
    try:
        MigrationConfig(config.max_migrations)
    except ValueError as exc:
        raise ConfigError(join(path, "router"), str(exc)) from None
    return config


def _torch_threads(value, mode: str, path: str) -> dict[str, int | None]:
    """``args.torch_threads`` (None, N, or {role: N}) -> threads per role of ``mode``."""
    roles = ("unified",) if mode == "unified" else ("prefill", "decode")
    per_role = dict(value) if isinstance(value, dict) else {r: value for r in roles}
    bad = sorted(set(per_role) - set(roles))
    if bad:
        raise ConfigError(join(path, "torch_threads"), f"unknown role(s) {bad} for mode {mode!r}; known: {list(roles)}")
    for role, n in per_role.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(join(path, "torch_threads"), f"must be a positive integer, got {n!r} for {role}")
    return {r: per_role.get(r) for r in roles}


def expert_shard_deployments(experts: dict[str, ExpertWorkerConfig], **options) -> dict:
    """Each ExpertWorker shard deployment of ``experts`` (``AppConfig.experts``) bound to its config;
    ``options``: Serve deployment options over ExpertWorkerDeployment's (bench/moe_remote.py).
    Each shard is a deployment of its own (its replicas are interchangeable: Serve's default routing)."""
    return {name: ExpertWorkerDeployment.options(name=name, **options).bind(shard) for name, shard in experts.items()}


def build_app(args: dict | None = None):
    """Serve application builder (``serve run deploy/local.yaml`` calls it with the YAML's args)."""
    config = parse_args(args)
    routed = request_router_config()  # the router picks each request's replica (router/replica_router.py)
    # each engine's calls go to the DraftWorker replica that holds its sequences (the same request router)
    drafts = {name: DraftWorkerDeployment.options(name=name, request_router_config=routed).bind(draft)
              for name, draft in config.drafts.items()}

    shards = expert_shard_deployments(config.experts)

    def worker(deployment, role: str):
        engine = config.workers[role].engine
        spec = engine.speculative
        name = spec.options.deployment if spec is not None and spec.name == "draft_model" else ""
        uses = {name: drafts[name]} if name else {}
        experts = {n: shards[n] for n in shard_names(engine.experts.options)} if engine.experts.name == "remote" \
            else {}
        return deployment.options(request_router_config=routed).bind(config.workers[role], drafts=uses,
                                                                    experts=experts)

    if config.mode == "unified":
        return Router.bind(config.router, unified=worker(UnifiedWorker, "unified"))
    return Router.bind(config.router, prefill=worker(PrefillWorker, "prefill"), decode=worker(DecodeWorker, "decode"))


__all__ = ["AppConfig", "build_app", "expert_shard_deployments", "parse_args"]
