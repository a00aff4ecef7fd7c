"""Integration fixtures: a real local Ray cluster + Serve app per test module, a real gRPC channel.

Each module builds one cluster (``serve_app``); with ``pytest -n 2 --dist loadfile`` every
xdist worker runs its own cluster (own temp dir and ports). Every test here gets a timeout
so that nothing can hang CI.
"""

from __future__ import annotations

import os
from pathlib import Path

# Loopback only: keep Ray from resolving 127.0.0.1 to the machine's outward address when a
# driver connects to a multi-node test cluster (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

TEST_TIMEOUT_S = 240  # per test, fixture setup (a cluster start) included


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from services.engine.make_model import make_model

    return str(make_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama")))


