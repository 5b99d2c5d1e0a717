"""Copy a live overlay upper into the store, keeping everything overlay needs.

The copy (``<store>/<key>/upper-sync``) keeps trusted.overlay.* xattrs, whiteouts,
opaque directories, hard link groups, symlinks, holes, fifos and device nodes, so
it can be merged later exactly like the upper itself. Whiteouts are made one by
one: overlay hard-links all its whiteouts to one inode, which must not become one
huge hard link group in the store.

Cost follows the changed paths: a ``ChangeJournal`` (inotify) names them. The
first sync, one after a journal overflow and every sync without a journal do a
full rescan, which skips entries whose upper inode and ctime match the index of
the last sync (kept in memory and saved beside the copy on close).

Each entry is written under a temporary name and renamed into place, so a crash
leaves every path old or new; the next (rescan) sync and ``fsck`` clean up.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import fsops
from .crash import crashpoint
from .journal import ChangeJournal
from .store import TMP_PREFIX

# path -> (inode, ctime_ns) of the upper entry as last copied
Index = dict[str, tuple[int, int]]


@dataclass
class SyncStats:
    copied: int = 0
    deleted: int = 0
    dirs: int = 0
    dir_meta: int = 0
    rescan: bool = False

    @property
    def changed(self) -> int:
        return self.copied + self.deleted + self.dirs + self.dir_meta

    def __str__(self) -> str:
        how = "rescan" if self.rescan else "journal"
        return f"{self.copied} copied, {self.deleted} deleted, {self.dirs} dirs ({how})"


def _replace(tmp: str, dst: str) -> None:
    """rename(2), minding that renaming onto another link of the same inode is a no-op."""
    os.rename(tmp, dst)
    try:
        if os.path.samestat(os.lstat(tmp), os.lstat(dst)):
            os.unlink(tmp)
    except FileNotFoundError:
        pass


class UpperSync:
    """Keeps ``mirror`` a faithful copy of the upper directory ``upper``."""

    def __init__(self, upper: str | Path, mirror: str | Path, journal: bool = True) -> None:
        self.upper = os.fspath(upper)
        self.mirror = os.fspath(mirror)
        self.index_file = self.mirror.rstrip("/") + ".index"
        self.index: Index = self._load_index()
        # inode -> paths, only for regular files with more than one link
        self.links: dict[int, set[str]] = {}
        self.journal = ChangeJournal(self.upper) if journal else None
        self._need_rescan = True
        self._lock = threading.Lock()  # stats and link groups, updated from copy threads

    # ---- index -----------------------------------------------------------------
    def _load_index(self) -> Index:
        # Plain JSON, never pickle: on a store shared by nodes, loading a pickle would
        # let whoever can write the store run code on every node that syncs.
        try:
            with open(self.index_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        index: Index = {}
        for path, entry in data.items():
            if (isinstance(path, str) and isinstance(entry, list) and len(entry) == 2
                    and all(isinstance(x, int) for x in entry)):
                index[path] = (entry[0], entry[1])
        return index

    def save_index(self) -> None:
        tmp = f"{self.index_file}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.index, f, separators=(",", ":"))
        crashpoint("sync.index_written")
        os.replace(tmp, self.index_file)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.save_index()

    # ---- one entry ---------------------------------------------------------------
    def _u(self, rel: str) -> str:
        return os.path.join(self.upper, rel) if rel else self.upper

    def _m(self, rel: str) -> str:
        return os.path.join(self.mirror, rel) if rel else self.mirror

    def _forget(self, rel: str, was_dir: bool) -> None:
        """Drop index entries of ``rel`` (and, for a directory, of what the mirror had below)."""
        self.index.pop(rel, None)
        if was_dir:
            top = self._m(rel)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    self.index.pop(os.path.relpath(os.path.join(dirpath, name), self.mirror), None)

    def _delete(self, rel: str, stats: SyncStats) -> None:
        m = self._m(rel)
        try:
            is_dir = stat.S_ISDIR(os.lstat(m).st_mode)
        except (FileNotFoundError, NotADirectoryError):  # gone with a parent replaced
            self.index.pop(rel, None)
            return
        self._forget(rel, is_dir)
        fsops.remove_any(m)
        stats.deleted += 1
        crashpoint("sync.deleted")

    def _write_tmp(self, rel: str, st: os.stat_result, tmp: str) -> set[str] | None:
        """Write the new ``rel`` at ``tmp``; returns its hard link group, if any."""
        src = self._u(rel)
        xa = fsops.read_xattrs(src)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            group = self.links.setdefault(st.st_ino, set())
            sibling = next((p for p in group if p != rel and self.index.get(p, (0,))[0] == st.st_ino
                            and os.path.lexists(self._m(p))), None)
            if sibling is not None and self.index.get(sibling) == (st.st_ino, st.st_ctime_ns):
                os.link(self._m(sibling), tmp)  # same inode, content already current
            else:
                fsops.copy_entry(src, tmp, st, xa)
            return group
        fsops.copy_entry(src, tmp, st, xa)
        return None

    def _copy_nondir(self, rel: str, st: os.stat_result, stats: SyncStats) -> None:
        dst = self._m(rel)
        tmp = os.path.join(os.path.dirname(dst), f"{TMP_PREFIX}{secrets.token_hex(6)}")
        try:
            group = self._write_tmp(rel, st, tmp)
        except FileNotFoundError:
            # Deleted while we copied: the journal has (or the rescan finds) the deletion.
            if os.path.lexists(tmp):
                os.unlink(tmp)
            return
        crashpoint("sync.tmp_written")
        try:
            _replace(tmp, dst)
        except OSError:
            if not os.path.isdir(dst) or os.path.islink(dst):
                os.unlink(tmp)
                raise
            self._forget(rel, True)
            fsops.remove_tree(dst)
            os.rename(tmp, dst)
        crashpoint("sync.renamed")
        self.index[rel] = (st.st_ino, st.st_ctime_ns)
        with self._lock:
            stats.copied += 1
        if group is not None:
            group.add(rel)
            # The other names of this inode share its (possibly new) content.
            for other in list(group):
                if other == rel:
                    continue
                try:
                    ost = os.lstat(self._u(other))
                except FileNotFoundError:
                    group.discard(other)
                    continue
                if ost.st_ino != st.st_ino:
                    group.discard(other)
                    continue
                t2 = os.path.join(os.path.dirname(self._m(other)),
                                  f"{TMP_PREFIX}{secrets.token_hex(6)}")
                if os.path.isdir(os.path.dirname(t2)):
                    os.link(dst, t2)
                    _replace(t2, self._m(other))
                    self.index[other] = (ost.st_ino, ost.st_ctime_ns)

    def _copy_if_changed(self, rel: str, st: os.stat_result, stats: SyncStats) -> None:
        try:
            mst = os.lstat(self._m(rel))
        except FileNotFoundError:
            mst = None
        if mst is None or self._changed(rel, st, mst):
            self._copy_nondir(rel, st, stats)

    def _sync_dir_entry(self, rel: str, st: os.stat_result, stats: SyncStats) -> bool:
        """Make the mirror's ``rel`` a directory; True when it was (re)created."""
        m = self._m(rel)
        try:
            mst = os.lstat(m)
            if stat.S_ISDIR(mst.st_mode):
                return False
            os.unlink(m)
        except FileNotFoundError:
            pass
        os.mkdir(m, 0o700)
        self.index.pop(rel, None)
        stats.dirs += 1
        crashpoint("sync.dir_created")
        return True

    def _dir_meta(self, rel: str, stats: SyncStats) -> None:
        try:
            st = os.lstat(self._u(rel))
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) and os.path.isdir(self._m(rel)):
            fsops.apply_meta(self._m(rel), st, fsops.read_xattrs(self._u(rel)),
                             replace_xattrs=True)
            self.index[rel] = (st.st_ino, st.st_ctime_ns)
            stats.dir_meta += 1

    # ---- trees -------------------------------------------------------------------
    def _sync_tree(self, rel: str, stats: SyncStats, dirs_done: list[str]) -> None:
        """Full comparison of the upper's ``rel`` (a directory) with the mirror."""
        u = self._u(rel)
        wanted: dict[str, os.stat_result] = {}
        try:
            with os.scandir(u) as it:
                for e in it:
                    wanted[e.name] = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        m = self._m(rel)
        with os.scandir(m) as it:
            present = {e.name: e.stat(follow_symlinks=False) for e in it}
        for name in present:
            if name not in wanted:
                self._delete(os.path.join(rel, name) if rel else name, stats)
        for name, st in wanted.items():
            crel = os.path.join(rel, name) if rel else name
            mst = present.get(name)
            if stat.S_ISDIR(st.st_mode):
                if mst is None or not stat.S_ISDIR(mst.st_mode):
                    if mst is not None:
                        self._delete(crel, stats)
                    self._sync_dir_entry(crel, st, stats)
                self._sync_tree(crel, stats, dirs_done)
                continue
            if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                self.links.setdefault(st.st_ino, set()).add(crel)
            if mst is not None and not self._changed(crel, st, mst):
                continue
            self._copy_nondir(crel, st, stats)
        dirs_done.append(rel)

    def _changed(self, rel: str, st: os.stat_result, mst: os.stat_result) -> bool:
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(mst.st_mode):
            return True
        known = self.index.get(rel)
        if known is not None:
            return known != (st.st_ino, st.st_ctime_ns)
        # No record (first run on an existing copy): compare what a copy keeps.
        if (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev) != (
                mst.st_mode, mst.st_uid, mst.st_gid, mst.st_size, mst.st_rdev):
            return True
        if st.st_mtime_ns // 10**9 != mst.st_mtime_ns // 10**9:
            return True
        if fsops.read_xattrs(self._u(rel)) != fsops.read_xattrs(self._m(rel)):
            return True
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(self._u(rel)) != os.readlink(self._m(rel))
        return False

    def rescan(self) -> SyncStats:
        stats = SyncStats(rescan=True)
        os.makedirs(self.mirror, exist_ok=True)
        dirs_done: list[str] = []
        self._sync_tree("", stats, dirs_done)
        for rel in dirs_done:  # deepest first: os.walk order reversed
            self._dir_meta(rel, stats)
        crashpoint("sync.rescanned")
        return stats

    # ---- entry point -------------------------------------------------------------
    def sync(self) -> SyncStats:
        """Bring the mirror up to date with the upper as it is now."""
        changes = self.journal.take() if self.journal is not None else None
        if changes is None or changes.rescan or self._need_rescan:
            stats = self.rescan()
            self._need_rescan = self.journal is None
            crashpoint("sync.done")
            return stats
        stats = SyncStats()
        metas: set[str] = set()
        files: list[tuple[str, os.stat_result]] = []
        for rel in sorted(changes.paths | changes.trees, key=lambda p: (p.count("/"), p)):
            try:
                st = os.lstat(self._u(rel))
            except (FileNotFoundError, NotADirectoryError):
                self._delete(rel, stats)
                continue
            parent = os.path.dirname(rel)
            if rel and not os.path.isdir(self._m(parent)):
                continue  # its parent is new or gone: handled as part of the parent
            if stat.S_ISDIR(st.st_mode):
                created = self._sync_dir_entry(rel, st, stats)
                if created or rel in changes.trees:
                    done: list[str] = []
                    self._sync_tree(rel, stats, done)
                    metas.update(done)
                metas.add(rel)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                self._copy_if_changed(rel, st, stats)  # link groups share state: in order
            else:
                files.append((rel, st))
        # Plain entries are independent: copy them in parallel (syscall-bound).
        if len(files) > 4:
            with ThreadPoolExecutor(max_workers=8) as pool:
                for _ in pool.map(lambda a: self._copy_if_changed(a[0], a[1], stats), files):
                    pass
        else:
            for rel, st in files:
                self._copy_if_changed(rel, st, stats)
        for rel in sorted(metas, key=lambda p: -p.count("/")):
            self._dir_meta(rel, stats)
        crashpoint("sync.done")
        return stats
