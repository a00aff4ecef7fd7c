"""services/engine/env.py: the one reader of the environment, its table and its accessors."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine import env

ROOT = Path(__file__).resolve().parents[2]
ENV_MODULE = ROOT / "services" / "engine" / "env.py"
_ENV_FUNCS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_uses(source: str) -> list[str]:
    """Where ``source`` reads or writes the process environment directly: ``os.environ``,
    ``os.getenv`` & co. (any module alias), or ``from os import environ``; as "line: text"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in _ENV_FUNCS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name in _ENV_FUNCS]
    return found


def source_files() -> list[Path]:
    return sorted(p for d in ("router", "services", "bench") for p in (ROOT / d).rglob("*.py"))


def test_the_audit_finds_each_way_of_reading_the_environment():
    bad = ("import os\nos.environ.get('A')\n", "import os as o\nx = o.getenv('A')\n",
           "from os import environ\n", "from os import getenv as g\n", "import os\nos.environ['A'] = '1'\n",
           "import os\nos.putenv('A', '1')\n")
    for source in bad:
        assert environment_uses(source), source
    assert environment_uses("from services.engine import env\nenv.metrics_port()\nx = {'environ': 1}\n") == []


def test_nothing_but_env_py_touches_the_environment():
    files = source_files()
    assert ENV_MODULE in files and len(files) > 50  # the walk really covers the tree
    offenders = {str(p.relative_to(ROOT)): uses for p in files if p != ENV_MODULE
                 for uses in [environment_uses(p.read_text())] if uses}
    assert offenders == {}, "read the environment through services/engine/env.py"
    assert environment_uses(ENV_MODULE.read_text())  # ... which does read it


def test_every_variable_the_code_names_is_listed():
    """A TANDEM_/OTEL_/RAY_/OMP_ name in a string of router/, services/ or bench/ is in VARIABLES."""
    listed = {v.name for v in env.VARIABLES}
    pattern = re.compile(r"^(TANDEM|OTEL|RAY|OMP)_[A-Z0-9_]+$")
    named = {node.value for p in source_files() for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.match(node.value)}
    assert "TANDEM_CPU_KERNELS" in named and "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" in named
    assert named - listed == set()


def test_table_lists_each_variable_once_with_a_meaning():
    names = [v.name for v in env.VARIABLES]
    assert len(names) == len(set(names))
    assert all(v.meaning and v.kind in ("tandem", "otel", "ray", "openmp") for v in env.VARIABLES)
    text = env.table({"TANDEM_REDIS_PASSWORD": "hunter2", "TANDEM_METRICS_PORT": "9000"})
    assert "hunter2" not in text and "***" in text and "'9000'" in text
    assert all(name in text for name in names)


