"""Set-aside uppers (node/asides.py): listed with size and age, restored as a new version
of their root (never while it runs), deleted, and expired only when unclaimed for long."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from labvm_spawner.errors import LabVMError
from labvm_spawner.node import asides
from labvm_spawner.storage import StoreError, open_store


def _aside(state: Path, key: str, t: int, files: dict[str, bytes]) -> str:
    base = state / "uppers" / ".aside" / f"{key}-{t}"
    for rel, data in files.items():
        (base / "upper" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "upper" / rel).write_bytes(data)
    (base / "work").mkdir()
    return base.name


def test_a_set_aside_upper_becomes_a_new_version_with_its_files(tmp_path, canary) -> None:
    state, store = tmp_path / "state", open_store(tmp_path / "store")
    store.current_path("ivy")
    now = int(time.time())
    aid = _aside(state, "ivy", now - 3600, {"home/ivy/unsynced.txt": b"only here\n",
                                            "home/ivy/big": b"x" * 5000})
    # A user's link in it points at a canary: measuring and removing never follow it.
    os.symlink(canary, state / "uppers" / ".aside" / aid / "upper" / "home" / "ivy" / "ln")
    [found] = asides.listing(state, "a")
    assert found == {"id": aid, "key": "ivy", "node": "a", "set_aside_at": now - 3600,
                     "bytes": 5010}
    store.lease("ivy", "b", [1])
    with pytest.raises(StoreError, match="running on node b"):
        asides.restore(state, store, aid)
    assert asides.listing(state, "a") and store.versions("ivy") == [1]  # nothing changed
    store.release("ivy", "b")
    n = asides.restore(state, store, aid)
    assert n == 2 and store.current_version("ivy") == 2
    assert (store.version_path("ivy", 2) / "home/ivy/unsynced.txt").read_bytes() == b"only here\n"
    assert asides.listing(state, "a") == []
    assert canary.exists()


def test_delete_and_age_expiry_touch_only_what_they_name(tmp_path, canary) -> None:
    state = tmp_path / "state"
    now = int(time.time())
    old = _aside(state, "ivy", now - 31 * 86400, {"f": b"old"})
    young = _aside(state, "ivy", now - 86400, {"f": b"young"})
    other = _aside(state, "jo", now - 40 * 86400, {"f": b"jo"})
    assert sorted(asides.expire(state, 30, now=now)) == sorted([old, other])
    assert [a["id"] for a in asides.listing(state, "a")] == [young]
    for bad in ("../../etc", "ivy", f"ivy-{now}/..", f"..-{now}", 7):
        with pytest.raises(LabVMError):
            asides.delete(state, bad)
    assert asides.delete(state, young) == "ivy"
    assert asides.listing(state, "a") == [] and canary.exists()
