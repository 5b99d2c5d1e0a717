"""Whether the layer store answers, asked without ever blocking the caller for long.

When MooseFS's master is down, every call on its mount blocks until the master is
back (mfsmount retries), and so would whatever thread made it: a sync holding a
user's lock, a start, a heartbeat. ``StoreProbe`` asks the store (``statvfs``, which
no cache answers) from its own thread and waits at most ``timeout_s``. While one
probe hangs, no second one starts and nobody waits again: the store counts as
unreachable since that probe began.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoreState:
    reachable: bool
    since: float  # when it last changed (or the first probe, if it never did)
    error: str = ""
    free: int = 0  # bytes, from the last answer
    total: int = 0

    def to_json(self) -> dict:
        return {"reachable": self.reachable, "since": self.since, "error": self.error}


class StoreProbe:
    def __init__(self, root: str | Path, timeout_s: float = 3.0) -> None:
        self.root = os.fspath(root)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._inflight: tuple[threading.Thread, float, list] | None = None
        self._state = StoreState(True, time.time())

    @property
    def state(self) -> StoreState:
        """The last result, without asking again."""
        return self._state

    def check(self) -> StoreState:
        """Ask the store now (at most ``timeout_s``) and return what it said."""
        with self._lock:
            if self._inflight is None or not self._inflight[0].is_alive():
                result: list = []
                t = threading.Thread(target=self._statvfs, args=(result,), daemon=True,
                                     name="labvm-store-probe")
                self._inflight = (t, time.time(), result)
                t.start()
            thread, began, result = self._inflight
        # Only what is left of the hanging probe's own timeout: while the store is down,
        # every caller learns it at once.
        thread.join(max(0.0, self.timeout_s - (time.time() - began)))
        if thread.is_alive():
            waited = time.time() - began
            return self._set(False, began, f"no answer in {waited:.0f} s")
        if not result:
            return self._set(False, time.time(), "the probe failed")
        if isinstance(result[0], str):
            return self._set(False, time.time(), result[0])
        st = result[0]
        return self._set(True, time.time(), "", st.f_bavail * st.f_frsize,
                         st.f_blocks * st.f_frsize)

    def _statvfs(self, result: list) -> None:
        try:
            result.append(os.statvfs(self.root))
        except OSError as e:
            result.append(f"{e.strerror or e}")

    def _set(self, reachable: bool, when: float, error: str, free: int = 0,
             total: int = 0) -> StoreState:
        with self._lock:
            old = self._state
            since = old.since if old.reachable == reachable else when
            if not reachable:  # keep the last known size
                free, total = old.free, old.total
            self._state = StoreState(reachable, since, error, free, total)
            return self._state
