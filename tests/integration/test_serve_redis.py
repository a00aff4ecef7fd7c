"""`tandem serve` with no --redis-url starts its own redis-server (127.0.0.1, maxmemory, LRU),
the workers write prompt blocks to it, and Ctrl-C stops it (by its PID) with the cluster."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.integration.helpers import free_port, tandem_serve


def test_tandem_serve_runs_a_local_redis_and_stops_it(tiny_model, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    pid = None
    try:
        with tandem_serve(tiny_model, port, log, "--redis-maxmemory", "64mb") as proc:
            m = re.search(r"prefix cache: local tier \+ Redis at (redis://127\.0\.0\.1:(\d+)/0) "
                          r"\(redis-server pid (\d+), maxmemory 64mb, allkeys-lru", log.read_text())
            assert m, log.read_text()[-3000:]
            url, redis_port, pid = m.group(1), m.group(2), int(m.group(3))
            title = Path(f"/proc/{pid}/cmdline").read_bytes()  # redis-server sets its title: "redis-server HOST:PORT"
            assert b"redis-server" in title and f"127.0.0.1:{redis_port}".encode() in title
            client = redis.Redis.from_url(url)
            config = client.config_get("*")
            assert config["maxmemory-policy"] == "allkeys-lru" and int(config["maxmemory"]) == 64 << 20
            assert config["bind"].split() == ["127.0.0.1"] and config["save"] == "" and config["appendonly"] == "no"
            prompt = "The for statement in Python iterates over the items of any sequence " * 6
            gen = subprocess.run([sys.executable, "-m", "router.cli", "generate", "--address", f"127.0.0.1:{port}",
                                  "--max-tokens", "4", prompt], capture_output=True, text=True, timeout=60)
            assert gen.returncode == 0, gen.stderr
            end = time.monotonic() + 10
            while not client.keys("tandem:*:kv:*"):
                assert time.monotonic() < end, "no block written back to the local redis-server"
                time.sleep(0.1)
            assert all(0 < client.ttl(k) <= 3600 for k in client.keys("tandem:*")[:5])
            client.close()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            assert not Path(f"/proc/{pid}").exists(), "redis-server still running after tandem serve stopped"
    finally:
        if pid is not None and Path(f"/proc/{pid}").exists():  # its redis-server (own session) by PID
            os.kill(pid, signal.SIGTERM)
