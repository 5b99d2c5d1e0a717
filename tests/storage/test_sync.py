"""Sync of a live upper into the store, checked against the upper itself.

Random operations run through a real overlay mount with syncs in between (journal
and rescan modes); the copy must equal the upper (incl. trusted.overlay.* xattrs,
whiteouts, opaque dirs) with the same hard link groups, except that whiteouts are
never linked together, and merging the copy must give what merging the upper gives.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labvm_spawner.storage import fsops
from labvm_spawner.storage.merge import merge_into_new
from labvm_spawner.storage.sync import UpperSync

from . import treeops

EXAMPLES = int(os.environ.get("LABVM_SYNC_EXAMPLES", "150"))


def _groups_without_whiteouts(root: Path, view: dict[str, tuple]) -> set[frozenset[str]]:
    keep = {k: v for k, v in view.items() if not (v[0] == stat.S_IFCHR and v[6] == (0, 0))}
    return treeops.link_groups(root, keep)


def _check(upper: Path, mirror: Path) -> None:
    want = treeops.snapshot(upper)
    got = treeops.snapshot(mirror)
    assert got == want, treeops.diff(want, got)
    assert treeops.snapshot_root(mirror) == treeops.snapshot_root(upper)
    assert treeops.link_groups(mirror, got) == _groups_without_whiteouts(upper, want)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(treeops.build_op, max_size=10),
       st.lists(st.lists(treeops.op, max_size=8), min_size=1, max_size=4),
       st.booleans())
def test_sync_matches_upper(build: list, batches: list, journal: bool) -> None:
    base = Path("/tmp") / f"labvm-synctest-{uuid.uuid4().hex[:8]}"
    lower, upper, mirror = base / "lower", base / "upper", base / "store" / "upper-sync"
    lower.mkdir(parents=True)
    mirror.parent.mkdir()
    try:
        for o in build:
            treeops.apply_op(lower, o)
        with treeops.overlay(lower, upper, base / "work", base / "merged") as mnt:
            syncer = UpperSync(upper, mirror, journal=journal)
            try:
                syncer.sync()
                for batch in batches:
                    for o in batch:
                        treeops.apply_op(mnt, o)
                    syncer.sync()
                    _check(upper, mirror)
            finally:
                syncer.close()
        merge_into_new(lower, upper, base / "m1")
        merge_into_new(lower, mirror, base / "m2")
        assert treeops.snapshot(base / "m2") == treeops.snapshot(base / "m1")
    finally:
        shutil.rmtree(base)


def test_whiteouts_do_not_become_one_link_group(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    for i in range(20):
        (lower / f"f{i}").write_text("x")
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        for i in range(20):
            os.unlink(mnt / f"f{i}")
        mirror = tmp_path / "store" / "upper-sync"
        mirror.parent.mkdir()
        syncer = UpperSync(upper, mirror)
        syncer.sync()
        syncer.close()
    links = {os.lstat(upper / f"f{i}").st_nlink for i in range(20)}
    assert links != {1}, "kernel no longer shares whiteout inodes; test premise gone"
    for i in range(20):
        s = os.lstat(mirror / f"f{i}")
        assert stat.S_ISCHR(s.st_mode) and s.st_rdev == 0 and s.st_nlink == 1


def test_restart_rescans_and_catches_up(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    (lower / "keep").write_text("k")
    mirror = tmp_path / "store" / "upper-sync"
    mirror.parent.mkdir()
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        s1 = UpperSync(upper, mirror)
        s1.sync()
        (mnt / "a").write_text("1")
        s1.sync()
        s1.close()
        # The next syncer starts from the index the last one saved.
        s2 = UpperSync(upper, mirror)
        assert s2.index == s1.index and "a" in s2.index
        s2.close()
        # Changes while no syncer runs are found by the rescan of the next one.
        (mnt / "a").write_text("2")
        os.unlink(mnt / "keep")
        s2 = UpperSync(upper, mirror)
        stats = s2.sync()
        assert stats.rescan
        s2.close()
    _check(upper, mirror)


def test_journal_sees_metadata_only_changes(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    mirror = tmp_path / "store" / "upper-sync"
    mirror.parent.mkdir()
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        (mnt / "f").write_text("1")
        (mnt / "d" / "g").write_text("1")
        syncer = UpperSync(upper, mirror)
        assert syncer.sync().rescan
        steps = [
            lambda: os.chmod(mnt / "f", 0o600),
            lambda: os.chown(mnt / "f", 1000, 1000),
            lambda: os.setxattr(mnt / "f", "user.x", b"1"),
            lambda: os.chmod(mnt / "d", 0o700),
            lambda: os.setxattr(mnt / "d", "user.y", b"2"),
            lambda: os.utime(mnt / "d" / "g", ns=(10**9, 10**9)),
            lambda: os.rename(mnt / "f", mnt / "d" / "f2"),
            lambda: os.unlink(mnt / "d" / "g"),
        ]
        for step in steps:
            step()
            stats = syncer.sync()
            assert not stats.rescan and stats.changed >= 1
            _check(upper, mirror)
        syncer.close()


def test_cli_watch_mode_follows_changes(tmp_path: Path, overlay_ok: None) -> None:
    import signal
    import subprocess
    import sys
    import time

    lower, upper, root = tmp_path / "lower", tmp_path / "upper", tmp_path / "store"
    lower.mkdir()
    (lower / "old").write_text("o")
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        proc = subprocess.Popen([sys.executable, "-m", "labvm_spawner.cli", "storage", "sync",
                                 "--store", str(root), "--upper", str(upper), "--key", "carol",
                                 "--watch", "--interval", "0.2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            mirror = root / "carol" / "upper-sync"
            deadline = time.monotonic() + 30
            while not mirror.is_dir() and time.monotonic() < deadline:
                time.sleep(0.1)
            (mnt / "new").write_text("n")
            os.unlink(mnt / "old")
            (mnt / "dir").mkdir()
            (mnt / "dir" / "inner").write_text("i")
            want = treeops.snapshot(upper)
            while treeops.snapshot(mirror) != want and time.monotonic() < deadline:
                time.sleep(0.2)
            assert treeops.snapshot(mirror) == want
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "journal" in out
    assert (root / "carol" / "upper-sync.index").is_file()


def test_an_entry_that_cannot_be_copied_is_counted_and_retried(tmp_path: Path, overlay_ok: None,
                                                               caplog) -> None:
    import subprocess

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    # The store's disk is too small for one file: that one fails, the rest syncs.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "labvm-test", str(store)],
                   check=True)
    try:
        with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
            (mnt / "small").write_text("s")
            (mnt / "d").mkdir()
            (mnt / "d" / "big").write_bytes(os.urandom(3 << 20))
            (mnt / "d" / "also").write_text("a")
            syncer = UpperSync(upper, store / "upper-sync")
            first = syncer.sync()
            assert first.errors == 1 and first.failed == ["d/big"]
            assert "d/big" in caplog.text and "No space left" in caplog.text
            assert (store / "upper-sync" / "small").read_text() == "s"
            assert (store / "upper-sync" / "d" / "also").read_text() == "a"
            # Nothing changed in the upper, yet the next (journaled) pass tries it again.
            subprocess.run(["mount", "-o", "remount,size=16m", str(store)], check=True)
            second = syncer.sync()
            assert not second.rescan and second.errors == 0 and second.copied == 1
            syncer.close()
            _check(upper, store / "upper-sync")
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_journal_past_its_watch_limit_gives_up_and_syncs_rescan(tmp_path: Path,
                                                                  overlay_ok: None) -> None:
    from labvm_spawner.storage.journal import ChangeJournal

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        for i in range(6):
            (mnt / f"d{i}").mkdir()
        syncer = UpperSync(upper, tmp_path / "store" / "upper-sync")
        syncer.journal.close()
        syncer.journal = ChangeJournal(upper, max_watches=4)  # one user, many directories
        assert syncer.journal.gave_up and syncer.journal._watches == {}
        syncer.sync()
        (mnt / "d3" / "f").write_text("f")
        assert syncer.sync().rescan  # still synced, by rescans
        syncer.close()
    _check(upper, tmp_path / "store" / "upper-sync")


def test_hard_linked_symlinks_stay_one_inode(tmp_path: Path, overlay_ok: None) -> None:
    # Found by test_sync_matches_upper: only regular files kept their link groups.
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    with treeops.overlay(lower, upper, tmp_path / "work", tmp_path / "m") as mnt:
        for o in [("write", "a", b""), ("symlink", "a", "c"), ("link", "c", "b"),
                  ("mkfifo", "f"), ("link", "f", "g")]:
            treeops.apply_op(mnt, o)
        for journal in (False, True):
            mirror = tmp_path / f"store-{journal}" / "upper-sync"
            mirror.parent.mkdir()
            syncer = UpperSync(upper, mirror, journal=journal)
            syncer.sync()
            syncer.close()
            _check(upper, mirror)


def test_a_long_pass_reports_its_progress(tmp_path: Path, overlay_ok: None, monkeypatch) -> None:
    import subprocess
    import sys

    from labvm_spawner.storage import sync as sync_module
    from labvm_spawner.storage.store import open_store

    monkeypatch.setattr(sync_module, "_REPORT_S", 0.0)
    upper = tmp_path / "upper"
    for d in range(20):
        (upper / f"d{d}").mkdir(parents=True)
        for f in range(300):  # slices of a big directory run on several workers
            (upper / f"d{d}" / f"f{f}").write_bytes(b"x" * 100)
    seen: list[dict] = []
    syncer = UpperSync(upper, tmp_path / "store" / "upper-sync", journal=False,
                       workers=4, progress=seen.append)
    stats = syncer.sync()
    syncer.close()
    assert stats.copied == 6000 and stats.errors == 0
    assert len(seen) > 10
    copied = [p["copied"] for p in seen]
    assert copied == sorted(copied) and copied[-1] > 0 and seen[-1]["bytes"] > 0
    assert all(p["seen"] <= 6020 for p in seen)
    _check(upper, tmp_path / "store" / "upper-sync")
    # The store keeps the last report for the admin pages, while it is fresh.
    store = open_store(tmp_path / "store2")
    store.record_progress("alice", seen[-1])
    assert store.sync_progress("alice")["copied"] == seen[-1]["copied"]
    store.clear_progress("alice")
    assert store.sync_progress("alice") is None
    # labvm storage sync prints it: plain lines when not on a terminal.
    env = dict(__import__("os").environ, LABVM_SYNC_REPORT_S="0")
    r = subprocess.run([sys.executable, "-m", "labvm_spawner.cli", "storage", "sync", "--store",
                        str(tmp_path / "store3"), "--upper", str(upper), "--key", "bob"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "syncing: " in r.stderr and "entries" in r.stderr and "/s" in r.stderr


def test_first_sync_keeps_every_mode_whatever_the_umask(tmp_path: Path) -> None:
    """New files are created with their final mode where the umask allows; whatever the
    process's umask, every mode (set-id and sticky bits included) arrives as it was."""
    modes = [0o644, 0o600, 0o000, 0o777, 0o4755, 0o2750, 0o1777, 0o640, 0o755, 0o444]
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    for i, mode in enumerate(modes):
        f = upper / "d" / f"f{i}"
        f.write_bytes(b"x" * i)
        os.chown(f, 1000 + i, 1000)
        os.chmod(f, mode)
    for umask in (0o022, 0o077, 0o000, 0o002):
        mirror = tmp_path / f"store{umask:o}" / "upper-sync"
        mirror.parent.mkdir()
        old = os.umask(umask)
        try:
            syncer = UpperSync(upper, mirror, journal=False, workers=2)
            stats = syncer.sync()
            syncer.close()
        finally:
            os.umask(old)
        assert stats.errors == 0
        for i, mode in enumerate(modes):
            got = os.lstat(mirror / "d" / f"f{i}")
            assert (stat.S_IMODE(got.st_mode), got.st_uid) == (mode, 1000 + i), (umask, i)
        _check(upper, mirror)


def test_a_file_deleted_while_it_is_copied_is_let_go(tmp_path: Path) -> None:
    """A user removes a big file to free room while the sync reads it: the copy stops
    within a chunk (its descriptor alone was keeping the blocks) and says the file went."""
    src, dst = tmp_path / "big", tmp_path / "copy"
    fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.write(fd, os.urandom(1 << 20) * 64)
    os.close(fd)
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        st_in = os.fstat(fd_in)
        src.unlink()  # what the user's rm does while the sync holds the file open
        with pytest.raises(FileNotFoundError) as e:
            fsops.copy_file_data(fd_in, fd_out, st_in)
        assert e.value.errno == errno.ENOENT
        assert os.fstat(fd_out).st_size < st_in.st_size // 4
    finally:
        os.close(fd_in)
        os.close(fd_out)
