"""Which TCP sockets a set of processes listens on: /proc/net/tcp{,6} joined with /proc/PID/fd.

``listeners(pids)`` -> [Listener(pid, name, address, port)], for the listener audit
(tests/integration/test_listener_audit.py). Linux only; reads nothing but /proc of processes
of this user, so it needs no ``ss`` and no privileges.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"  # st column of /proc/net/tcp: TCP_LISTEN


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket of one process."""

    pid: int  # the process holding it
    name: str  # /proc/PID/comm (e.g. "gcs_server", "raylet", "ray::ServeReplica:tandem:Router")
    address: str  # the bound address ("127.0.0.1", "0.0.0.0", "::", ...)
    port: int  # the bound port

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def _parse_address(hex_addr: str) -> tuple[str, int]:
    """``0100007F:1F90`` (IPv4) or 32 hex digits (IPv6, four little-endian words) -> (address, port)."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1])), int(port, 16)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = ipaddress.IPv6Address(words)
    return str(ip.ipv4_mapped or ip), int(port, 16)


def listening_inodes(proc: Path = Path("/proc")) -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("tcp", "tcp6"):
        path = proc / "net" / table
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == TCP_LISTEN:
                found[int(cols[9])] = _parse_address(cols[1])
    return found


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among PID's open file descriptors (empty when it has exited)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _name(pid: int) -> str:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    # an executable's file name ("gcs_server"), not its path (a deep checkout cut it off), or a
    # process title ("ray::ServeReplica:tandem:Router", "redis-server 127.0.0.1:6379")
    head = argv0.split(" ")[0]
    return (Path(head).name + argv0[len(head):] if "/" in head else argv0)[:80]


def listeners(pids: set[int]) -> list[Listener]:
    """Every listening TCP socket held by one of ``pids`` (a socket shared by several: each)."""
    table = listening_inodes()
    out = []
    for pid in sorted(pids):
        for inode in socket_inodes(pid):
            if inode in table:
                address, port = table[inode]
                out.append(Listener(pid, _name(pid), address, port))
    return sorted(out, key=lambda item: (item.port, item.pid))
