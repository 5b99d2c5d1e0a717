"""A node's uppers (the users' writable layers, on its local disk) and who owns them.

Per key, under ``<state_dir>/uppers/<key>/``: ``upper/`` and ``work/`` of the overlay,
``gen`` (the ownership generation
this upper belongs to) and ``synced-clean`` (its last sync after a stop copied
everything). On a node with disk quotas ``uppers/<key>`` is a btrfs subvolume
(node/quota.py). Set-aside uppers go to ``<state_dir>/uppers/.aside/``. The store's
``owner.json`` says which node and generation own the key; an upper is live only when
both agree. That is what fences a node that comes back after its roots were evacuated.

Its own state is on disk; callers hold the key's lock (``NodeOps.key_lock``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..storage.safepath import remove_tree
from ..storage.store import LayerStore
from .overlay import RootPaths
from .quota import Quotas

log = logging.getLogger("labvm.node")
ASIDE = ".aside"  # under uppers/; no key starts with a dot


class Uppers:
    def __init__(self, state_dir: Path, store: LayerStore, node: str) -> None:
        self.state = state_dir
        self.store = store
        self.node = node
        self.quotas = Quotas(state_dir / "uppers")

    def paths(self, key: str) -> RootPaths:
        return RootPaths.for_key(self.state, key)

    def _base(self, key: str) -> Path:
        return self.paths(key).upper.parent

    def generation(self, key: str) -> int | None:
        """The ownership generation this node's upper of ``key`` belongs to."""
        try:
            return int((self._base(key) / "gen").read_text().strip())
        except (OSError, ValueError):
            return None

    def _set_generation(self, key: str, gen: int) -> None:
        base = self._base(key)
        self.quotas.make_base(base)  # a subvolume, where quotas are on
        (base / "gen").write_text(f"{gen}\n")

    def is_live(self, key: str) -> bool:
        """True when this node's upper of ``key`` is the one the store says is live."""
        owner = self.store.owner(key)
        return owner is not None and owner == (self.node, self.generation(key))

    def owner(self, key: str) -> tuple[str, int] | None:
        return self.store.owner(key)

    def own(self, key: str, emit: Callable[[int, str], None]) -> bool:
        """Reuse this node's upper if it is the live one; else take the key over.

        Returns True when this start took the key over from another node (or from an
        older generation of this one), with a fresh upper.
        """
        owner = self.store.owner(key)
        local = self.generation(key)
        if owner is not None and owner[0] == self.node and (
                local == owner[1] or (local is None and not _has_entries(self.paths(key).upper))):
            self._set_generation(key, owner[1])
            return False
        if owner is None and local is None:
            # First start under ownership tracking: this node's upper (if any) is live.
            self._set_generation(key, self.store.take_over(key, self.node))
            return False
        emit(40, f"Taking over {key}'s root from node {owner[0] if owner else '?'}")
        self.set_aside(key)
        self._set_generation(key, self.store.take_over(key, self.node))
        return True

    def set_aside(self, key: str) -> None:
        """Move a stale upper out of the way: dropped if fully synced, else kept aside."""
        base = self._base(key)
        if not base.exists():
            return
        if self.is_clean(key) or not _has_entries(self.paths(key).upper):
            remove_tree(base)  # the upper is the user's tree: never follow its symlinks
            return
        # Inside uppers/: on a node with quotas that is its own file system, and a
        # rename keeps the subvolume (and what it holds) whole.
        aside = self.state / "uppers" / ASIDE / f"{key}-{int(time.time())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(base, aside)
        log.warning("%s: a stale upper with unsynced changes was kept at %s", key, aside)

    # The last sync after a stop copied everything: nothing of this upper is only here.
    def mark_clean(self, key: str, t: float) -> None:
        (self._base(key) / "synced-clean").write_text(f"{t}\n")

    def mark_dirty(self, key: str) -> None:
        (self._base(key) / "synced-clean").unlink(missing_ok=True)

    def is_clean(self, key: str) -> bool:
        return (self._base(key) / "synced-clean").exists()


def _has_entries(path: Path) -> bool:
    try:
        return any(os.scandir(path))
    except FileNotFoundError:
        return False