def test_importing_env_loads_nothing_heavy():
    code = ("import sys, services.engine.env; "
            "print(sorted(m for m in ('torch', 'ray', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- accessors -------------------------------------------------------------------------------
def test_defaults_when_unset_or_empty():
    for environ in ({}, {name: "" for name in (v.name for v in env.VARIABLES)}):
        assert env.cpu_kernels_enabled(environ) is True
        assert (env.metrics_enabled(environ), env.metrics_host(environ), env.metrics_port(environ)) == (
            True, "127.0.0.1", 9464)
        assert env.secret("TANDEM_REDIS_PASSWORD", environ) is None
        assert env.otlp_traces_endpoint(environ) is None
        assert (env.otel_sdk_disabled(environ), env.traces_exporter(environ)) == (False, "otlp")
        assert (env.traces_sampler(environ), env.traces_sampler_ratio(environ)) == ("parentbased_traceidratio", 1.0)
        assert env.service_name(environ) == "tandem"
        assert env.ray_auth_mode(environ) == "token"
        assert env.serve_grpc_transport(environ) == []


def test_parsing():
    assert env.cpu_kernels_enabled({"TANDEM_CPU_KERNELS": "0"}) is False
    assert env.cpu_kernels_enabled({"TANDEM_CPU_KERNELS": " Off "}) is False
    assert env.cpu_kernels_enabled({"TANDEM_CPU_KERNELS": "yes"}) is True
    assert env.metrics_enabled({"TANDEM_METRICS": "false"}) is False
    assert env.metrics_host({"TANDEM_METRICS_HOST": " 0.0.0.0 "}) == "0.0.0.0"
    assert env.metrics_port({"TANDEM_METRICS_PORT": "0"}) == 0
    assert env.metrics_port({"TANDEM_METRICS_PORT": "65535"}) == 65535
    assert env.secret("MY_PW", {"MY_PW": " p w "}) == " p w "  # exactly as set
    assert env.otlp_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317"}) == "http://a:4317"
    assert env.otlp_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317"}) == "http://b:4317"
    assert env.otel_sdk_disabled({"OTEL_SDK_DISABLED": "TRUE"}) is True
    assert env.otel_sdk_disabled({"OTEL_SDK_DISABLED": "1"}) is False  # the spec: only "true"
    assert env.traces_sampler({"OTEL_TRACES_SAMPLER": "Always_On"}) == "always_on"
    assert env.traces_sampler_ratio({"OTEL_TRACES_SAMPLER_ARG": "0.25"}) == 0.25
    assert env.ray_auth_mode({"RAY_AUTH_MODE": "DISABLED"}) == "disabled"
    transport = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "True", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}
    assert env.serve_grpc_transport(transport) == ["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


@pytest.mark.parametrize("name, value, read", [
    ("TANDEM_CPU_KERNELS", "maybe", env.cpu_kernels_enabled),
    ("TANDEM_METRICS", "2", env.metrics_enabled),
    ("TANDEM_METRICS_PORT", "http", env.metrics_port),
    ("TANDEM_METRICS_PORT", "65536", env.metrics_port),
    ("TANDEM_METRICS_PORT", "-1", env.metrics_port),
    ("TANDEM_METRICS_PORT", "٣", env.metrics_port),  # a digit, but not an ASCII one
    ("OTEL_TRACES_SAMPLER", "sometimes", env.traces_sampler),
    ("OTEL_TRACES_SAMPLER_ARG", "half", env.traces_sampler_ratio),
    ("OTEL_TRACES_SAMPLER_ARG", "1.5", env.traces_sampler_ratio),
    ("OTEL_TRACES_SAMPLER_ARG", "nan", env.traces_sampler_ratio),
])
def test_bad_values_name_the_variable(name, value, read):
    with pytest.raises(ValueError) as info:
        read({name: value})
    assert str(info.value).startswith(f"{name}: ") and value.lower() in str(info.value).lower()


def test_reads_the_process_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("TANDEM_METRICS_PORT", "9100")
    assert env.metrics_port() == 9100
    monkeypatch.setenv("TANDEM_METRICS_PORT", "9101")
    assert env.metrics_port() == 9101
    monkeypatch.delenv("TANDEM_METRICS_PORT")
    assert env.metrics_port() == 9464


def test_set_defaults_keeps_an_operators_value_and_only_sets_listed_defaults():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    env.set_defaults({"OMP_WAIT_POLICY": "PASSIVE", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}, environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
    with pytest.raises(ValueError, match="NOT_LISTED"):
        env.set_defaults({"NOT_LISTED": "1"}, {})
    with pytest.raises(ValueError, match="OMP_WAIT_POLICY"):  # a default the table does not state
        env.set_defaults({"OMP_WAIT_POLICY": "ACTIVE"}, {})


def test_launcher_ray_defaults_are_the_listed_ones():
    from router.launcher import RAY_ENV_DEFAULTS

    listed = {v.name: v.default for v in env.VARIABLES}
    assert RAY_ENV_DEFAULTS and all(listed.get(k) == v for k, v in RAY_ENV_DEFAULTS.items())


def test_environ_without_drops_a_prefix():
    environ = {"OTEL_A": "1", "PATH": "/bin", "XOTEL_": "2"}
    assert env.environ_without("OTEL_", environ) == {"PATH": "/bin", "XOTEL_": "2"}
