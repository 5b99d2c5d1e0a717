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

The upper belongs to the container's root, who may reshape it while we copy, and
the copy holds the user's symlinks too. So both trees are entered only through
``safepath``: every directory is reached from a descriptor without following a
symlink, and a name that is not what we expected (a symlink where a directory
was) is a change to read again, never a path to follow. An entry that cannot be
copied is logged, counted in the stats and retried at the next pass; the sync
itself goes on.

Each entry is written under a temporary name and renamed into place, so a crash
leaves every path old or new; the next (rescan) sync and ``fsck`` clean up.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import fsops, safepath
from .crash import crashpoint
from .journal import ChangeJournal
from .mounts import is_fuse
from .safepath import Parts
from .store import TMP_PREFIX
from .treecopy import FdBudget, default_workers, hand_down, run_parallel

log = logging.getLogger(__name__)

# Errors logged one by one per pass; the rest only counted.
_LOGGED = 20
# Entries of one directory per task (a directory of 5,000 files keeps every worker busy).
_SLICE = 256
_REPORT_S = float(os.environ.get("LABVM_SYNC_REPORT_S", "2"))  # between progress reports


class Node:
    """What the index knows of one upper entry: inode and ctime as last copied, and for
    a directory its entries (so dropping a directory drops its subtree at once)."""

    __slots__ = ("ino", "ctime", "kids")

    def __init__(self, ino: int = 0, ctime: int = 0, kids: dict[str, Node] | None = None):
        self.ino, self.ctime, self.kids = ino, ctime, kids

    def child(self, name: str) -> Node | None:
        return self.kids.get(name) if self.kids is not None else None

    def dir(self, name: str) -> Node:
        """The directory record ``name`` below this one, made (empty) if needed."""
        assert self.kids is not None
        node = self.kids.get(name)
        if node is None or node.kids is None:
            node = self.kids[name] = Node(kids={})
        return node


class Index:
    """The sync's record of the upper as last copied, as a tree of ``Node``."""

    def __init__(self) -> None:
        self.root = Node(kids={})

    def find(self, parts: Parts) -> Node | None:
        node: Node | None = self.root
        for name in parts:
            node = node.child(name) if node is not None else None
        return node

    def dir(self, parts: Parts) -> Node:
        node = self.root
        for name in parts:
            node = node.dir(name)
        return node

    def paths(self) -> dict[str, tuple[int, int]]:
        """Every recorded path ("a/b") with its (inode, ctime); for tests and tools."""
        out: dict[str, tuple[int, int]] = {}
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            rel, node = stack.pop()
            for name, kid in (node.kids or {}).items():
                path = f"{rel}/{name}" if rel else name
                out[path] = (kid.ino, kid.ctime)
                if kid.kids is not None:
                    stack.append((path, kid))
        return out

    def __contains__(self, rel: str) -> bool:
        return self.find(safepath.split(rel)) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Index) and self.paths() == other.paths()

    # Saved as rows [parent row, name, inode, ctime, is_dir] in walk order (row 0 is
    # the root): flat, so any depth loads without recursion.
    def dump(self) -> dict[str, Any]:
        rows: list[list[Any]] = []
        stack: list[tuple[int, Node]] = [(0, self.root)]
        while stack:
            parent, node = stack.pop()
            for name, kid in (node.kids or {}).items():
                rows.append([parent, name, kid.ino, kid.ctime, kid.kids is not None])
                if kid.kids is not None:
                    stack.append((len(rows), kid))
        return {"v": 2, "rows": rows}

    @classmethod
    def load(cls, data: Any) -> Index:
        """An index from ``dump()`` output; ValueError on anything malformed (the file
        lives in a store others can write, so every field is checked)."""
        index = cls()
        if not isinstance(data, dict) or data.get("v") != 2 or not isinstance(
                data.get("rows"), list):
            raise ValueError("not an index")
        nodes = [index.root]
        for row in data["rows"]:
            if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], int)
                    and isinstance(row[1], str) and type(row[2]) is int
                    and type(row[3]) is int and isinstance(row[4], bool)):
                raise ValueError("bad index row")
            parent = nodes[row[0]] if 0 <= row[0] < len(nodes) else None
            if parent is None or parent.kids is None:
                raise ValueError("bad index parent")
            node = Node(row[2], row[3], {} if row[4] else None)
            parent.kids[safepath.check_name(row[1])] = node
            nodes.append(node)
        return index


