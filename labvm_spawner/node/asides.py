"""Set-aside uppers: what a take-over found of a user's root on a node that had lost it.

A stale upper with unsynced changes is moved to ``<state_dir>/uppers/.aside/<key>-<t>``
(``uppers.Uppers.set_aside``), never deleted. Here an admin can see them (size, age),
turn one into a new version of its root (a commit onto the current version: history is
never rewritten), or delete it; ones nobody claims are removed after ``max_age_days``,
and each removal is logged. The upper is the user's tree: it is measured and removed
without following a symlink.

Used by the node engine (``NodeOps``, for an agent) and by the admin service for the
node it runs on.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from ..errors import LabVMError
from ..names import is_key
from ..storage import safepath
from ..storage.quota import tree_bytes
from ..storage.store import LayerStore
from .uppers import ASIDE

log = logging.getLogger("labvm.node")
_ID = re.compile(r"(?P<key>[a-z0-9_.-]{1,100})-(?P<t>[0-9]{9,12})")
DEFAULT_MAX_AGE_DAYS = 30.0


def _dir(state_dir: Path) -> Path:
    return Path(state_dir) / "uppers" / ASIDE


def _parse(name: str) -> tuple[str, int] | None:
    m = _ID.fullmatch(name)
    if m is None or not is_key(m["key"]):
        return None
    return m["key"], int(m["t"])


def listing(state_dir: Path, node: str, sizes: dict[str, int | None] | None = None
            ) -> list[dict]:
    """The set-aside uppers on this node: {id, key, node, set_aside_at, bytes}; ``sizes``
    caches what was measured (a set-aside upper never changes)."""
    d = _dir(state_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        parsed = _parse(p.name)
        if parsed is None or p.is_symlink() or not (p / "upper").is_dir():
            continue
        if sizes is not None and p.name in sizes:
            size = sizes[p.name]
        else:
            try:
                size = tree_bytes(p / "upper")
            except OSError:
                size = None
            if sizes is not None:
                sizes[p.name] = size
        out.append({"id": p.name, "key": parsed[0], "node": node, "set_aside_at": parsed[1],
                    "bytes": size})
    return out


def _find(state_dir: Path, aside_id: object) -> tuple[Path, str]:
    parsed = _parse(aside_id) if isinstance(aside_id, str) else None
    path = _dir(state_dir) / aside_id if parsed else None
    if parsed is None or path is None or path.is_symlink() or not (path / "upper").is_dir():
        raise LabVMError(f"no set-aside upper {str(aside_id)[:120]!r} on this node")
    return path, parsed[0]


def restore(state_dir: Path, store: LayerStore, aside_id: str) -> int:
    """Commit a set-aside upper onto its root's current version, as a new version; then
    remove it. Refused while the root runs anywhere (it would change under it)."""
    path, key = _find(state_dir, aside_id)
    store.refuse_if_leased(key, "turning a set-aside upper into a version")
    n, _ = store.commit(key, path / "upper")
    safepath.remove_tree(path)
    log.info("set-aside upper %s of %s restored as version %d", aside_id, key, n)
    return n


def delete(state_dir: Path, aside_id: str) -> str:
    path, key = _find(state_dir, aside_id)
    safepath.remove_tree(path)
    log.warning("set-aside upper %s of %s deleted", aside_id, key)
    return key


def expire(state_dir: Path, max_age_days: float, now: float | None = None) -> list[str]:
    """Remove the set-aside uppers older than ``max_age_days``; their ids."""
    now = time.time() if now is None else now
    gone = []
    for a in listing(state_dir, ""):
        if now - a["set_aside_at"] > max_age_days * 86400:
            safepath.remove_tree(_dir(state_dir) / a["id"])
            log.warning("set-aside upper %s of %s removed: unclaimed for %.0f days",
                        a["id"], a["key"], (now - a["set_aside_at"]) / 86400)
            gone.append(a["id"])
    return gone
