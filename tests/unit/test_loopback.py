"""A loopback Ray head stays loopback (router/launcher.py) and Serve's in-replica gRPC server
binds the node IP (services/replica_bind.py): the pure parts; the listener audit
(tests/integration/test_security.py) checks the real sockets."""

import pytest

from router import launcher
from services.replica_bind import node_address


def test_a_wildcard_host_becomes_the_node_ip_and_others_are_kept():
    assert node_address("[::]:0", "127.0.0.1") == "127.0.0.1:0"
    assert node_address("0.0.0.0:5000", "10.1.2.3") == "10.1.2.3:5000"
    assert node_address("[::]:0", "::1") == "[::1]:0"
    assert node_address("192.0.2.7:0", "127.0.0.1") == "192.0.2.7:0"  # an explicit address is left alone


def test_loopback_environment_sets_rays_flag_only_for_a_loopback_node(monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    launcher.loopback_environment("10.0.0.5")
    assert launcher.env.ray_enable_cluster() == ""
    launcher.loopback_environment("127.0.0.1")
    assert launcher.env.ray_enable_cluster() == "0"
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # an operator's value wins
    launcher.loopback_environment("127.0.0.1")
    assert launcher.env.ray_enable_cluster() == "1"
    with pytest.raises(ValueError, match="node_ip: must be an IP address .* got 'localhost:1'"):
        launcher.loopback_environment("localhost:1")


def test_a_ray_imported_too_early_is_told_to_keep_loopback(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as Ray's import read it on Linux
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    launcher._keep_loopback_in_this_process("127.0.0.1")
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # the operator asked for it
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    launcher._keep_loopback_in_this_process("10.0.0.5")
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # not a loopback head
    launcher._keep_loopback_in_this_process("127.0.0.1")
    assert ray_constants.ENABLE_RAY_CLUSTER is False
