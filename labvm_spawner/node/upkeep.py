"""Store upkeep off the critical path: one thread per named task at a time.

Failures are only logged: the store's own state says what is left to do, and the
next start of the server retries it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("labvm.node")


class Upkeep:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def run(self, name: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` in a thread, unless a task of this ``name`` still runs."""
        with self._lock:
            if name in self._running:
                return
            self._running.add(name)

        def task() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s failed; the next start of the server retries it", name)
            finally:
                with self._lock:
                    self._running.discard(name)

        threading.Thread(target=task, name=name, daemon=True).start()
