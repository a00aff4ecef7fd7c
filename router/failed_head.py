"""Clean up after a Ray head that this process failed to start, so a fresh one can be tried.

Why (seen in CI, Ray 2.60, 2-core machine under load, 2026-12-03): the raylet waits a fixed
~15 s (not configurable in 2.60) for its Python agents (dashboard agent, runtime-env agent) to
publish their ports; with both cores busy an agent took 23 s to import, the raylet aborted
("Timed out waiting for file .../runtime_env_agent_port"), and ``ray.init`` raised "The
current node timed out during startup" 30 s later, leaving the GCS, monitor, dashboard and
log monitor it had started running. Ray keeps no handle to them once ``Node`` raises.

Only processes that are children of this process and name the failed session's directory on
their command line are ended (by PID), then reaped.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from router import processes

RAYLET_STARTUP_TIMEOUT = "timed out during startup"  # Ray's message when no raylet registered
_SESSION = re.compile(r"(/\S*?/session_\d[^/\s]*)")


def children(parent: int) -> dict[int, str]:
    """{pid: command line} of the live child processes of ``parent``."""
    found = {pid: processes.command_line(pid) for pid in processes.children(parent)}
    return {pid: command for pid, command in found.items() if command is not None}


def newest_session(commands: list[str]) -> str | None:
    """The newest Ray session directory named in ``commands`` (session names sort by time)."""
    sessions = {m.group(1) for c in commands for m in _SESSION.finditer(c)}
    return max(sessions) if sessions else None


def raylet_exit_reason(session_dir: str) -> str:
    """The raylet's first fatal log line in ``session_dir``, or a sentence saying there is none."""
    log_file = Path(session_dir) / "logs" / "raylet.out"
    if not log_file.is_file():
        return f"no raylet log at {log_file}"
    for line in log_file.read_text(errors="replace").splitlines():
        if re.match(r"\[[^]]* [CF] \d", line):
            return f"the raylet exited: {line[:600]}"
    return f"no fatal line in {log_file}"


def abandon(parent: int | None = None) -> str:
    """End (SIGKILL, then reap) the children of ``parent`` (default: this process) that belong
    to the newest Ray session among them; return why that session's raylet exited."""
    parent = os.getpid() if parent is None else parent
    procs = children(parent)
    session = newest_session(list(procs.values()))
    if session is None:
        return "no Ray process of this head was left"
    for pid, command in procs.items():
        if session in {m.group(1) for m in _SESSION.finditer(command)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if parent == os.getpid():
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
    return raylet_exit_reason(session)
