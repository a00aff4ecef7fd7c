"""deploy/local.yaml (unified mode: one worker does prefill and decode) over a real gRPC channel."""

import pytest

from tests.integration.contract import ClusterContract
from tests.integration.helpers import TINY_ENGINE, serve_app


@pytest.fixture(scope="module")
def address(tiny_model):
    with serve_app("local.yaml", tiny_model, {"engine": TINY_ENGINE}) as addr:
        yield addr


class TestLocal(ClusterContract):
    pass
