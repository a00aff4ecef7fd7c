"""`tandem serve` (what `make run` runs) end to end: starts, serves, stops cleanly on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

from tests.integration.helpers import DEPLOY, free_port


def test_tandem_serve_then_generate_then_ctrl_c(tiny_model, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(DEPLOY / "local.yaml"),
                                 "--model", tiny_model, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        end = time.monotonic() + 180
        while "serving" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, "tandem serve did not come up"
            time.sleep(0.5)
        text = log.read_text()
        assert f"127.0.0.1:{port}" in text and "generate --address" in text
        gen = subprocess.run([sys.executable, "-m", "router.cli", "generate", "--address", f"127.0.0.1:{port}",
                              "--max-tokens", "4", "The for statement"], capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr
        assert "finish_reason=length" in gen.stdout and "completion_tokens=4" in gen.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
