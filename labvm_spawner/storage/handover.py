"""Handing a key's live upper from one node to another, on top of the versioned store.

One node at a time owns a key's live upper and syncs it to ``upper-sync/``. A node
that takes a key over (a migration, or an evacuation from a dead node) freezes the
last synced copy into ``pending/``, mounts it above the current version, and merges
it into a new version later, off the critical path. Applying an upper twice gives
what applying it once gives, so a crash between a merge and its marker costs a
repeated merge, never data.

``HandOver`` is a part of ``LayerStore``: it uses the store's layout, lock and
commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from . import safepath
from .crash import crashpoint
from .fsops import fsync_dir


class HandOver:
    """Ownership (``owner.json``), take-over and the pending layers of each key."""

    def owner(self, key: str) -> tuple[str, int] | None:
        """(node, generation) of the key's live upper, or None if no node ever took it."""
        try:
            with open(self.key_dir(key) / "owner.json", encoding="utf-8") as f:
                data = json.load(f)
            return str(data["node"]), int(data["gen"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def take_over(self, key: str, node: str) -> int:
        """Make ``node`` the owner under a new generation; freeze what was synced so far."""
        with self.locked(key):
            kdir = self.key_dir(key)
            old = self.owner(key)
            gen = (old[1] if old else 0) + 1
            sync_dir = self.sync_path(key)
            if sync_dir.is_dir():
                if any(sync_dir.iterdir()):
                    pdir = kdir / "pending"
                    pdir.mkdir(exist_ok=True)
                    seq = max((int(p.name) for p in pdir.iterdir() if p.name.isdigit()),
                              default=0) + 1
                    os.rename(sync_dir, pdir / str(seq))
                    fsync_dir(pdir)
                    crashpoint("takeover.frozen")
                else:
                    sync_dir.rmdir()
            index = Path(f"{sync_dir}.index")
            index.unlink(missing_ok=True)
            tmp = kdir / f".owner.{gen}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"node": node, "gen": gen, "since": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, kdir / "owner.json")
            fsync_dir(kdir)
            crashpoint("takeover.owned")
            return gen

    def pending(self, key: str, merged: bool = False) -> list[int]:
        """Frozen layers of ``key`` not yet merged (or, with ``merged``, those merged)."""
        pdir = self.key_dir(key) / "pending"
        if not pdir.is_dir():
            return []
        seqs = sorted(int(p.name) for p in pdir.iterdir() if p.name.isdigit() and p.is_dir())
        return [s for s in seqs if (pdir / f"{s}.merged").exists() == merged]

    def layers(self, key: str) -> list[Path]:
        """The stored layers of the key's root, top first: unmerged pending, then current.

        Call this only right before mounting the key's root (no other mount of it may
        exist): pending layers already merged into a version are deleted here.
        """
        pdir = self.key_dir(key) / "pending"
        for s in self.pending(key, merged=True):
            # Only a rename here: deleting a big layer on MooseFS takes minutes, which a
            # start must not wait for (empty_trash does it afterwards).
            with self.locked(key):
                trash = self.key_dir(key) / ".trash"
                trash.mkdir(exist_ok=True)
                os.rename(pdir / str(s), trash / f"pending-{s}.{time.time_ns()}")
                (pdir / f"{s}.merged").unlink(missing_ok=True)
        current = self.current_path(key)
        return [pdir / str(s) for s in reversed(self.pending(key))] + [current]

    def empty_trash(self, key: str) -> None:
        """Delete what was moved to the trash (merged pending layers, pruned versions)."""
        # Unlocked on purpose: holding the key's lock for minutes would stall a take-over.
        # A recovery deleting the same entry meanwhile is harmless; what is left over is
        # deleted by the next call (or fsck).
        trash = self.key_dir(key) / ".trash"
        if trash.is_dir():
            for p in list(trash.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    safepath.remove_tree(p)

    def merge_pending(self, key: str, workers: int | None = None) -> list[int]:
        """Merge every unmerged pending layer, oldest first, into new versions."""
        made: list[int] = []
        for s in self.pending(key):
            layer = self.key_dir(key) / "pending" / str(s)
            n, _ = self.commit(key, layer, workers)
            crashpoint("pending.committed")
            marker = layer.parent / f"{s}.merged"
            marker.write_text(f"{n}\n")
            fsync_dir(layer.parent)
            made.append(n)
        return made

