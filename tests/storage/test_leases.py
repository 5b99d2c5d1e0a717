"""Leases: a version a mounted root stands on is never pruned, dropped by fsck or replaced
by a restore, until its node releases it or stops renewing it for the grace period.

The "server" is a real overlay mount over the leased version; it must read every file of
that version after the store was pruned and checked around it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labvm_spawner.storage import StoreError, open_store

from . import treeops

KEY = "lena"


def _commit(store, tmp: Path, i: int) -> int:
    up = tmp / f"up{i}"
    (up / "data").mkdir(parents=True)
    (up / "data" / f"f{i}.txt").write_text(f"commit {i}\n" * (i + 1))
    n, _ = store.commit(KEY, up)
    return n


def test_a_leased_version_outlives_prune_and_fsck_until_released(tmp_path, overlay_ok) -> None:
    store = open_store(tmp_path / "store", keep=2)
    store.current_path(KEY)
    for i in range(2):
        _commit(store, tmp_path, i)
    v3 = store.current_version(KEY)
    assert v3 == 3
    store.lease(KEY, "a", [v3])
    want = treeops.snapshot(store.version_path(KEY, v3))
    with treeops.overlay(str(store.version_path(KEY, v3)), tmp_path / "u", tmp_path / "w",
                         tmp_path / "m") as running:
        # Five commits of the same root from elsewhere (node b): keep=2 would drop 3.
        for i in range(2, 7):
            _commit(store, tmp_path, i)
        assert v3 in store.versions(KEY)
        assert store.skipped[KEY] == {v3: ["a"]}
        assert store.prune(KEY) == [] and v3 in store.versions(KEY)
        report = store.fsck(repair=True)
        assert report.clean and v3 in store.versions(KEY)
        # The running server reads every file of its version.
        assert treeops.snapshot(running) == want
        for p in sorted(running.rglob("*")):
            if p.is_file():
                p.read_bytes()
        # Restoring under it is refused, and changes nothing.
        before = store.versions(KEY), store.current_version(KEY)
        with pytest.raises(StoreError, match="running on node a"):
            store.restore(KEY, v3)
        assert (store.versions(KEY), store.current_version(KEY)) == before
    store.release(KEY, "a")
    assert store.prune(KEY) == [v3]
    assert store.versions(KEY) == [7, 8]


def test_a_dead_nodes_lease_expires_after_its_grace(tmp_path) -> None:
    store = open_store(tmp_path / "store", keep=1)
    store.current_path(KEY)
    store.lease(KEY, "gone", [1], grace_s=0.5)
    _commit(store, tmp_path, 0)
    assert store.versions(KEY) == [1, 2]  # still held
    time.sleep(0.6)
    assert store.leases(KEY) == {}
    assert store.prune(KEY) == [1]


def test_lease_holders_are_node_names(tmp_path) -> None:
    store = open_store(tmp_path / "store")
    store.current_path(KEY)
    for bad in ("../x", "a/b", "", ".hidden", "a\n"):
        with pytest.raises(StoreError):
            store.lease(KEY, bad, [1])
    # A stray or broken file in leases/ holds nothing.
    ldir = store.key_dir(KEY) / "leases"
    ldir.mkdir(exist_ok=True)
    (ldir / "b.json").write_text("{not json")
    (ldir / "..json").write_text('{"versions": [1], "expires": 1e12}')
    assert store.leases(KEY) == {}


def test_the_prune_command_says_what_it_kept(tmp_path) -> None:
    store = open_store(tmp_path / "store", keep=1)
    store.current_path(KEY)
    store.lease(KEY, "a", [1])
    _commit(store, tmp_path, 0)
    _commit(store, tmp_path, 1)
    out = subprocess.run([sys.executable, "-m", "labvm_spawner.cli", "storage", "prune",
                          KEY, "--store", str(tmp_path / "store"), "--keep", "1"],
                         capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert f"{KEY}: kept version 1: in use on node(s) a" in out.stdout
