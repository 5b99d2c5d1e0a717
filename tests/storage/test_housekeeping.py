"""A node's scheduled housekeeping (node/housekeeping.py): it prunes image trees nobody
uses, checks and prunes only the roots it owns, keeps leased versions, and only reports
what fsck finds unless repairs are turned on."""

from __future__ import annotations

import os
import time
from pathlib import Path

from labvm_spawner.node import housekeeping
from labvm_spawner.storage import open_store


def _commit(store, tmp: Path, key: str, i: int) -> None:
    up = tmp / f"up-{key}-{i}"
    up.mkdir()
    (up / f"f{i}").write_text(str(i))
    store.commit(key, up)


def test_one_round_prunes_checks_and_reports(tmp_path) -> None:
    store = open_store(tmp_path / "store", keep=2)
    for key in ("mine", "theirs"):
        store.current_path(key)
        store.take_over(key, "a" if key == "mine" else "b")
        for i in range(4):
            _commit(store, tmp_path, key, i)
            if key == "mine" and i == 0:
                store.lease("mine", "c", [2])  # a server on node c runs over version 2
    # A crash left half a version behind: found, but left alone without repair.
    (store.key_dir("mine") / ".staging" / "9").mkdir(parents=True)
    rootfs = tmp_path / "rootfs"
    for name, age in (("0ld1mage-100000", 7200), ("n3wimage-100000", 60), ("k3pt-100000", 7200)):
        (rootfs / name).mkdir(parents=True)
        os.utime(rootfs / name, (time.time() - age, time.time() - age))
    result = housekeeping.run(store, "a", rootfs, {"k3pt" + "0" * 60}, repair=False)
    assert result["image_prune"] == {"removed": ["0ld1mage-100000"]}
    assert sorted(p.name for p in rootfs.iterdir()) == ["k3pt-100000", "n3wimage-100000"]
    assert result["fsck"]["keys"] == 1 and result["fsck"]["repaired"] == []
    assert any("staging/9" in p for p in result["fsck"]["problems"])
    assert (store.key_dir("mine") / ".staging" / "9").exists()
    assert result["prune"]["kept_for_leases"] == {"mine": {"2": ["c"]}}
    assert store.versions("mine") == [2, 4, 5]  # 1 and 3 pruned before, 2 leased
    assert store.versions("theirs") == [4, 5]   # node b's root: pruned by its commits only
    assert "theirs" not in result["prune"]["pruned"]
    housekeeping.save(tmp_path, result)
    assert housekeeping.load(tmp_path) == result
    again = housekeeping.run(store, "a", rootfs, set(), repair=True)
    assert any("staging/9" in p for p in again["fsck"]["repaired"])
    assert not (store.key_dir("mine") / ".staging" / "9").exists()
