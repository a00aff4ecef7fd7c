"""Ray's authentication token for a new local cluster, in place before ``ray.init`` starts one.

Why this exists (measured on the 2-core box, Ray 2.60): Ray turns token authentication on for a
new local cluster, and when no token exists yet ``ray.init`` writes ``~/.ray/auth_token``
itself: check-then-write with ``open(path, "w")`` and no lock. On a fresh machine two first
starts at once (two pytest-xdist workers start their first clusters within 3-7 ms of each
other; ``tandem serve`` beside a test) can both write it, and each write truncates the file
first. A GCS that reads the file while it is empty fails ``Check failed: has_token``
(authentication_token_loader.cc) and exits before it publishes its port; the driver then waits
the full 30 s for that port file and raises "Timed out waiting for file
.../gcs_server_port_...". Reproduced by emptying the token between ``ray.init``'s write and
its GCS start: that exact error after 30.1 s, with that CHECK in gcs_server.out. Once a token
exists Ray never writes it again, which is why the rerun on a warm machine passed.

``ensure_auth_token`` writes the token whole under a temporary name and renames it into place,
under a lock on ``~/.ray``, only when there is none: a reader sees no file or the full token,
never an empty one, and a token, once there, is never replaced (running clusters keep theirs).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path


def default_token_path() -> Path:
    """Where Ray looks when neither ``RAY_AUTH_TOKEN`` nor ``RAY_AUTH_TOKEN_PATH`` is set."""
    return Path.home() / ".ray" / "auth_token"


def ensure_auth_token() -> bool:
    """Make sure Ray finds a token; returns True when this call wrote one to the default path.

    Ray's own lookup decides whether one exists (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    then ``~/.ray/auth_token``; an empty file counts as none), so a token given by the operator
    is left alone, and a ``RAY_AUTH_TOKEN_PATH`` naming no file raises Ray's own error here.
    """
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # this process may have looked before another one wrote the file
    if loader.has_token(ignore_auth_mode=True):
        return False
    path = default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)  # one writer at a time among tandem processes
        wrote = not _has_content(path)
        if wrote:
            _write_atomically(path, secrets.token_hex(32))  # Ray's format: 256 bits as hex
    finally:
        os.close(directory)  # releases the lock
    loader.reset_cache()
    return wrote


def _has_content(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


def _write_atomically(path: Path, token: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # atomic: readers see the old state or the whole token
