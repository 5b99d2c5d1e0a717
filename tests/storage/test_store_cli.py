"""The store and the ``labvm storage`` command line: argument errors, refusals of
redirect_dir/metacopy uppers made by the real kernel, versions, restore, prune,
fsck, immutability of published versions, on local disk and on MooseFS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labvm_spawner.storage.store import open_store

from . import treeops

KEY = "bob"


def labvm(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labvm_spawner.cli", "storage",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def tree_state(root: Path) -> tuple:
    snap = treeops.snapshot(root)
    return snap, treeops.link_groups(root, snap)


@pytest.fixture
def layers(tmp_path: Path, overlay_ok: None) -> tuple[Path, Path]:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    for o in [("mkdir", "d", 0o755), ("write", "d/f", b"old"), ("link", "d/f", "g"),
              ("write", "x", b"x")]:
        treeops.apply_op(lower, o)
    with treeops.overlay(lower, upper, tmp_path / "w", tmp_path / "m") as mnt:
        for o in [("write", "d/f", b"new"), ("unlink", "x"), ("write", "y", b"y")]:
            treeops.apply_op(mnt, o)
    return lower, upper


def test_merge_bad_arguments_touch_nothing(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    lower, upper = layers
    before = tree_state(tmp_path)
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [
        ("--lower", tmp_path / "nope", "--upper", upper, "--into", tmp_path / "o1"),
        ("--lower", lower, "--upper", tmp_path / "nope", "--into", tmp_path / "o2"),
        ("--lower", lower, "--upper", upper, "--into", exists),
        ("--lower", lower, "--upper", upper, "--into", lower / "inside"),
        ("--lower", lower, "--upper", upper, "--into", tmp_path / "no" / "parent"),
    ]
    for case in cases:
        res = labvm("merge", *case)
        assert res.returncode == 2, (case, res.stdout, res.stderr)
        assert "error:" in res.stderr
    exists.rmdir()
    assert tree_state(tmp_path) == before


def test_merge_refuses_lower_mount_point(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    lower, upper = layers
    with treeops.overlay(lower, tmp_path / "u2", tmp_path / "w2", tmp_path / "live") as live:
        res = labvm("merge", "--lower", live, "--upper", upper, "--into", tmp_path / "out")
    assert res.returncode == 2 and "mount point" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("feature", ["redirect_dir", "metacopy"])
def test_merge_refuses_kernel_redirect_and_metacopy(tmp_path: Path, overlay_ok: None,
                                                    feature: str) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "m"))
    (lower / "dir").mkdir(parents=True)
    (lower / "dir" / "f").write_text("data")
    for d in (upper, work, mnt):
        d.mkdir()
    opts = (f"lowerdir={lower},upperdir={upper},workdir={work},index=off,xino=off,"
            + ("redirect_dir=on,metacopy=off" if feature == "redirect_dir"
               else "redirect_dir=on,metacopy=on"))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        if feature == "redirect_dir":
            os.rename(mnt / "dir", mnt / "moved")
        else:
            os.chmod(mnt / "dir" / "f", 0o600)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    res = labvm("merge", "--lower", lower, "--upper", upper, "--into", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert feature in res.stderr and "refused" in res.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
    # the store refuses too, before making any version
    store = open_store(tmp_path / "store")
    store.current_path(KEY)
    res = labvm("commit", KEY, "--store", tmp_path / "store", "--upper", upper)
    assert res.returncode == 2
    assert store.versions(KEY) == [1]


def test_merge_replaces_never_writes_through(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    lower, upper = layers
    before = tree_state(lower)
    res = labvm("merge", "--lower", lower, "--upper", upper, "--into", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert (out / "d" / "f").read_text() == "new"
    assert (out / "g").read_text() == "old"  # the other link of the lower inode
    assert not (out / "x").exists() and (out / "y").read_text() == "y"
    assert tree_state(lower) == before


def test_sparse_file_stays_sparse(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    with treeops.overlay(lower, upper, tmp_path / "w", tmp_path / "m") as mnt:
        with open(mnt / "sparse", "wb") as f:
            f.truncate(64 << 20)
            f.seek(32 << 20)
            f.write(b"middle")
    res = labvm("merge", "--lower", lower, "--upper", upper, "--into", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    st = os.stat(tmp_path / "out" / "sparse")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < (1 << 20)
    with open(tmp_path / "out" / "sparse", "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"


def _store_flow(root: Path, work: Path) -> None:
    store = open_store(root, keep=3)
    v1 = store.current_path(KEY)
    states = [tree_state(v1)]
    lower = v1
    for i in range(4):
        upper = work / f"u{i}"
        ops = [("write", f"f{i}", b"v%d" % i), ("write", "shared", b"s%d" % i),
               ("link", "shared", f"l{i}"), ("unlink", f"f{i - 1}"), ("mkfifo", f"p{i}")]
        with treeops.overlay(lower, upper, work / f"w{i}", work / f"m{i}") as mnt:
            for o in ops:
                treeops.apply_op(mnt, o)
        res = labvm("commit", KEY, "--store", root, "--upper", upper, "--keep", 3)
        assert res.returncode == 0, res.stderr
        lower = store.current_path(KEY)
        states.append(tree_state(lower))
        # every kept version is exactly as it was published
        for n in store.versions(KEY):
            assert tree_state(store.version_path(KEY, n)) == states[n - 1], n
    assert store.versions(KEY) == [3, 4, 5]
    res = labvm("versions", KEY, "--store", root)
    assert res.stdout.split("\n")[:3] == ["3", "4", "5 *"]
    # hard links survive the version copies
    cur = store.current_path(KEY)
    assert os.stat(cur / "shared").st_ino == os.stat(cur / "l3").st_ino
    res = labvm("restore", KEY, 3, "--store", root, "--keep", 3)
    assert res.returncode == 0, res.stderr
    assert store.versions(KEY) == [4, 5, 6] and store.current_version(KEY) == 6
    assert tree_state(store.version_path(KEY, 6)) == states[2]
    assert labvm("restore", KEY, 1, "--store", root).returncode == 2
    # prune never removes the current version, even when it is the oldest
    assert labvm("restore", KEY, 4, "--store", root, "--keep", 3).returncode == 0
    os.replace(root / KEY / "current", root / KEY / "old-link")
    os.symlink("versions/5", root / KEY / "current")
    os.unlink(root / KEY / "old-link")
    assert labvm("prune", KEY, "--store", root, "--keep", 1).returncode == 0
    assert store.versions(KEY) == [5, 7]  # 6 pruned, 5 kept as current, 7 newest


def test_store_flow_local(tmp_path: Path, overlay_ok: None) -> None:
    _store_flow(tmp_path / "store", tmp_path)


def test_store_flow_moosefs(tmp_path: Path, overlay_ok: None, mfs_dir: Path) -> None:
    _store_flow(mfs_dir / "store", tmp_path)


def test_fsck_finds_and_repairs(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(root)
    store.current_path(KEY)
    kdir = root / KEY
    (kdir / ".staging" / "7").mkdir(parents=True)
    (kdir / ".staging" / "7" / "half").write_text("x")
    os.symlink("versions/1", kdir / ".current.9.tmp")
    (kdir / "versions" / "junk").write_text("")
    res = labvm("fsck", "--store", root)
    assert res.returncode == 1 and "3 problems" in res.stdout, res.stdout
    res = labvm("fsck", "--store", root, "--repair")
    assert res.returncode == 0 and "3 repaired" in res.stdout, res.stdout
    assert labvm("fsck", "--store", root).returncode == 0
    # dangling current: pointed back at the newest complete version
    os.replace(kdir / "versions" / "1", kdir / "versions" / "2")
    res = labvm("fsck", "--store", root, "--repair")
    assert res.returncode == 0 and store.current_version(KEY) == 2
    assert labvm("versions", KEY, "--store", root).stdout == "2 *\n"
