"""Every environment variable Tandem reads or sets: its meaning, its default, and its parsing.

This is the only module that touches ``os.environ`` (tests/unit/test_env.py fails on any other
read in router/, services/ or bench/). It sits at the bottom of the import graph (router ->
services -> services.engine -> here) and imports nothing but the standard library, so any
module can use it without loading torch, ray or grpc.

``VARIABLES`` lists them all; ``python -m services.engine.env`` prints the table with this
process's values (secrets masked). Each accessor reads one variable (or one group the
OpenTelemetry spec defines together) at call time from ``environ`` (default: ``os.environ``),
returns a typed value, and raises ValueError naming the variable on a bad value. An unset or
empty variable means its default. A bad value in one variable never breaks an unrelated
reader: nothing is parsed ahead of its use.

Kinds: ``tandem`` variables are Tandem's own; ``otel`` are OpenTelemetry's standard ones that
Tandem reads itself (the SDK reads the others, e.g. ``OTEL_BSP_SCHEDULE_DELAY``, itself);
``ray``/``openmp`` are read by those libraries, and Tandem only inspects them (to warn) or sets
their default in its own process before the library starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

Environ = Mapping[str, str]


@dataclass(frozen=True)
class Variable:
    """One environment variable."""

    name: str
    default: str | None  # the value an unset (or empty) variable stands for; None = no value
    kind: str  # who parses it: "tandem", "otel", "ray", "openmp" (see the module docstring)
    meaning: str  # what it does, and who reads or sets it
    secret: bool = False  # never printed


VARIABLES: tuple[Variable, ...] = (
    Variable("TANDEM_CPU_KERNELS", "auto", "tandem", "which build of the engine's C++ kernels runs "
             "(services/engine/kernels): auto (or 1/on) the best ISA variant the CPU runs, avx512 or avx2 forces "
             "one, torch (or 0/off) none: the plain torch path"),
    Variable("TANDEM_VLLM_VENV", "", "tandem", "tandem bench offline --vs-vllm: the vLLM-cpu venv "
             "(default /tmp/perf_anchor/vllm_venv)"),
    Variable("TANDEM_BENCH_ANCHORS", "", "tandem", "tandem bench offline --vs-vllm: the bench-anchors folder "
             "(default ../shared/bench-anchors)"),
    Variable("TANDEM_METRICS", "on", "tandem", "off: no /metrics HTTP endpoint in this process (the metrics "
             "are still counted)"),
    Variable("TANDEM_METRICS_HOST", "127.0.0.1", "tandem", "bind address of /metrics; the Helm chart sets 0.0.0.0"),
    Variable("TANDEM_METRICS_PORT", "9464", "tandem", "the router's /metrics port; workers (and a router whose "
             "port is taken) take the first free port of 9465..9496"),
    Variable("TANDEM_REDIS_PASSWORD", None, "tandem", "AUTH password of the Redis prefix store (unset: no AUTH); "
             "the variable's name is prefix_store.password_env, prefix_store.password_file wins", secret=True),
    Variable("TANDEM_API_KEYS", None, "tandem", "API keys the router accepts on the Generation service "
             "(`authorization: Bearer KEY` metadata), comma-separated; unset (and no TANDEM_API_KEYS_FILE): "
             "no authentication (router/auth.py)", secret=True),
    Variable("TANDEM_API_KEYS_FILE", None, "tandem", "file of API keys, one per line (# comments); "
             "read with TANDEM_API_KEYS (both count)"),
    Variable("TANDEM_ADMIN_API_KEYS", None, "tandem", "keys of the Admin service, comma-separated; when API "
             "keys are on and no admin key is set, Admin refuses every call", secret=True),
    Variable("TANDEM_ADMIN_API_KEYS_FILE", None, "tandem", "file of Admin keys, one per line"),
    Variable("TANDEM_API_KEY", None, "tandem", "the key `tandem generate` / `tandem chat` send "
             "(router/client.py); unset: none", secret=True),
    Variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, "otel", "OTLP/gRPC collector for spans (wins over "
             "OTEL_EXPORTER_OTLP_ENDPOINT); tracing is off when neither is set"),
    Variable("OTEL_EXPORTER_OTLP_ENDPOINT", None, "otel", "OTLP/gRPC collector (all signals)"),
    Variable("OTEL_SDK_DISABLED", "false", "otel", "true: tracing off whatever else is set"),
    Variable("OTEL_TRACES_EXPORTER", "otlp", "otel", "none: tracing off whatever else is set"),
    Variable("OTEL_TRACES_SAMPLER", "parentbased_traceidratio", "otel", "sampler of new traces, one of "
             "TRACE_SAMPLERS"),
    Variable("OTEL_TRACES_SAMPLER_ARG", "1.0", "otel", "sampled fraction in [0, 1] for the *traceidratio samplers"),
    Variable("OTEL_SERVICE_NAME", "tandem", "otel", "service.name resource attribute of every span"),
    Variable("RAY_AUTH_MODE", "token", "ray", "read by Ray when imported; Ray 2.60 turns token authentication "
             "on for a new local cluster; tandem serve warns when it is anything but token"),
    Variable("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0", "ray", "read by Ray when imported; set to 0 by "
             "router/launcher.py (loopback_environment, with the measurement) unless set, so that a loopback node "
             "IP stays loopback and every Ray process listens on 127.0.0.1 (Ray's own default on Linux, 1, "
             "replaces it by the machine's address)"),
    Variable("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0", "ray", "Serve's gRPC transport between replicas; "
             "kv_transfer ray warns when on (it pins every KV payload: a memory leak)"),
    Variable("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0", "ray", "turns on RAY_SERVE_USE_GRPC_BY_DEFAULT among "
             "others; kv_transfer ray warns when on"),
    Variable("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5", "ray", "Serve controller's loop period; set by "
             "router/launcher.py (RAY_ENV_DEFAULTS, with the measurement) unless set; Serve's own is 0.1"),
    Variable("OMP_WAIT_POLICY", "PASSIVE", "openmp", "set by services/engine/default_model/train.py unless set, "
             "before torch starts OpenMP (spinning threads on a busy 2-core box: ~3x slower steps); "
             "deploy/pd.yaml sets it for its workers"),
)
_BY_NAME = {v.name: v for v in VARIABLES}

TRACE_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
                  "parentbased_traceidratio")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _environ(environ: Environ | None) -> Environ:
    return os.environ if environ is None else environ


def _raw(name: str, environ: Environ | None) -> str | None:
    """The stripped value of a listed variable, or its default when unset or empty."""
    value = (_environ(environ).get(name) or "").strip()
    return value or _BY_NAME[name].default


def _flag(name: str, environ: Environ | None) -> bool:
    raw = _raw(name, environ).lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}: must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")


# ---- Tandem's own ----------------------------------------------------------------------------
KERNEL_CHOICES = ("auto", "avx512", "avx2", "torch")  # services/engine/kernels/variants.py CHOICES


def bench_path(name: str, environ: Environ | None = None) -> str | None:
    """TANDEM_VLLM_VENV / TANDEM_BENCH_ANCHORS: a path, or None when unset."""
    return _raw(name, environ) or None


def environment_copy(drop: tuple[str, ...] = (), environ: Environ | None = None) -> dict[str, str]:
    """This process's environment as a dict, without ``drop`` (for a child process's own env)."""
    return {k: v for k, v in _environ(environ).items() if k not in drop}


def cpu_kernels_choice(environ: Environ | None = None) -> str:
    """TANDEM_CPU_KERNELS: "auto", a kernel variant ("avx512", "avx2") or "torch" (no kernels);
    the flag words map to auto (1/true/on/yes) and torch (0/false/off/no)."""
    raw = _raw("TANDEM_CPU_KERNELS", environ).lower()
    if raw in _TRUE:
        return "auto"
    if raw in _FALSE:
        return "torch"
    if raw not in KERNEL_CHOICES:
        raise ValueError(f"TANDEM_CPU_KERNELS: must be one of {'/'.join(KERNEL_CHOICES)} or a flag word "
                         f"({'/'.join(_TRUE)}, {'/'.join(_FALSE)}), got {raw!r}")
    return raw


def cpu_kernels_enabled(environ: Environ | None = None) -> bool:
    """TANDEM_CPU_KERNELS: may the engine use its C++ kernels (True unless turned off)."""
    return cpu_kernels_choice(environ) != "torch"


def metrics_enabled(environ: Environ | None = None) -> bool:
    """TANDEM_METRICS: does this process serve /metrics."""
    return _flag("TANDEM_METRICS", environ)


def metrics_host(environ: Environ | None = None) -> str:
    """TANDEM_METRICS_HOST: the bind address of /metrics."""
    return _raw("TANDEM_METRICS_HOST", environ)


def metrics_port(environ: Environ | None = None) -> int:
    """TANDEM_METRICS_PORT: the router's /metrics port (0 = any free port)."""
    raw = _raw("TANDEM_METRICS_PORT", environ)
    if not (raw.isascii() and raw.isdigit()) or int(raw) > 65535:
        raise ValueError(f"TANDEM_METRICS_PORT: must be a port number (0..65535), got {raw!r}")
    return int(raw)


