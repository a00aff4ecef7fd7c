"""The process tree as /proc shows it now (Linux): parents, descendants, command lines.

Used to end only processes this process started (by PID): a Ray head that failed to start
(router.failed_head), a benchmark's Ray processes, a test's server and what it spawned.
"""

from __future__ import annotations

import os
from pathlib import Path


def parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every live process (entries that vanish while read are left out)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
    return out


def children(parent: int) -> list[int]:
    """The live direct children of ``parent``."""
    return [pid for pid, ppid in parent_pids().items() if ppid == parent]


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (children, their children, ...)."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in parent_pids().items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(kids.get(pid, ()))
    return found


def command_line(pid: int) -> str | None:
    """``pid``'s argv joined by spaces; None when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
