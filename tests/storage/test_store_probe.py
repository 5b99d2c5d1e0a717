"""The store probe answers in bounded time while MooseFS's master is down (a real outage)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from labvm_spawner.storage.health import StoreProbe

MOOSEFS_SH = Path(__file__).resolve().parents[2] / "scripts" / "moosefs.sh"


def _moosefs(cmd: str) -> None:
    r = subprocess.run([str(MOOSEFS_SH), cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _probes() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "labvm-store-probe")


def test_probe_says_unreachable_in_time_and_recovers(mfs_dir: Path) -> None:
    probe = StoreProbe(mfs_dir, timeout_s=1.0)
    first = probe.check()
    assert first.reachable and first.total > 0
    _moosefs("master-stop")
    try:
        down_at = time.time()
        t0 = time.monotonic()
        state = probe.check()
        assert time.monotonic() - t0 < 3
        assert not state.reachable and "no answer" in state.error
        assert state.since >= down_at - 1
        # Asking again while the first probe still hangs starts no second one, and
        # answers at once.
        for _ in range(3):
            t0 = time.monotonic()
            again = probe.check()
            assert time.monotonic() - t0 < 0.5
            assert not again.reachable and again.since == state.since
        assert _probes() == 1
        assert (again.free, again.total) == (first.free, first.total)  # the last known size
    finally:
        _moosefs("master-start")
    deadline = time.monotonic() + 120
    while not probe.check().reachable:
        assert time.monotonic() < deadline, "the store never answered again"
        time.sleep(0.5)
    assert probe.state.since > state.since
    assert _probes() == 0  # the hung probe returned once the master was back
