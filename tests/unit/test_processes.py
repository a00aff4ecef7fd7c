"""router.processes reads the live process tree from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

from router import processes


def test_descendants_reach_grandchildren_and_command_lines_name_them():
    grandchild = "import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c",
                              f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]);"
                              "print(p.pid, flush=True); p.wait()"], stdout=subprocess.PIPE, text=True)
    try:
        grand = int(child.stdout.readline())
        assert child.pid in processes.children(os.getpid())
        assert grand not in processes.children(os.getpid())
        assert {os.getpid(), child.pid, grand} <= processes.descendants(os.getpid())
        assert processes.descendants(grand) == {grand}
        assert "time.sleep(30)" in processes.command_line(grand)
        assert processes.parent_pids()[grand] == child.pid
    finally:
        for pid in (grand, child.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        child.wait()
    assert processes.command_line(child.pid) is None  # reaped: gone from /proc
