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


def test_cli_generate_streams_a_reply(address, capsys):
    from router.cli import main

    assert main(["generate", "--address", address, "--max-tokens", "5", "The for statement"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The for statement") and "finish_reason=length" in out and "completion_tokens=5" in out


def test_bench_serve_over_grpc(address, tmp_path):
    import json

    from bench.serve import main

    out = tmp_path / "bench.json"
    assert main(["--address", address, "--num-prompts", "16", "--concurrency", "8", "--input-len", "16",
                 "--output-len", "8", "--warmup", "2", "--no-progress", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 16 and summary["errors"] == {}
    assert summary["ttft_ms"]["p50"] > 0 and summary["output_tok_per_s"] > 0
