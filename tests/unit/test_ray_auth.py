"""router.ray_auth: the Ray token file is written whole, once, and Ray's first start then leaves it
alone (Ray's own loader and Ray's own first-start code, on a private HOME; no cluster)."""

from __future__ import annotations

import multiprocessing
import os
import re

import pytest

from router import launcher, ray_auth


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    from ray._raylet import AuthenticationTokenLoader
    AuthenticationTokenLoader.instance().reset_cache()  # forget this HOME's token


def test_writes_a_token_once_and_ray_finds_it(home):
    from ray._raylet import AuthenticationTokenLoader

    path = ray_auth.default_token_path()
    assert path == home / ".ray" / "auth_token"
    assert ray_auth.ensure_auth_token() is True
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    inode = path.stat().st_ino
    assert ray_auth.ensure_auth_token() is False
    assert path.read_text() == token and path.stat().st_ino == inode
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"]  # no temporary file left


@pytest.fixture
def token_mode(monkeypatch):
    """Ray's auth mode switched to token the way ray.init does it for a new local cluster (the
    environment variable alone does not: Ray's config caches the mode), and back afterwards."""
    from ray._private.authentication import authentication_token_setup as setup
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    setup._enable_token_auth()
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    yield setup
    monkeypatch.undo()
    Config.initialize("")


def test_without_it_rays_first_start_writes_the_token_itself(home, token_mode):
    token_mode.ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    assert len(ray_auth.default_token_path().read_text()) == 64  # the write ensure_auth_token forestalls


def test_rays_first_start_does_not_rewrite_it(home, token_mode):
    """What ray.init does for a new local cluster before it starts the GCS; with the token in place
    it must not write (each of its writes truncates the file a starting GCS may be reading)."""
    ray_auth.ensure_auth_token()
    path = ray_auth.default_token_path()
    before = (path.read_text(), path.stat().st_ino, path.stat().st_mtime_ns)
    token_mode.ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    assert (path.read_text(), path.stat().st_ino, path.stat().st_mtime_ns) == before


def test_an_empty_token_file_is_replaced(home):
    path = ray_auth.default_token_path()
    path.parent.mkdir()
    path.write_text("")  # what a writer killed between open("w") and its write leaves
    assert ray_auth.ensure_auth_token() is True
    assert len(path.read_text()) == 64


def test_a_token_from_the_environment_is_left_alone(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    assert ray_auth.ensure_auth_token() is False
    assert not ray_auth.default_token_path().exists()


def test_while_the_token_is_written_a_reader_sees_no_file_not_an_empty_one(home, monkeypatch):
    path = ray_auth.default_token_path()
    seen, real_fsync = [], os.fsync

    def fsync(fd):  # called once the token bytes are written, before they are in place
        seen.append(path.read_text() if path.exists() else "missing")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert ray_auth.ensure_auth_token() is True
    assert seen == ["missing"]  # Ray's open(path, "w") would show "" here, which kills a starting GCS


def _first_start(go, results):
    go.wait()
    results.put(ray_auth.ensure_auth_token())


def test_a_second_first_start_waits_for_the_first_and_keeps_its_token(home):
    import fcntl

    path = ray_auth.default_token_path()
    path.parent.mkdir()
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    other = ctx.Process(target=_first_start, args=(go, results))
    other.start()  # forked before the lock is taken: a child holding the parent's fd keeps the lock
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)  # a first start holding the lock, not yet written
        go.set()
        other.join(1.0)
        assert other.is_alive(), "the second start wrote without waiting for the lock"
        path.write_text("a" * 64)
    finally:
        os.close(directory)
    other.join(30)
    assert other.exitcode == 0 and results.get(timeout=5) is False
    assert path.read_text() == "a" * 64


def test_gcs_exit_reason_quotes_the_gcs_fatal_line(tmp_path):
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "gcs_server.out").write_text(
        "[2026-12-02 20:16:33,312 I 14069 14069] (gcs_server) event.cc:332: Set ray event level\n"
        "[2026-12-02 20:16:33,358 C 14069 14069] (gcs_server) authentication_token_loader.cc:115: "
        "Check failed: has_token || ignore_auth_mode\n")
    message = f"Timed out waiting for file {session}/gcs_server_port_e0ec8a93"
    assert "Check failed: has_token" in launcher.gcs_exit_reason(message)
    assert launcher.gcs_exit_reason("some other failure") is None
    (session / "logs" / "gcs_server.out").write_text("")
    assert "still starting" in launcher.gcs_exit_reason(message)
