"""Background sync of a node's live uppers into the layer store.

Each running server has an ``UpperSync`` (with its inotify journal) registered here.
A sync runs only while the store says this node's upper is the live one
(``Uppers.is_live``); it is recorded with ``LayerStore.record_sync``, and a sync
after a stop marks the upper clean. The registry of syncers has its own lock;
callers hold the key's lock (``NodeOps.key_lock``) around ``sync``.
"""

from __future__ import annotations

import logging
import threading
import time

from ..storage.store import LayerStore
from ..storage.sync import UpperSync
from .uppers import Uppers

log = logging.getLogger("labvm.node")


class Syncing:
    def __init__(self, store: LayerStore, uppers: Uppers) -> None:
        self.store = store
        self.uppers = uppers
        self._lock = threading.Lock()
        self._syncers: dict[str, UpperSync] = {}

    def start(self, key: str) -> None:
        """Journal ``key``'s upper from now on (it has just started)."""
        upper, mirror = self.uppers.paths(key).upper, self.store.sync_path(key)
        with self._lock:
            if key in self._syncers:
                return
            progress = self._progress(key)
            try:
                self._syncers[key] = UpperSync(upper, mirror, progress=progress)
            except OSError:
                log.exception("%s: cannot watch the upper; it syncs by full scans", key)
                self._syncers[key] = UpperSync(upper, mirror, journal=False, progress=progress)

    def _progress(self, key: str):  # noqa: ANN202
        """Where a long pass says how far it is: the store, for the admin pages."""
        return lambda p: self.store.record_progress(key, p)

    def sync(self, key: str, final: bool) -> bool:
        """Sync ``key``'s upper now; ``final`` after its container stopped. False when
        there is no live upper of it here (another node took it over)."""
        paths = self.uppers.paths(key)
        if not paths.upper.is_dir():
            return False
        if not self.uppers.is_live(key):
            self.drop(key)  # no longer the live upper: never sync it again
            return False
        with self._lock:
            syncer = self._syncers.get(key)
        registered = syncer is not None
        if syncer is None:
            syncer = UpperSync(paths.upper, self.store.sync_path(key), journal=not final,
                               progress=self._progress(key))
            if not final:
                with self._lock:
                    self._syncers[key] = syncer
        t = time.time()
        try:
            stats = syncer.sync()
        finally:
            self.store.clear_progress(key)
        syncer.save_index()
        self.store.record_sync(key, t, self.uppers.node, self.uppers.generation(key),
                               stats.changed, stats.errors, stats.quota_errors)
        if final:
            if registered:
                self.drop(key)
            else:
                syncer.close()
            self.uppers.mark_clean(key, t)
        return True

    def last_synced(self, key: str) -> float | None:
        record = self.store.last_sync(key)
        return record["t"] if record else None

    def drop(self, key: str) -> None:
        with self._lock:
            syncer = self._syncers.pop(key, None)
        if syncer is not None:
            syncer.close()

    def close(self) -> None:
        with self._lock:
            syncers = list(self._syncers.values())
            self._syncers.clear()
        for s in syncers:
            s.close()
