"""Keep the gRPC server Ray Serve starts inside every replica off the wildcard address.

Measured (Ray 2.60.0, 2026-12-03, listener audit of ``tandem serve``): after a replica's
constructor returns, Serve starts an "inter-deployment gRPC server" in it
(``ray.serve._private.replica``: ``add_port_to_grpc_server(self._server, "[::]:0")``), used
when RAY_SERVE_USE_GRPC_BY_DEFAULT is on and started even when it is off. The address is
hard-coded: no option or variable of Ray 2.60 changes it, so every replica listened on all
interfaces even with the whole head on 127.0.0.1. Serve's callers reach that server at the
replica's node IP (``RunningReplicaInfo.node_ip`` + port), never at another address, so
binding the node IP instead serves them all.

``bind_replica_grpc_to_node_ip()``, called in each deployment's constructor (before Serve
starts the server), swaps the wildcard host for this node's IP (127.0.0.1 under ``tandem
serve``). It wraps Ray's private function; if a Ray release renames it, nothing is changed and
a warning says so (the listener audit, tests/integration/test_listener_audit.py, then fails).
"""

from __future__ import annotations

import logging

log = logging.getLogger("tandem.replica_bind")
WILDCARDS = ("[::]", "0.0.0.0", "::", "")


def node_address(address: str, node_ip: str) -> str:
    """``address`` ("host:port") with a wildcard host replaced by ``node_ip`` (IPv6 in brackets)."""
    host, _, port = address.rpartition(":")
    if host not in WILDCARDS:
        return address
    return f"[{node_ip}]:{port}" if ":" in node_ip else f"{node_ip}:{port}"


def bind_replica_grpc_to_node_ip() -> bool:
    """Make this replica's Serve gRPC server bind its node IP; False when Ray has no such hook."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        log.warning("ray.serve._private.replica.add_port_to_grpc_server not found (Ray %s): the replica's "
                    "gRPC server keeps Serve's own bind address", ray.__version__)
        return False
    if getattr(original, "tandem_node_ip", None) is not None:
        return True  # this process already did it
    node_ip = ray.util.get_node_ip_address()

    def add_port(server, address):
        return original(server, node_address(address, node_ip))

    add_port.tandem_node_ip = node_ip
    replica.add_port_to_grpc_server = add_port
    return True
