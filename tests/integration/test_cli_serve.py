"""`tandem serve` (what `make run` runs) end to end: starts, serves, stops cleanly on Ctrl-C."""

import signal
import subprocess
import sys

from tests.integration.helpers import free_port, tandem_serve


def test_tandem_serve_then_generate_then_ctrl_c(tiny_model, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with tandem_serve(tiny_model, port, log) as proc:
        text = log.read_text()
        assert f"127.0.0.1:{port}" in text and "generate --address" in text
        gen = subprocess.run([sys.executable, "-m", "router.cli", "generate", "--address", f"127.0.0.1:{port}",
                              "--max-tokens", "4", "The for statement"], capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr
        assert "finish_reason=length" in gen.stdout and "completion_tokens=4" in gen.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in log.read_text()


def test_tandem_serve_rejects_a_bad_engine_value_before_anything_starts(tiny_model, tmp_path):
    import time

    import yaml

    from router.launcher import load_config

    config = load_config("deploy/local.yaml", model=tiny_model, port=free_port(),
                         overrides={"engine": {"block_size": 3}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config", str(bad), "--model", tiny_model,
                          "--no-redis"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 60
    assert run.returncode == 2
    assert "applications[0].args.engine.block_size: must be a power of two >= 1, got 3" in run.stderr
    assert "starting Ray" not in run.stdout  # nothing was started: no Ray head, no replica
