"""A Ray head whose raylet gives up on slow agents is replaced by a fresh one (router.failed_head).

The runtime-env agent of the first head is made to start slowly (a sitecustomize on the Ray
processes' PYTHONPATH sleeps 25 s in that agent, once), as a loaded 2-core CI machine made it:
Ray 2.60's raylet waits ~15 s for the agent's port and aborts, and ``ray.init`` raises "timed
out during startup". ``start_local_ray`` must then end the failed head's processes and come up
on a second head.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from router import failed_head, launcher
from tests.integration.helpers import environment

SLOW_AGENT = '''
import os, sys, time
if "runtime_env" in sys.argv[0] and "agent" in sys.argv[0]:
    try:
        os.remove({marker!r})  # only the first agent to get here sleeps
    except FileNotFoundError:
        pass
    else:
        time.sleep(25)
'''


def test_a_head_whose_raylet_timed_out_is_replaced(tmp_path, caplog):
    marker = tmp_path / "slow-once"
    marker.write_text("")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_AGENT.format(marker=str(marker)))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    caplog.set_level(logging.WARNING, logger="tandem.launcher")
    with environment(PYTHONPATH=path):
        launcher.start_local_ray(num_cpus=2)
    try:
        import ray

        assert not marker.exists(), "the slow agent never ran: the test did not exercise a failed start"
        warning = next(r.getMessage() for r in caplog.records if "did not come up" in r.getMessage())
        assert "runtime_env_agent_port" in warning, warning
        failed = re.search(r"Timed out waiting for file (\S+?/session_[^/\s]+)/", warning).group(1)
        live = ray._private.worker.global_worker.node.get_session_dir_path()
        assert live != failed
        left = [c for c in failed_head.children(os.getpid()).values() if failed in c]
        assert not left, f"processes of the failed head still run: {left}"
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
    finally:
        launcher.shutdown()


def test_newest_session_and_reason_read_from_paths(tmp_path):
    old = tmp_path / "session_2026-12-03_11-00-00_000001_1"
    new = tmp_path / "session_2026-12-03_12-00-00_000001_2"
    (new / "logs").mkdir(parents=True)
    (new / "logs" / "raylet.out").write_text(
        "[2026-12-03 12:00:01,000 I 2 2] (raylet) main.cc:1: fine\n"
        "[2026-12-03 12:00:16,000 C 2 2] (raylet) node_manager.cc:3636: Check failed: Timed out\n")
    commands = [f"gcs_server --log_dir={old}/logs", f"raylet --session_dir={new} --x", "python -c 1"]
    assert failed_head.newest_session(commands) == str(new)
    assert failed_head.newest_session(["python -c 1"]) is None
    assert "Check failed: Timed out" in failed_head.raylet_exit_reason(str(new))
    assert "no raylet log" in failed_head.raylet_exit_reason(str(old))
