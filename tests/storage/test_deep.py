"""Trees deeper than PATH_MAX, made through a real overlay mount, sync, commit and merge
equal to the kernel's view (nothing in the storage path joins a whole path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from labvm_spawner.storage import open_store
from labvm_spawner.storage.merge import merge_into_new
from labvm_spawner.storage.sync import UpperSync

from . import treeops

LONG = ["n" * 200 + str(i % 10) for i in range(30)]  # 30 names of 201 bytes: over 6 KB
CHAIN = ["c"] * 300  # deeper than the descriptors a walk keeps open


def _deep_ops() -> list[tuple]:
    ops: list[tuple] = []
    for i in range(1, len(LONG) + 1):
        rel = "/".join(LONG[:i])
        ops.append(("mkdir", rel, 0o755))
        if i % 7 == 0:
            ops += [("write", f"{rel}/f", f"level {i}".encode()), ("mkfifo", f"{rel}/p"),
                    ("symlink", treeops.CANARY, f"{rel}/s"), ("setxattr", rel, "user.k1", b"v")]
    bottom = "/".join(LONG)
    ops += [("write", f"{bottom}/leaf", b"leaf"), ("link", f"{bottom}/leaf", "top-link"),
            ("chmod", bottom, 0o700), ("unlink", "old"), ("rmtree", "olddir")]
    for i in range(1, len(CHAIN) + 1):
        ops.append(("mkdir", "/".join(CHAIN[:i]), 0o755))
    ops.append(("write", "/".join(CHAIN) + "/end", b"end"))
    return ops


def test_deeper_than_path_max(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    (lower / "olddir").mkdir(parents=True)
    (lower / "olddir" / "x").write_text("x")
    (lower / "old").write_text("old")
    store = open_store(tmp_path / "store")
    mirror = store.sync_path("deep")
    with treeops.overlay(lower, upper, work, tmp_path / "m") as mnt:
        journal = UpperSync(upper, mirror, journal=True)
        journal.sync()
        for o in _deep_ops():
            treeops.apply_op(mnt, o)
        stats = journal.sync()  # journaled: paths far longer than PATH_MAX
        journal.close()
        kernel = treeops.snapshot(mnt)
    assert len(os.fsencode("/".join(LONG))) > 4096
    assert "/".join(LONG) + "/leaf" in kernel and "/".join(CHAIN) + "/end" in kernel
    assert not stats.rescan and stats.errors == 0
    assert treeops.snapshot(mirror) == treeops.snapshot(upper)
    # A rescan from scratch (a restarted node) gets the same.
    shutil.rmtree(mirror)
    os.unlink(f"{mirror}.index")
    rescan = UpperSync(upper, mirror, journal=False)
    assert rescan.sync().errors == 0
    rescan.close()
    assert treeops.snapshot(mirror) == treeops.snapshot(upper)

    # The offline merge equals what the kernel showed...
    merge_into_new(lower, upper, tmp_path / "merged")
    assert treeops.snapshot(tmp_path / "merged") == kernel
    # ...and so does the overlay of a committed version over the same lower.
    n, _ = store.commit("deep", mirror)
    version = store.version_path("deep", n)
    with treeops.overlay(f"{version}:{lower}", tmp_path / "u2", tmp_path / "w2",
                         tmp_path / "m2") as mnt2:
        assert treeops.snapshot(mnt2) == kernel
    assert store.fsck().clean
