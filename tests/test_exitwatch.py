"""The start's watch on a container's init process (``node/exitwatch.py``)."""

from __future__ import annotations

import subprocess
import sys
import time

from labvm_spawner.node.exitwatch import exit_watch


def test_a_process_is_seen_running_then_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = exit_watch(proc.pid)
    try:
        assert watch is not None
        assert not watch.exited()
        proc.kill()
        deadline = time.monotonic() + 10
        while not watch.exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Exited but not reaped yet: a zombie counts as exited.
        assert watch.exited()
        assert proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()
        if watch is not None:
            watch.close()


def test_no_watch_without_a_live_pid() -> None:
    """No PID (dockerd gave 0) or one that is gone: the caller asks dockerd instead."""
    assert exit_watch(0) is None
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert exit_watch(proc.pid) is None
