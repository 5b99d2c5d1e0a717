"""Crash safety: SIGKILL at every step boundary of commit, publish, prune, restore,
merge and sync (``LABVM_CRASH_AT=<point>``, the CLI run in a subprocess).

After each crash the current version must be the old or the new one and complete;
``fsck --repair`` then leaves a clean store, and running the operation again
gives exactly the expected tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from labvm_spawner.storage.merge import merge_into_new
from labvm_spawner.storage.store import open_store
from labvm_spawner.storage.sync import UpperSync

from . import treeops

KEY = "alice.gpu"


def labvm(*args: object, crash: str | None = None,
          workers: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LABVM_CRASH_AT", None)
    if crash:
        env["LABVM_CRASH_AT"] = crash
    if workers:
        env["LABVM_SYNC_WORKERS"] = str(workers)
    return subprocess.run([sys.executable, "-m", "labvm_spawner.cli", "storage",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def view(path: Path) -> tuple:
    snap = treeops.snapshot(path)
    return snap, treeops.snapshot_root(path), treeops.link_groups(path, snap)


def make_upper(lower: Path, upper: Path, work: Path, ops: list[tuple]) -> None:
    with treeops.overlay(lower, upper, work / "w", work / "m") as mnt:
        for o in ops:
            treeops.apply_op(mnt, o)
    # a fresh workdir per mount
    subprocess.run(["rm", "-rf", str(work)], check=True)


OPS_A = [("mkdir", "a", 0o755), ("write", "a/f", b"one"), ("write", "b", b"two"),
         ("link", "b", "a/b"), ("symlink", "../b", "a/c"), ("mkfifo", "c"),
         ("setxattr", "b", "user.k1", b"v"), ("mkdir", "a/a", 0o700), ("write", "a/a/x", b"x"),
         ("truncate", "a/a/big", 300_000), ("chown", "a/f", 1000, 1000)]
OPS_B = [("write", "a/f", b"changed"), ("unlink", "c"), ("rmtree", "a/a"), ("mkdir", "a/a", 0o755),
         ("write", "a/a/new", b"new"), ("mkdir", "n", 0o750), ("write", "n/z", b"z"),
         ("chmod", "b", 0o600), ("unlink", "a/c")]


def assert_clean(root: Path) -> None:
    res = labvm("fsck", "--store", root)
    assert res.returncode == 0 and "0 problems" in res.stdout, res.stdout + res.stderr
    kdir = root / KEY
    for sub in (".staging", ".trash"):
        assert not any((kdir / sub).iterdir()) if (kdir / sub).exists() else True


def flat_view(layer: Path) -> tuple:
    """What a layer shows on its own: its whiteouts and opaque marks (kept in versions
    for the image below) applied to nothing."""
    base = Path(tempfile.mkdtemp(prefix="labvm-flat-"))
    try:
        (base / "empty").mkdir()
        merge_into_new(base / "empty", layer, base / "flat")
        return view(base / "flat")
    finally:
        shutil.rmtree(base)


def current_view(root: Path) -> tuple | None:
    store = open_store(root)
    n = store.current_version(KEY)
    if n is None:
        return None
    return flat_view(store.version_path(KEY, n))


@pytest.fixture
def world(tmp_path: Path, overlay_ok: None) -> dict:
    """A store with v1 (empty) and v2 (= upper A), and an upper B made over v2."""
    root = tmp_path / "store"
    store = open_store(root)
    v1 = store.current_path(KEY)
    make_upper(v1, tmp_path / "upperA", tmp_path / "wa", OPS_A)
    store.commit(KEY, tmp_path / "upperA")
    v2 = store.version_path(KEY, 2)
    make_upper(v2, tmp_path / "upperB", tmp_path / "wb", OPS_B)
    merge_into_new(v2, tmp_path / "upperB", tmp_path / "refB")
    return {"root": root, "tmp": tmp_path, "old": flat_view(v2), "new": view(tmp_path / "refB")}


COMMIT_POINTS = ["commit.recovered", "commit.copied", "commit.merged", "publish.synced",
                 "publish.renamed", "publish.link_created", "publish.swapped",
                 "commit.published"]
PRUNE_POINTS = ["delete.renamed", "delete.removed", "prune.one", "commit.pruned"]


@pytest.mark.parametrize("point", COMMIT_POINTS + PRUNE_POINTS)
def test_commit_crash(world: dict, point: str) -> None:
    root, upper = world["root"], world["tmp"] / "upperB"
    keep = 1 if point in PRUNE_POINTS else 5
    res = labvm("commit", KEY, "--store", root, "--upper", upper, "--keep", keep, crash=point)
    assert res.returncode == -9, f"crash point {point} not reached: {res.stderr}"
    assert current_view(root) in (world["old"], world["new"])
    fix = labvm("fsck", "--store", root, "--repair")
    assert fix.returncode == 0, fix.stdout + fix.stderr
    assert current_view(root) in (world["old"], world["new"])
    assert_clean(root)
    done = labvm("commit", KEY, "--store", root, "--upper", upper, "--keep", keep)
    assert done.returncode == 0, done.stderr
    assert current_view(root) == world["new"]
    assert_clean(root)


@pytest.mark.parametrize("point", ["restore.copied", "restore.published"])
def test_restore_crash(world: dict, point: str) -> None:
    root = world["root"]
    assert labvm("commit", KEY, "--store", root, "--upper", world["tmp"] / "upperB").returncode == 0
    res = labvm("restore", KEY, 2, "--store", root, crash=point)
    assert res.returncode == -9
    assert current_view(root) in (world["new"], world["old"])
    # The next operation recovers by itself (no explicit fsck).
    done = labvm("restore", KEY, 2, "--store", root)
    assert done.returncode == 0, done.stderr
    assert current_view(root) == world["old"]
    assert open_store(root).versions(KEY)[-1] > 3  # a new version, history kept
    assert_clean(root)


def test_init_crash(tmp_path: Path, overlay_ok: None) -> None:
    root, empty = tmp_path / "store", tmp_path / "empty"
    empty.mkdir()
    make_upper(empty, tmp_path / "upper", tmp_path / "w", OPS_A)
    merge_into_new(empty, tmp_path / "upper", tmp_path / "ref")
    res = labvm("commit", KEY, "--store", root, "--upper", tmp_path / "upper",
                crash="init.staged")
    assert res.returncode == -9
    assert current_view(root) is None
    done = labvm("commit", KEY, "--store", root, "--upper", tmp_path / "upper")
    assert done.returncode == 0, done.stderr
    assert current_view(root) == view(tmp_path / "ref")
    assert open_store(root).versions(KEY) == [1, 2]
    assert_clean(root)


@pytest.mark.parametrize("point", ["merge.copied", "merge.applied"])
def test_merge_crash(world: dict, point: str) -> None:
    tmp = world["tmp"]
    into = tmp / "out"
    lower = open_store(world["root"]).version_path(KEY, 2)
    res = labvm("merge", "--lower", lower, "--upper", tmp / "upperB", "--into", into, crash=point)
    assert res.returncode == -9
    assert not into.exists()
    done = labvm("merge", "--lower", lower, "--upper", tmp / "upperB", "--into", into)
    assert done.returncode == 0, done.stderr
    assert view(into) == world["new"]
    assert not list(tmp.glob(".out.labvm-merge-*"))


SYNC_POINTS = ["sync.tmp_written", "sync.renamed", "sync.deleted", "sync.dir_created",
               "sync.written_in_place", "sync.rescanned", "sync.done", "sync.index_written"]


@pytest.mark.parametrize("workers", [1, 8])
@pytest.mark.parametrize("point", SYNC_POINTS)
def test_sync_crash(tmp_path: Path, overlay_ok: None, point: str, workers: int) -> None:
    root, lower, upper = tmp_path / "store", tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    treeops.apply_op(lower, ("write", "l1", b"lower"))
    treeops.apply_op(lower, ("mkdir", "ld", 0o755))
    treeops.apply_op(lower, ("write", "ld/x", b"x"))
    make_upper(lower, upper, tmp_path / "w1", OPS_A + [("unlink", "l1"), ("rmtree", "ld")])
    store = open_store(root)
    UpperSync(upper, store.sync_path(KEY), journal=False).sync()
    make_upper(lower, upper, tmp_path / "w2", OPS_B)
    res = labvm("sync", "--store", root, "--upper", upper, "--key", KEY, crash=point,
                workers=workers)
    assert res.returncode == -9, f"crash point {point} not reached: {res.stderr}"
    done = labvm("sync", "--store", root, "--upper", upper, "--key", KEY, workers=workers)
    assert done.returncode == 0, done.stderr
    mirror = store.sync_path(KEY)
    assert treeops.snapshot(mirror) == treeops.snapshot(upper)
    assert treeops.snapshot_root(mirror) == treeops.snapshot_root(upper)
    assert labvm("fsck", "--store", root, "--repair").returncode == 0
    assert_clean(root)
    # and the synced copy merges like the upper
    merge_into_new(lower, mirror, tmp_path / "m1")
    merge_into_new(lower, upper, tmp_path / "m2")
    assert view(tmp_path / "m1") == view(tmp_path / "m2")


def test_enough_distinct_crash_points() -> None:
    points = set(COMMIT_POINTS + PRUNE_POINTS + SYNC_POINTS) | {
        "restore.copied", "restore.published", "init.staged", "merge.copied", "merge.applied"}
    assert len(points) >= 20


def test_a_copy_killed_between_its_bytes_and_its_times_is_made_again(tmp_path: Path,
                                                                       overlay_ok: None) -> None:
    """A new directory's files are written straight to their names. Killed after a file's
    bytes but before its times, the copy has the upper's size, owner and mode, and the
    second it was written as its mtime: when the upper's file is from that same second,
    only the nanoseconds tell, and the next sync must copy it again."""
    root, lower, upper = tmp_path / "store", tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    make_upper(lower, upper, tmp_path / "w1", OPS_A)
    store = open_store(root)
    UpperSync(upper, store.sync_path(KEY), journal=False).sync()
    make_upper(lower, upper, tmp_path / "w2", [("mkdir", "n", 0o755),
                                               ("write", "n/z", b"z" * 5000)])
    res = labvm("sync", "--store", root, "--upper", upper, "--key", KEY,
                crash="copy.data_written", workers=1)
    assert res.returncode == -9, f"crash point not reached: {res.stderr}"
    mirror = store.sync_path(KEY)
    half = os.lstat(mirror / "n" / "z")  # written in place: the bytes, not the times
    assert half.st_size == 5000
    later = half.st_mtime_ns // 10**9 * 10**9 + (half.st_mtime_ns + 5 * 10**8) % 10**9
    os.utime(upper / "n" / "z", ns=(later, later), follow_symlinks=False)
    done = labvm("sync", "--store", root, "--upper", upper, "--key", KEY, workers=1)
    assert done.returncode == 0, done.stderr
    assert treeops.snapshot(mirror) == treeops.snapshot(upper)
    assert os.lstat(mirror / "n" / "z").st_mtime_ns == later


TAKEOVER_POINTS = ["takeover.frozen", "takeover.owned"]
PENDING_POINTS = ["commit.copied", "commit.merged", "publish.swapped", "pending.committed"]


@pytest.mark.parametrize("point", TAKEOVER_POINTS + PENDING_POINTS)
def test_take_over_and_merge_pending_crash(world: dict, point: str) -> None:
    """A node taking a root over (a migration) is killed; the synced upper is never lost.

    The synced copy of upper B is frozen as a pending layer, stacked above v2, and
    merged into a new version later; a crash anywhere leaves v2 + B reachable, and
    finishing the steps gives exactly v2 + B.
    """
    root = world["root"]
    store = open_store(root)
    syncer = UpperSync(world["tmp"] / "upperB", store.sync_path(KEY), journal=False)
    syncer.sync()
    syncer.close()
    take = ["take-over", KEY, "b", "--store", root]
    merge = ["merge-pending", KEY, "--store", root]
    if point in TAKEOVER_POINTS:
        assert labvm(*take, crash=point).returncode == -9
        assert labvm(*take).returncode == 0
    else:
        assert labvm(*take).returncode == 0
    assert store.owner(KEY)[0] == "b" and not store.sync_path(KEY).exists()
    layers = store.layers(KEY)
    assert len(layers) == 2  # the frozen upper above v2: what the new node mounts
    merge_into_new(layers[1], layers[0], world["tmp"] / "stacked")  # v2 holds no whiteouts
    assert view(world["tmp"] / "stacked") == world["new"]
    if point in PENDING_POINTS:
        assert labvm(*merge, crash=point).returncode == -9
        assert current_view(root) in (world["old"], world["new"])
    done = labvm(*merge)
    assert done.returncode == 0, done.stderr
    assert current_view(root) == world["new"]
    assert store.pending(KEY) == [] and store.layers(KEY) == [store.current_path(KEY)]
    store.empty_trash(KEY)  # what the node does after the start that called layers()
    assert_clean(root)


def _writers_under(root: Path) -> list[str]:
    """Processes (other than us) holding anything under ``root`` open, or living there."""
    found = []
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/cwd")]
            links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone, or not ours to look at
        if any(link == str(root) or link.startswith(f"{root}/") for link in links):
            found.append(pid)
    return found


def test_commit_killed_at_random_moments(tmp_path: Path, overlay_ok: None) -> None:
    """20 kill -9 of a commit at random moments: each time the old or the new version is
    current, no process goes on writing, and the first fsck --repair succeeds."""
    import random
    import time

    root = tmp_path / "store"
    store = open_store(root)
    v1 = store.current_path(KEY)
    many = [("mkdir", "d", 0o755)] + [("write", f"d/f{i}", b"x" * 2000) for i in range(1500)]
    make_upper(v1, tmp_path / "upperA", tmp_path / "wa", many + OPS_A)
    store.commit(KEY, tmp_path / "upperA")
    v2 = store.version_path(KEY, 2)
    more = [("write", f"d/g{i}", b"y" * 2000) for i in range(800)] + OPS_B
    make_upper(v2, tmp_path / "upperB", tmp_path / "wb", more)
    merge_into_new(v2, tmp_path / "upperB", tmp_path / "refB")
    old, new = flat_view(v2), view(tmp_path / "refB")
    cmd = [sys.executable, "-m", "labvm_spawner.cli", "storage", "commit", KEY, "--store",
           str(root), "--upper", str(tmp_path / "upperB"), "--keep", "100"]
    t0 = time.monotonic()
    assert subprocess.run(cmd, capture_output=True).returncode == 0  # how long one takes
    took = time.monotonic() - t0
    assert current_view(root) == new
    rnd = random.Random(7)
    outcomes = {"old": 0, "new": 0}
    for _ in range(20):
        # Start from the old content again, then kill a commit somewhere in its run.
        open_store(root, keep=100).restore(KEY, 2)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.05, took))
        proc.kill()
        proc.wait()
        time.sleep(0.2)
        assert _writers_under(root) == [], "a process still works in the store"
        staging = root / KEY / ".staging"
        before = treeops.snapshot(staging) if staging.exists() else {}
        time.sleep(0.3)
        assert (treeops.snapshot(staging) if staging.exists() else {}) == before
        fix = labvm("fsck", "--store", root, "--repair")
        assert fix.returncode == 0, fix.stdout + fix.stderr
        assert open_store(root).fsck().clean
        assert not any((root / KEY / ".staging").iterdir())
        got = current_view(root)
        assert got in (old, new)
        outcomes["old" if got == old else "new"] += 1
    assert outcomes["old"] >= 1, outcomes  # the kills did land inside commits


def test_first_sync_killed_at_random_moments(tmp_path: Path, overlay_ok: None) -> None:
    """12 kill -9 of a parallel first sync at random moments: the next sync always ends
    with a mirror equal to the upper, and fsck finds nothing to repair in the store."""
    import random
    import time

    root, upper = tmp_path / "store", tmp_path / "upper"
    lower = tmp_path / "lower"
    lower.mkdir()
    ops = [("mkdir", "d", 0o755), ("mkdir", "e", 0o750), ("mkdir", "e/deep", 0o700)]
    ops += [("write", f"d/f{i}", b"x" * (i % 7000)) for i in range(1200)]
    ops += [("write", f"e/deep/g{i}", b"y" * 3000) for i in range(300)]
    ops += [("link", "d/f5", "e/l5"), ("truncate", "e/sparse", 5_000_000)]
    make_upper(lower, upper, tmp_path / "w", ops + OPS_A)
    store = open_store(root)
    mirror = store.sync_path(KEY)
    cmd = [sys.executable, "-m", "labvm_spawner.cli", "storage", "sync", "--store", str(root),
           "--upper", str(upper), "--key", KEY]
    env = dict(os.environ, LABVM_SYNC_WORKERS="8")
    env.pop("LABVM_CRASH_AT", None)
    assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0
    want = treeops.snapshot(upper), treeops.snapshot_root(upper)
    assert (treeops.snapshot(mirror), treeops.snapshot_root(mirror)) == want
    total = len(want[0])

    def copied() -> int:
        n = 0
        for sub in ("d", "e/deep"):
            try:
                n += len(os.listdir(mirror / sub))
            except OSError:
                pass
        return n

    # A kill timed by the clock lands after the end when the machine is fast (the copy
    # takes well under a second); a kill timed by progress lands inside the copy.
    rnd = random.Random(11)
    partial = 0
    for _ in range(12):
        subprocess.run(["rm", "-rf", str(mirror), f"{mirror}.index"], check=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        target = int(total * rnd.uniform(0.0, 0.9))
        while proc.poll() is None and copied() < target:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        if mirror.exists() and treeops.snapshot(mirror) != want[0]:
            partial += 1
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert (treeops.snapshot(mirror), treeops.snapshot_root(mirror)) == want
        assert open_store(root).fsck().clean
    assert partial >= 3  # the kills did land inside syncs
