"""Configuration of the Redis prefix store (app args ``prefix_store: {...}``), validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.engine import env

SCHEMES = ("redis", "rediss")


@dataclass(frozen=True)
class PrefixStoreConfig:
    """Where the Redis tier is and how hard to try.

    The password never appears in the URL or in code: it is read at connect time from the
    environment variable ``password_env`` or from ``password_file`` (e.g. a mounted secret).
    """

    url: str  # redis://[user@]host:port[/db] or rediss://... (TLS); a user name selects an ACL user
    ttl_s: int = 3600  # expiry of every written block (seconds)
    timeout_s: float = 0.5  # limit of one lookup call (EXISTS pipeline, then GET pipeline)
    write_timeout_s: float = 2.0  # limit of one write-back pipeline
    connect_timeout_s: float = 0.5  # TCP/TLS connect limit
    password_env: str = "TANDEM_REDIS_PASSWORD"  # env var holding the password (unset = no AUTH)
    password_file: str | None = None  # file holding the password (wins over password_env)
    tls_ca_file: str | None = None  # CA bundle for rediss:// (None = the system's)
    breaker_failures: int = 3  # consecutive failed calls that open the circuit breaker
    breaker_retry_s: float = 5.0  # open breaker: seconds until one trial call
    write_queue_size: int = 32  # pending write-backs (requests); more are dropped, never waited for

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"prefix_store.url: scheme must be one of {SCHEMES}, got {self.url!r}")
        if not parts.hostname:
            raise ValueError(f"prefix_store.url: no host in {self.url!r}")
        if parts.password:
            raise ValueError("prefix_store.url: must not contain a password; set the environment variable "
                             f"{self.password_env} or prefix_store.password_file")
        for name in ("ttl_s", "timeout_s", "write_timeout_s", "connect_timeout_s", "breaker_retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"prefix_store.{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("breaker_failures", "write_queue_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"prefix_store.{name}: must be an integer >= 1, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "prefix_store") -> "PrefixStoreConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        if not values.get("url"):
            raise ValueError(f"{where}.url: required (redis://host:port or rediss://host:port)")
        return cls(**values)

    def password(self) -> str | None:
        """The AUTH password from ``password_file`` or ``password_env`` (None = no password)."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"prefix_store.password_file: cannot read {self.password_file!r}: {exc}") from exc
        return env.secret(self.password_env)

    def client(self, sync: bool = False):
        """A ``redis.asyncio.Redis`` (``sync``: a ``redis.Redis``) for this config; connects lazily,
        no retries (the breaker decides)."""
        import redis
        import redis.asyncio as aredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.retry import Retry as SyncRetry

        options = dict(password=self.password(), socket_timeout=max(self.timeout_s, self.write_timeout_s),
                       socket_connect_timeout=self.connect_timeout_s,
                       retry=SyncRetry(NoBackoff(), 0) if sync else Retry(NoBackoff(), 0))
        if self.url.startswith("rediss://") and self.tls_ca_file:
            options["ssl_ca_certs"] = self.tls_ca_file
        return (redis.Redis if sync else aredis.Redis).from_url(self.url, **options)