@dataclass
class SyncStats:
    copied: int = 0
    deleted: int = 0
    dirs: int = 0
    dir_meta: int = 0
    errors: int = 0
    quota_errors: int = 0  # of those, refused by the store's quota (EDQUOT)
    rescan: bool = False
    failed: list[str] = field(default_factory=list)  # the first few paths that failed
    seen: int = 0  # entries listed by a full comparison so far
    bytes: int = 0  # bytes of the files copied
    started: float = field(default_factory=time.monotonic)

    def progress(self) -> dict[str, float]:
        """How far a pass is: entries seen and copied, bytes, rate and a rough ETA (the
        entries seen so far are the best guess of the total while directories are listed)."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = self.copied + self.dirs
        rate = done / elapsed
        left = max(self.seen - done, 0)
        return {"seen": self.seen, "copied": done, "bytes": self.bytes, "elapsed_s": elapsed,
                "rate": rate, "eta_s": left / rate if rate > 0 else float("inf")}

    @property
    def changed(self) -> int:
        return self.copied + self.deleted + self.dirs + self.dir_meta

    def __str__(self) -> str:
        how = "rescan" if self.rescan else "journal"
        errors = f", {self.errors} errors" if self.errors else ""
        return f"{self.copied} copied, {self.deleted} deleted, {self.dirs} dirs ({how}){errors}"


class _Pass:
    """One sync pass over (upper, mirror), opened as descriptors."""

    def __init__(self, sync: UpperSync, upper: int, mirror: int, stats: SyncStats) -> None:
        self.s, self.upper, self.mirror, self.stats = sync, upper, mirror, stats
        self.lock = threading.Lock()
        self._reported = time.monotonic()

    def report(self) -> None:
        """Tell the pass's ``progress`` callback how far it is, every few seconds."""
        if self.s.progress is None or time.monotonic() - self._reported < _REPORT_S:
            return
        with self.lock:
            if time.monotonic() - self._reported < _REPORT_S:
                return
            self._reported = time.monotonic()
            now = self.stats.progress()
        try:
            self.s.progress(now)
        except Exception:  # noqa: BLE001 - a progress display never stops a sync
            log.exception("sync progress callback failed")

    # ---- failures ----------------------------------------------------------------
    def failed(self, parts: Parts, e: OSError) -> None:
        """Count and log an entry that could not be synced; the next pass retries it."""
        with self.lock:
            self.s.retry.add(parts)
            if safepath.changed(e):
                return  # it changed while we looked: not an error, just read it again
            self.stats.errors += 1
            if e.errno == errno.EDQUOT:
                self.stats.quota_errors += 1
            if len(self.stats.failed) < _LOGGED:
                self.stats.failed.append(safepath.show(parts))
                log.warning("sync of %s: cannot copy %s: %s", self.s.upper,
                            safepath.show(parts), e.strerror or e)

    # ---- one entry ---------------------------------------------------------------
    def delete(self, m: int, name: str, parent: Node) -> None:
        if safepath.remove(m, name):
            with self.lock:
                self.stats.deleted += 1
            crashpoint("sync.deleted")
        with self.lock:
            if parent.kids is not None:
                parent.kids.pop(name, None)

    def make_dir(self, m: int, name: str, mst: os.stat_result | None, parent: Node) -> bool:
        """Make the mirror's ``name`` a directory; True when it was (re)created."""
        if mst is not None and stat.S_ISDIR(mst.st_mode):
            parent.dir(name)
            return False
        if mst is not None:
            self.delete(m, name, parent)
        os.mkdir(name, 0o700, dir_fd=m)
        with self.lock:
            assert parent.kids is not None
            parent.kids[name] = Node(kids={})
            self.stats.dirs += 1
        crashpoint("sync.dir_created")
        return True

    def differs(self, u: int, m: int, name: str, st: os.stat_result,
                mst: os.stat_result, known: Node | None) -> bool:
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(mst.st_mode):
            return True
        if known is not None and known.ino:
            return (known.ino, known.ctime) != (st.st_ino, st.st_ctime_ns)
        # No record (first run on an existing copy): compare what a copy keeps.
        if (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev) != (
                mst.st_mode, mst.st_uid, mst.st_gid, mst.st_size, mst.st_rdev):
            return True
        # The upper's mtime at the mirror's precision: MooseFS keeps whole seconds. A
        # mirror that keeps nanoseconds must match to the nanosecond, or a copy killed
        # between its bytes and its times (its mtime: the second it was written) looks done.
        mtime = st.st_mtime_ns if mst.st_mtime_ns % 10**9 else st.st_mtime_ns // 10**9 * 10**9
        if mtime != mst.st_mtime_ns:
            return True
        if safepath.read_xattrs(u, name) != safepath.read_xattrs(m, name):
            return True
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(name, dir_fd=u) != os.readlink(name, dir_fd=m)
        return False

    def copy(self, u: int, m: int, name: str, parts: Parts, st: os.stat_result,
             parent: Node, direct: bool = False) -> None:
        """Copy the non-directory ``name`` from upper dir ``u`` to mirror dir ``m``; with
        ``direct``, straight to its name (nothing is there, and no reader looks yet)."""
        if direct:
            try:
                copied = fsops.copy_entry(u, name, m, name, st)
            except OSError as e:
                if e.errno != errno.EEXIST:  # a part-written file (a full store) goes
                    _unlink_quiet(m, name)
                raise
            crashpoint("sync.written_in_place")
            self._copied(parent, name, copied)
            return
        tmp = f"{TMP_PREFIX}{secrets.token_hex(6)}"
        group = None
        try:
            if _linked(st):
                group, copied = self._link_or_copy(u, m, name, parts, st, tmp)
            else:
                copied = fsops.copy_entry(u, name, m, tmp, st)
        except OSError:
            _unlink_quiet(m, tmp)
            raise
        crashpoint("sync.tmp_written")
        self._rename_into_place(m, tmp, name, parent)
        crashpoint("sync.renamed")
        self._copied(parent, name, copied)
        if group is not None:
            self._relink_group(group, parts, m, name, copied)

    def _copied(self, parent: Node, name: str, copied: os.stat_result) -> None:
        """Record a copy in the index (it is in place by now) and in the stats."""
        with self.lock:
            assert parent.kids is not None
            parent.kids[name] = Node(copied.st_ino, copied.st_ctime_ns)
            self.stats.copied += 1
            self.stats.bytes += copied.st_size

    def _link_or_copy(self, u: int, m: int, name: str, parts: Parts, st: os.stat_result,
                      tmp: str) -> tuple[set[Parts], os.stat_result]:
        group = self.s.links.setdefault(st.st_ino, set())
        for other in group:
            if other == parts:
                continue
            known = self.s.index.find(other)
            if known is None or (known.ino, known.ctime) != (st.st_ino, st.st_ctime_ns):
                continue
            try:  # same inode, content already current: link to that copy
                sm = safepath.open_dir(self.mirror, other[:-1])
            except OSError:
                continue
            try:
                os.link(other[-1], tmp, src_dir_fd=sm, dst_dir_fd=m, follow_symlinks=False)
                return group, st
            except OSError:
                continue
            finally:
                os.close(sm)
        return group, fsops.copy_entry(u, name, m, tmp, st)

    def _rename_into_place(self, m: int, tmp: str, name: str, parent: Node) -> None:
        try:
            _replace(m, tmp, name)
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                _unlink_quiet(m, tmp)
                raise
            # A directory is in the way: it goes, with what the index had below it.
            self.delete(m, name, parent)
            os.rename(tmp, name, src_dir_fd=m, dst_dir_fd=m)

    def _relink_group(self, group: set[Parts], parts: Parts, m: int, name: str,
                      copied: os.stat_result) -> None:
        """The other names of this inode share its (possibly new) content."""
        group.add(parts)
        for other in list(group):
            if other == parts:
                continue
            try:
                uo = safepath.open_dir(self.upper, other[:-1])
            except OSError:
                group.discard(other)
                continue
            try:
                ost = safepath.lstat_or_none(uo, other[-1])
                if ost is None or ost.st_ino != copied.st_ino:
                    group.discard(other)
                    continue
                try:
                    mo = safepath.open_dir(self.mirror, other[:-1])
                except OSError:
                    continue  # its directory is new: synced with it
                try:
                    t2 = f"{TMP_PREFIX}{secrets.token_hex(6)}"
                    os.link(name, t2, src_dir_fd=m, dst_dir_fd=mo, follow_symlinks=False)
                    _replace(mo, t2, other[-1])
                    node = self.s.index.dir(other[:-1])
                    assert node.kids is not None
                    node.kids[other[-1]] = Node(ost.st_ino, ost.st_ctime_ns)
                    if other[:-1] != parts[:-1]:
                        # That directory may be done already: its times are the upper's again.
                        self.dir_meta(uo, mo, node)
                except OSError as e:
                    self.failed(other, e)
                finally:
                    os.close(mo)
            finally:
                os.close(uo)

    def entry(self, u: int, m: int, name: str, parts: Parts, parent: Node) -> None:
        """Bring the mirror's ``name`` in line with the upper's, not descending."""
        try:
            st = safepath.lstat(u, name)
        except (FileNotFoundError, NotADirectoryError):
            self.delete(m, name, parent)
            return
        mst = safepath.lstat_or_none(m, name)
        if stat.S_ISDIR(st.st_mode):
            if self.make_dir(m, name, mst, parent):
                with self.lock:  # new here: what is inside comes with the next pass
                    self.s.retry.add(parts)
            return
        if _linked(st):
            self.s.links.setdefault(st.st_ino, set()).add(parts)
        if mst is None or self.differs(u, m, name, st, mst, parent.child(name)):
            self.copy(u, m, name, parts, st, parent)

    def dir_meta(self, u: int, m: int, node: Node) -> None:
        """The upper directory ``u``'s owner, mode, xattrs and times onto mirror dir ``m``."""
        st = os.fstat(u)
        fsops.apply_meta_fd(m, st, safepath.read_xattrs(u), replace_xattrs=True)
        with self.lock:
            node.ino, node.ctime = st.st_ino, st.st_ctime_ns
            self.stats.dir_meta += 1

    # ---- trees -------------------------------------------------------------------
    def tree(self, u: int, m: int, node: Node, top: Parts) -> None:
        """Full comparison of upper dir ``u`` (at ``top``) and mirror dir ``m``, below.

        Directories are compared on a pool of ``workers`` threads, big ones in slices,
        each task holding descriptors of its own directory. What must stay in order runs
        after: hard link groups, then every directory's metadata, deepest first (creating
        entries changes a directory's times).
        """
        budget = FdBudget()
        dirs: list[tuple[Parts, Node]] = []
        linked: list[Parts] = []
        lock = self.lock

        def visit(task: object) -> list[object]:
            kind, fds, parts, here, new = task[:5]  # type: ignore[index]
            if fds is not None:
                budget.give(len(fds))  # handed down: this task holds them now
            else:
                try:
                    fds = (safepath.open_dir(self.upper, parts),
                           safepath.open_dir(self.mirror, parts))
                except OSError as e:
                    self.failed(parts, e)
                    return []
            ufd, mfd = fds
            try:
                if kind == "files":
                    self._files(ufd, mfd, parts, here, task[5], task[6], new)  # type: ignore[index]
                    return []
                return self._listing(ufd, mfd, parts, here, new, budget, dirs, linked, lock)
            finally:
                os.close(ufd)
                os.close(mfd)

        with lock:
            dirs.append((top, node))
        budget.take(2)
        first = ("dir", (os.dup(u), os.dup(m)), top, node, False)
        run_parallel([first], visit, self.s.workers, budget.drop)
        for parts in linked:  # link groups share state: one by one
            pair = self.parents(parts)
            if pair is None:
                continue
            pu, pm = pair
            try:
                self.entry(pu, pm, parts[-1], parts, self.s.index.dir(parts[:-1]))
            except OSError as e:
                self.failed(parts, e)
            finally:
                os.close(pu)
                os.close(pm)
        dirs.sort(key=lambda d: -len(d[0]))
        batches = [dirs[i:i + 64] for i in range(0, len(dirs), 64)]
        run_parallel(batches, self._metas, self.s.workers)

    def _metas(self, batch: object) -> list[object]:
        for parts, node in batch:  # type: ignore[attr-defined]
            pair = self.pair(parts)
            if pair is None:
                continue
            try:
                self.dir_meta(pair[0], pair[1], node)
            except OSError as e:
                self.failed(parts, e)
            finally:
                os.close(pair[0])
                os.close(pair[1])
        return []

    def _listing(self, ufd: int, mfd: int, parts: Parts, here: Node, new: bool,
                 budget: FdBudget, dirs: list, linked: list, lock: threading.Lock
                 ) -> list[object]:
        """Compare one directory; returns the tasks for its subdirectories and slices."""
        try:
            wanted = safepath.scandir(ufd)
            present = {} if new else safepath.scandir(mfd)
        except OSError as e:
            self.failed(parts, e)
            return []
        with lock:
            self.stats.seen += len(wanted)
        for name in present.keys() - wanted.keys():
            try:
                self.delete(mfd, name, here)
            except OSError as e:
                self.failed((*parts, name), e)
        tasks: list[object] = []
        files: list[tuple[str, os.stat_result]] = []
        for name, st in wanted.items():
            child = (*parts, name)
            try:
                if stat.S_ISDIR(st.st_mode):
                    created = self.make_dir(mfd, name, present.get(name), here)
                    sub = here.dir(name)
                    with lock:
                        dirs.append((child, sub))
                    tasks.append(("dir", hand_down([ufd, mfd], name, budget), child, sub,
                                  created))
                elif _linked(st):
                    with lock:
                        self.s.links.setdefault(st.st_ino, set()).add(child)
                        linked.append(child)
                else:
                    files.append((name, st))
            except OSError as e:
                self.failed(child, e)
        # Big directories in slices, so that one of them keeps every worker busy.
        for i in range(0, len(files), _SLICE):
            chunk = files[i:i + _SLICE]
            if i + _SLICE >= len(files):  # the last slice: here, with these descriptors
                self._files(ufd, mfd, parts, here, chunk, present, new)
            else:
                fds = [os.dup(ufd), os.dup(mfd)] if budget.take(2) else None
                tasks.append(("files", fds, parts, here, new, chunk, present))
        return tasks

    def _files(self, ufd: int, mfd: int, parts: Parts, here: Node,
               files: list[tuple[str, os.stat_result]], present: dict[str, os.stat_result],
               new: bool) -> None:
        for name, st in files:
            child = (*parts, name)
            try:
                mst = present.get(name)
                if mst is None or self.differs(ufd, mfd, name, st, mst, here.child(name)):
                    # In a directory made in this pass no reader sees a half-copied file:
                    # write it in place (a sparse one still goes through a temp name).
                    direct = new and st.st_blocks * 512 >= st.st_size
                    self.copy(ufd, mfd, name, child, st, here, direct=direct)
            except OSError as e:
                self.failed(child, e)
            self.report()

    def pair(self, parts: Parts) -> tuple[int, int] | None:
        """The directory ``parts`` in the upper and in the mirror; None (counted, retried)
        when either is not one."""
        try:
            u = safepath.open_dir(self.upper, parts)
        except OSError as e:
            self.failed(parts, e)
            return None
        try:
            return u, safepath.open_dir(self.mirror, parts)
        except OSError as e:
            os.close(u)
            self.failed(parts, e)
            return None

    def subtree(self, parts: Parts, parent: Node) -> None:
        """Full comparison of the directory ``parts`` (both parents resolve), with its meta."""
        pair = self.pair(parts)
        if pair is None:
            return
        u, m = pair
        try:
            node = parent.dir(parts[-1]) if parts else self.s.index.root
            self.tree(u, m, node, parts)  # with the directory's own metadata
        except OSError as e:
            self.failed(parts, e)
        finally:
            os.close(u)
            os.close(m)

    def parents(self, parts: Parts) -> tuple[int, int] | None:
        """Both trees' directories holding ``parts[-1]``, when both are what the index
        expects; else the first component that is not is synced as a change of its own
        (a symlink or file now where a directory was, in either tree) and None returned."""
        try:
            u = safepath.open_dir(self.upper, parts[:-1])
        except OSError as e:
            if not safepath.changed(e):
                raise
            u = -1
        if u >= 0:
            try:
                return u, safepath.open_dir(self.mirror, parts[:-1])
            except OSError as e:
                os.close(u)
                if not safepath.changed(e):
                    raise
        self.reconcile_ancestors(parts)
        return None

    def reconcile_ancestors(self, parts: Parts) -> None:
        u, m = os.dup(self.upper), os.dup(self.mirror)
        node = self.s.index.root
        try:
            for i, name in enumerate(parts[:-1]):
                try:
                    nu = safepath.open_child(u, name)
                except OSError as e:
                    if not safepath.changed(e):
                        raise
                    self.entry(u, m, name, parts[:i + 1], node)
                    return
                try:
                    nm = safepath.open_child(m, name)
                except OSError as e:
                    os.close(nu)
                    if not safepath.changed(e):
                        raise
                    self.entry(u, m, name, parts[:i + 1], node)  # now a directory
                    self.subtree(parts[:i + 1], node)
                    return
                os.close(u)
                os.close(m)
                u, m = nu, nm
                node = node.dir(name)
        finally:
            os.close(u)
            os.close(m)