def secret(name: str, environ: Environ | None = None) -> str | None:
    """The secret held by the variable ``name`` (e.g. TANDEM_REDIS_PASSWORD; a config field names
    it), exactly as set (not stripped); None when unset or empty."""
    if not name:
        raise ValueError("secret: the variable's name is empty")
    return _environ(environ).get(name) or None


def api_keys(admin: bool = False, environ: Environ | None = None) -> tuple[str, str | None]:
    """(TANDEM_API_KEYS, TANDEM_API_KEYS_FILE), or the TANDEM_ADMIN_* pair: the raw key list
    ("" when unset; a secret) and the key file's path (None when unset). router/auth.py parses them."""
    prefix = "TANDEM_ADMIN_API_KEYS" if admin else "TANDEM_API_KEYS"
    return _environ(environ).get(prefix) or "", _raw(f"{prefix}_FILE", environ)


def client_api_key(environ: Environ | None = None) -> str | None:
    """TANDEM_API_KEY: the key a client sends (stripped; None when unset or empty)."""
    return (_environ(environ).get("TANDEM_API_KEY") or "").strip() or None


# ---- OpenTelemetry's, read by Tandem -----------------------------------------------------------
def otlp_traces_endpoint(environ: Environ | None = None) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT (the spec's order); None
    when neither is set."""
    return _raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", environ) or _raw("OTEL_EXPORTER_OTLP_ENDPOINT", environ)


def otel_sdk_disabled(environ: Environ | None = None) -> bool:
    """OTEL_SDK_DISABLED: true (any case) disables; any other value does not (the spec's rule, which
    the SDK applies to the same variable, so Tandem must not be stricter)."""
    return _raw("OTEL_SDK_DISABLED", environ).lower() == "true"


def traces_exporter(environ: Environ | None = None) -> str:
    """OTEL_TRACES_EXPORTER (``none`` = no span export)."""
    return _raw("OTEL_TRACES_EXPORTER", environ).lower()


def traces_sampler(environ: Environ | None = None) -> str:
    """OTEL_TRACES_SAMPLER, lower-cased, one of TRACE_SAMPLERS."""
    sampler = _raw("OTEL_TRACES_SAMPLER", environ).lower()
    if sampler not in TRACE_SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER: must be one of {TRACE_SAMPLERS}, got {sampler!r}")
    return sampler


def traces_sampler_ratio(environ: Environ | None = None) -> float:
    """OTEL_TRACES_SAMPLER_ARG: the sampled fraction, in [0, 1]."""
    raw = _raw("OTEL_TRACES_SAMPLER_ARG", environ)
    try:
        ratio = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: must be a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= ratio <= 1.0:  # also rejects nan
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: must be in [0, 1], got {ratio}")
    return ratio


def service_name(environ: Environ | None = None) -> str:
    """OTEL_SERVICE_NAME."""
    return _raw("OTEL_SERVICE_NAME", environ)


# ---- other libraries', inspected or defaulted by Tandem -----------------------------------------
def ray_auth_mode(environ: Environ | None = None) -> str:
    """RAY_AUTH_MODE, lower-cased (Ray parses it; Tandem only warns when it is not ``token``)."""
    return _raw("RAY_AUTH_MODE", environ).lower()


def ray_enable_cluster(environ: Environ | None = None) -> str:
    """RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER as set (Ray parses it; "" when unset)."""
    return (_environ(environ).get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") or "").strip()


def serve_grpc_transport(environ: Environ | None = None) -> list[str]:
    """Which of RAY_SERVE_USE_GRPC_BY_DEFAULT / RAY_SERVE_THROUGHPUT_OPTIMIZED are on (1 or true, as
    Serve reads them; other values are Serve's to judge, so not an error here)."""
    names = ("RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    return [n for n in names if _raw(n, environ).lower() in ("1", "true")]


def set_defaults(defaults: Mapping[str, str], environ: MutableMapping[str, str] | None = None) -> None:
    """Put each variable of ``defaults`` (listed in VARIABLES with that default) into ``environ``
    (default: this process's environment, which child processes inherit) unless it is already
    set: an operator's own value wins."""
    for name, value in defaults.items():  # the table stays the truth about what Tandem sets
        if name not in _BY_NAME or _BY_NAME[name].default != value:
            raise ValueError(f"set_defaults: {name}={value!r} is not listed so in services/engine/env.py VARIABLES")
    target = os.environ if environ is None else environ
    for name, value in defaults.items():
        target.setdefault(name, value)


def environ_without(prefix: str, environ: Environ | None = None) -> dict[str, str]:
    """A copy of the environment without the variables starting with ``prefix`` (for a child
    process that must not inherit, e.g., this shell's OTEL_* settings)."""
    return {k: v for k, v in _environ(environ).items() if not k.startswith(prefix)}


def table(environ: Environ | None = None) -> str:
    """VARIABLES as text: name, default, this process's value (secrets masked), meaning."""
    env = _environ(environ)
    rows = []
    for v in VARIABLES:
        value = env.get(v.name)
        shown = "(unset)" if value is None else "***" if v.secret else repr(value)
        rows.append(f"{v.name:36} [{v.kind}] default {v.default or '(none)'}; now {shown}\n    {v.meaning}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
