"""Servers a node restart cut short: what the node found when it came back.

A server's lease file (``<state_dir>/leases/<key>.json``) lives from its start to its stop.
One left behind with no running container, when the node (agent, or hub with its own
node) starts, means the server was running when the node went down: a reboot, a crash of
the engine or of the node's process. The node remembers those here until the server is
started or stopped again, so the hub can tell them from servers their users stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class Interrupted:
    """key -> when the node found its server gone; kept in ``<state_dir>/interrupted.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "interrupted.json"
        self._lock = threading.Lock()
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            loaded = {}
        self._seen = {k: float(t) for k, t in loaded.items()
                      if isinstance(k, str) and isinstance(t, (int, float))}

    def add(self, key: str) -> None:
        with self._lock:
            self._seen.setdefault(key, time.time())
            self._save()

    def get(self, key: str) -> float | None:
        with self._lock:
            return self._seen.get(key)

    def clear(self, key: str) -> None:
        with self._lock:
            if self._seen.pop(key, None) is not None:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(".interrupted.json.tmp")
        tmp.write_text(json.dumps(self._seen))
        os.replace(tmp, self.path)