def _linked(st: os.stat_result) -> bool:
    """A member of a hard link group the copy must keep (of any type but a directory), not
    one of overlay's whiteouts, which all share one inode and are copied one by one."""
    return st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and not fsops.is_char_whiteout(st)


def _replace(dirfd: int, tmp: str, dst: str) -> None:
    """rename(2), minding that renaming onto another link of the same inode is a no-op."""
    os.rename(tmp, dst, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    a, b = safepath.lstat_or_none(dirfd, tmp), safepath.lstat_or_none(dirfd, dst)
    if a is not None and b is not None and os.path.samestat(a, b):
        os.unlink(tmp, dir_fd=dirfd)


def _unlink_quiet(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def _depth_first(parts: Parts) -> tuple[int, Parts]:
    return (len(parts), parts)


class UpperSync:
    """Keeps ``mirror`` a faithful copy of the upper directory ``upper``."""

    def __init__(self, upper: str | os.PathLike[str], mirror: str | os.PathLike[str],
                 journal: bool = True, workers: int | None = None,
                 progress: Callable[[dict[str, float]], None] | None = None) -> None:
        self.upper = os.fspath(upper)
        self.mirror = os.fspath(mirror)
        # Full comparisons run on a pool: on MooseFS every call is a round trip.
        self.workers = workers or int(os.environ.get("LABVM_SYNC_WORKERS") or 0) or \
            default_workers(os.path.dirname(self.mirror) or ".")
        # A journaled batch's files go to the pool from this many on: on MooseFS a file
        # costs several 1 ms round trips, on a local disk threads pay only for big batches
        # (measured: 100 changes took 22-26 ms alone, 30-32 ms on 4 threads).
        self.batch_pool_min = 4 if is_fuse(os.path.dirname(self.mirror) or ".") else 1024
        self.progress = progress  # called every few seconds of a pass with stats.progress()
        self.index_file = self.mirror.rstrip("/") + ".index"
        self._born = time.time()
        self.index = self._load_index()
        # inode -> paths, only for regular files with more than one link
        self.links: dict[int, set[Parts]] = {}
        # paths that failed or changed under the last pass: looked at again in the next
        self.retry: set[Parts] = set()
        self.journal = ChangeJournal(self.upper) if journal else None
        self._need_rescan = True
        self.last = SyncStats()

    # ---- index -------------------------------------------------------------------
    def _load_index(self) -> Index:
        # Plain JSON, never pickle: on a store shared by nodes, loading a pickle would
        # let whoever can write the store run code on every node that syncs.
        try:
            with open(self.index_file, encoding="utf-8") as f:
                return Index.load(json.load(f))
        except (OSError, ValueError):
            return Index()

    def save_index(self) -> None:
        tmp = f"{self.index_file}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.index.dump(), f, separators=(",", ":"))
        crashpoint("sync.index_written")
        os.replace(tmp, self.index_file)
        self._drop_dead_index_tmps()

    def _drop_dead_index_tmps(self) -> None:
        # A sync killed while saving leaves its temp file; one last written before this
        # syncer existed has no live writer (one syncer per key), so it goes now rather
        # than waiting for an fsck.
        d, base = os.path.split(self.index_file)
        prefix = base + "."
        try:
            names = [n for n in os.listdir(d or ".") if n.startswith(prefix) and n.endswith(".tmp")]
        except OSError:
            return
        for n in names:
            p = os.path.join(d, n)
            try:
                if os.lstat(p).st_mtime < self._born:
                    os.unlink(p)
            except OSError:
                pass

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.save_index()

    # ---- passes ------------------------------------------------------------------
    def rescan(self) -> SyncStats:
        return self._run(None)

    def sync(self) -> SyncStats:
        """Bring the mirror up to date with the upper as it is now."""
        changes = self.journal.take() if self.journal is not None else None
        if changes is None or changes.rescan or self._need_rescan:
            stats = self._run(None)
            self._need_rescan = self.journal is None
        else:
            trees = changes.trees | self.retry
            stats = self._run(changes.paths | trees, trees)
        crashpoint("sync.done")
        return stats

    def _run(self, paths: set[Parts] | None, trees: set[Parts] | None = None) -> SyncStats:
        stats = SyncStats(rescan=paths is None)
        self.retry = set()
        fsops.refresh_umask()
        upper = safepath.open_root(self.upper)
        try:
            os.makedirs(os.path.dirname(self.mirror) or ".", exist_ok=True)
            mirror = safepath.open_root(self.mirror, create=True)
            try:
                p = _Pass(self, upper, mirror, stats)
                if paths is None:
                    p.subtree((), self.index.root)
                    crashpoint("sync.rescanned")
                else:
                    self._journaled(p, paths, trees or set())
            finally:
                os.close(mirror)
        finally:
            os.close(upper)
        self.last = stats
        return stats

    def _journaled(self, p: _Pass, paths: set[Parts], trees: set[Parts]) -> None:
        metas: set[Parts] = set()
        files: list[Parts] = []
        for parts in sorted(paths, key=_depth_first):
            metas.add(parts[:-1])  # writing in a directory changes its times: reset them
            if not parts:
                metas.add(parts)
                continue
            try:
                pair = p.parents(parts)
                if pair is None:
                    continue  # handled as a change of an ancestor
                u, m = pair
                try:
                    parent = self.index.dir(parts[:-1])
                    st = safepath.lstat_or_none(u, parts[-1])
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        mst = safepath.lstat_or_none(m, parts[-1])
                        created = p.make_dir(m, parts[-1], mst, parent)
                        if created or parts in trees:
                            p.subtree(parts, parent)
                        else:
                            metas.add(parts)
                    elif st is None or (_linked(st)):
                        p.entry(u, m, parts[-1], parts, parent)  # link groups: in order
                    else:
                        files.append(parts)
                finally:
                    os.close(u)
                    os.close(m)
            except OSError as e:
                p.failed(parts, e)
        # Plain entries are independent: copy them in parallel (syscall-bound).
        if len(files) >= self.batch_pool_min and self.workers > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for _ in pool.map(lambda parts: self._one_file(p, parts), files):
                    pass
        else:
            for parts in files:
                self._one_file(p, parts)
        for parts in sorted(metas, key=lambda x: -len(x)):
            pair = p.pair(parts)
            if pair is None:
                continue
            u, m = pair
            try:
                p.dir_meta(u, m, self.index.dir(parts))
            except OSError as e:
                p.failed(parts, e)
            finally:
                os.close(u)
                os.close(m)

    def _one_file(self, p: _Pass, parts: Parts) -> None:
        try:
            pair = p.parents(parts)
            if pair is None:
                return
            u, m = pair
            try:
                with p.lock:
                    parent = self.index.dir(parts[:-1])
                p.entry(u, m, parts[-1], parts, parent)
            finally:
                os.close(u)
                os.close(m)
        except OSError as e:
            p.failed(parts, e)
