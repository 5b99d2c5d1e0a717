"""Reading whole layer trees and making private copies of them, in parallel.

``scan_tree`` reads a tree (lstat and xattrs of everything) into memory;
``copy_tree`` makes an independent copy of a version directory:

* On MooseFS a snapshot (``mfsmakesnapshot``) copies only metadata; chunks are
  shared copy-on-write, so writing the copy never changes the original.
  Snapshots do not keep hard links, so groups are re-linked afterwards.
* Elsewhere the copy is made here, in this process, so that no child process
  can outlive a killed commit and go on writing: file data goes through
  ``copy_file_range``, which reflinks where the file system can (xfs, btrfs).
  Never hard links between versions: a later write through one version would
  change the other.

Trees are layers a user shaped: every directory is reached through
``safepath``. Work runs per directory on a thread pool (syscalls release the
GIL, and on a FUSE store each one is a network round trip). A directory task
gets its descriptors from the task that found it, within a budget; past it, the
task reopens its directory from the root. So no walk needs PATH_MAX or
unbounded descriptors.
"""

from __future__ import annotations

import os
import queue
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import fsops, safepath
from .errors import StoreError
from .mounts import is_fuse, is_moosefs, mount_of
from .safepath import Parts

Entry = tuple[str, os.stat_result, dict[str, bytes]]


@dataclass(eq=False)
class DirNode:
    """One scanned directory: its own stat and xattrs, its entries and subdirectories."""

    name: str
    parent: DirNode | None
    st: os.stat_result | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    subdirs: list[DirNode] = field(default_factory=list)

    def parts(self) -> Parts:
        names: list[str] = []
        node: DirNode | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def show(self) -> str:
        return safepath.show(self.parts())

    @property
    def opaque(self) -> bool:
        return self.xattrs.get(fsops.OVL_OPAQUE) == b"y"

    @property
    def has_xwhiteouts(self) -> bool:
        return self.xattrs.get(fsops.OVL_OPAQUE) == b"x"


def default_workers(path: str | Path) -> int:
    # Local disks gain little past a few threads per core; FUSE round trips gain more.
    cpus = os.cpu_count() or 2
    return min(64, cpus * (8 if is_fuse(path) else 2))


class FdBudget:
    """How many directory descriptors queued tasks may hold at once."""

    def __init__(self, limit: int = 256) -> None:
        self._left = limit
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self._left < n:
                return False
            self._left -= n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._left += n

    def release(self, fds: list[int] | None) -> None:
        """Close descriptors a task was handed but will not use, and give them back."""
        if fds is not None:
            self.give(len(fds))
            _close(fds)

    def drop(self, task: object) -> None:
        """``run_parallel``'s ``drop`` for tasks that carry their descriptors second."""
        self.release(task[1])  # type: ignore[index]


def run_parallel(first: Iterable[object], fn: Callable[[object], list[object]],
                 workers: int, drop: Callable[[object], None] | None = None) -> None:
    """Run ``fn`` on every task on ``workers`` threads; each call returns further tasks.

    Tasks run newest first, which keeps the queue (and the descriptors tasks carry)
    small. The first error stops the run: the remaining tasks go to ``drop`` (to
    release what they hold) and the error is raised here.
    """
    # Here, without threads, while there is one task at a time: with one worker all
    # along (same order, nothing to hand over), else until the work fans out. A small
    # run (a directory made since the last journaled pass) then never starts threads.
    stack = list(first)[::-1]
    try:
        while stack and (workers <= 1 or len(stack) == 1):
            stack.extend(reversed(fn(stack.pop())))
    except BaseException:
        if drop is not None:
            for t in stack:
                drop(t)
        raise
    if not stack:
        return
    first = stack[::-1]
    tasks: queue.LifoQueue[object] = queue.LifoQueue()
    lock = threading.Lock()
    outstanding = 0
    errors: list[BaseException] = []
    done = threading.Event()
    for t in first:
        tasks.put(t)
        outstanding += 1
    if outstanding == 0:
        return

    def worker() -> None:
        nonlocal outstanding
        while True:
            task = tasks.get()
            if task is _STOP:
                return
            children: list[object] = []
            if errors:
                if drop is not None:
                    drop(task)
            else:
                try:
                    children = fn(task)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    with lock:
                        errors.append(e)
            with lock:
                outstanding += len(children) - 1
                finished = outstanding == 0
            for c in children:
                tasks.put(c)
            if finished:
                done.set()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for th in threads:
        th.start()
    done.wait()
    for _ in threads:
        tasks.put(_STOP)
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


_STOP = object()


def _close(fds: Iterable[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def open_task_dirs(roots: list[int], node: DirNode, fds: list[int] | None,
                   budget: FdBudget) -> list[int]:
    """The descriptors a task was handed (given back to the budget), or, if it got none,
    its directory reopened from ``roots``."""
    if fds is not None:
        budget.give(len(fds))
        return fds
    parts = node.parts()
    opened: list[int] = []
    try:
        for root in roots:
            opened.append(safepath.open_dir(root, parts))
    except BaseException:
        _close(opened)
        raise
    return opened


def hand_down(parents: list[int], name: str, budget: FdBudget) -> list[int] | None:
    """Descriptors of subdirectory ``name`` for a child task, if the budget allows."""
    if not budget.take(len(parents)):
        return None
    opened: list[int] = []
    try:
        for fd in parents:
            opened.append(safepath.open_child(fd, name))
    except BaseException:
        budget.give(len(parents))
        _close(opened)
        raise
    return opened


def scan_tree(root: str | Path, workers: int | None = None,
              check: Callable[[DirNode, Entry | None], None] | None = None,
              xattrs: bool = True) -> DirNode:
    """Read the whole tree at ``root`` (lstat, and unless not ``xattrs`` the xattrs, of
    every entry).

    ``check(dir, entry)`` sees every directory (``entry`` None) and every entry; it
    may record problems. A directory that is a symlink or gone by the time it is read
    fails the scan (StoreError): the tree changed under us.
    """
    rootfd = safepath.open_root(root)
    budget = FdBudget()
    top = DirNode("", None)

    def scan(task: object) -> list[object]:
        node, fds = task  # type: ignore[misc]
        try:
            (fd,) = open_task_dirs([rootfd], node, fds, budget)
        except OSError as e:
            if safepath.changed(e):
                raise StoreError(f"{root}: {node.show()} changed while it was read") from e
            raise
        children: list[object] = []
        try:
            node.st = os.fstat(fd)
            node.xattrs = safepath.read_xattrs(fd) if xattrs else {}
            if check is not None:
                check(node, None)
            for name, est in safepath.scandir(fd).items():
                if stat.S_ISDIR(est.st_mode):
                    child = DirNode(name, node)
                    node.subdirs.append(child)
                    children.append((child, hand_down([fd], name, budget)))
                    continue
                entry = (name, est, safepath.read_xattrs(fd, name) if xattrs else {})
                if check is not None:
                    check(node, entry)
                node.entries.append(entry)
        except OSError as e:
            for child in children:
                budget.release(child[1])  # type: ignore[index]
            if safepath.changed(e):
                raise StoreError(f"{root}: {node.show()} changed while it was read") from e
            raise
        finally:
            os.close(fd)
        return children

    try:
        run_parallel([(top, None)], scan, workers or default_workers(root), budget.drop)
    finally:
        os.close(rootfd)
    return top


# ---- copies ---------------------------------------------------------------------------------

def _run(cmd: list[str]) -> None:
    # setpriv --pdeathsig: the tool dies with us, so a killed commit leaves no writer.
    res = subprocess.run(["setpriv", "--pdeathsig", "KILL", "--", *cmd],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise StoreError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")


def hardlink_groups(tree: DirNode) -> list[list[tuple[DirNode, str]]]:
    """(directory, name) of each group of hard-linked non-directories in a scanned tree."""
    groups: dict[tuple[int, int], list[tuple[DirNode, str]]] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        stack.extend(node.subdirs)
        for name, st, _xa in node.entries:
            if st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append((node, name))
    return [g for g in groups.values() if len(g) > 1]


def _relink(dst: str | Path, groups: list[list[tuple[DirNode, str]]]) -> None:
    """Make each group one inode again in the copy ``dst`` (a snapshot splits them); the
    directories touched get their times back."""
    dfd = safepath.open_root(dst)
    touched: dict[int, DirNode] = {}
    try:
        for (fnode, fname), *others in groups:
            first = safepath.open_dir(dfd, fnode.parts())
            try:
                for onode, oname in others:
                    ofd = safepath.open_dir(dfd, onode.parts())
                    try:
                        tmp = f"{oname[:200]}.labvm-relink"
                        os.link(fname, tmp, src_dir_fd=first, dst_dir_fd=ofd,
                                follow_symlinks=False)
                        os.rename(tmp, oname, src_dir_fd=ofd, dst_dir_fd=ofd)
                        touched[id(onode)] = onode
                    finally:
                        os.close(ofd)
            finally:
                os.close(first)
        for node in touched.values():
            assert node.st is not None
            fd = safepath.open_dir(dfd, node.parts())
            try:
                os.utime(fd, ns=(node.st.st_atime_ns, node.st.st_mtime_ns))
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


# mfsmount tells the master a write's mtime up to about a second after close (fsync and
# syncfs do not hurry it; measured 0.6-0.8 s), and a snapshot taken in between keeps
# the older time. Entries changed this recently are checked against the scan.
_MFS_MTIME_LAG_S = 10.0


def _fix_recent_mtimes(dst: str | Path, tree: DirNode, since: float) -> None:
    """Give entries of the snapshot ``dst`` that changed after ``since`` the mtime the
    scan of the source saw, where the snapshot kept an older one."""
    limit = int(since * 1e9)
    dfd = safepath.open_root(dst)
    try:
        stack = [tree]
        while stack:
            node = stack.pop()
            stack.extend(node.subdirs)
            recent = [(name, st) for name, st, _xa in node.entries
                      if max(st.st_mtime_ns, st.st_ctime_ns) >= limit]
            own = node.st is not None and max(node.st.st_mtime_ns, node.st.st_ctime_ns) >= limit
            if not recent and not own:
                continue
            fd = safepath.open_dir(dfd, node.parts())
            try:
                for name, st in recent:
                    got = safepath.lstat_or_none(fd, name)
                    if got is not None and got.st_mtime_ns != st.st_mtime_ns:
                        os.utime(name, ns=(got.st_atime_ns, st.st_mtime_ns), dir_fd=fd,
                                 follow_symlinks=False)
                if own:
                    assert node.st is not None
                    got = os.fstat(fd)
                    if got.st_mtime_ns != node.st.st_mtime_ns:
                        os.utime(fd, ns=(got.st_atime_ns, node.st.st_mtime_ns))
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


def copy_tree(src: str | Path, dst: str | Path, workers: int | None = None) -> None:
    """Make ``dst`` (must not exist) an independent copy of directory ``src``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise StoreError(f"copy target {dst} exists")
    if is_moosefs(src) and is_moosefs(dst.parent) and mount_of(src)[0] == mount_of(dst.parent)[0]:
        tree = scan_tree(src, workers, xattrs=False)
        _run(["mfsmakesnapshot", os.fspath(src), os.fspath(dst)])
        _relink(dst, hardlink_groups(tree))
        _fix_recent_mtimes(dst, tree, time.time() - _MFS_MTIME_LAG_S)
        return
    tree = scan_tree(src, workers)
    os.mkdir(dst, 0o700)
    copy_scanned(tree, src, dst, workers)


def copy_scanned(tree: DirNode, src: str | Path, dst: str | Path,
                 workers: int | None = None) -> None:
    """Copy the scanned tree ``tree`` of ``src`` into the empty directory ``dst``, verbatim
    (overlay's own xattrs and whiteouts included), hard link groups kept."""
    fsops.refresh_umask()
    sfd, dfd = safepath.open_root(src), safepath.open_root(dst)
    budget = FdBudget()
    links: dict[tuple[int, int], list[LinkMember]] = {}
    lock = threading.Lock()
    dirs: list[DirNode] = [tree]

    def copy(task: object) -> list[object]:
        node, fds = task  # type: ignore[misc]
        s, d = open_task_dirs([sfd, dfd], node, fds, budget)
        children: list[object] = []
        try:
            for name, st, xa in node.entries:
                if st.st_nlink > 1:  # a hard link group (of any type): made once dirs exist
                    with lock:
                        links.setdefault((st.st_dev, st.st_ino), []).append((node, name, st, xa))
                    continue
                fsops.copy_entry(s, name, d, name, st, xa)
            for sub in node.subdirs:
                os.mkdir(sub.name, 0o700, dir_fd=d)
                children.append((sub, hand_down([s, d], sub.name, budget)))
            with lock:
                dirs.extend(node.subdirs)
        except BaseException:
            for child in children:
                budget.release(child[1])  # type: ignore[index]
            raise
        finally:
            os.close(s)
            os.close(d)
        return children

    try:
        n = workers or default_workers(dst)
        run_parallel([(tree, None)], copy, n, budget.drop)
        link_groups(sfd, dfd, links.values())
        set_dir_meta(dfd, [(node, node.xattrs) for node in dirs], n)
    finally:
        os.close(sfd)
        os.close(dfd)


LinkMember = tuple[DirNode, str, os.stat_result, dict[str, bytes]]


def link_groups(sfd: int, dfd: int, groups: Iterable[list[LinkMember]]) -> None:
    """Create each hard link group once all directories exist: one copy (with the
    xattrs given), then links to it."""
    for (fnode, fname, fst, fxa), *others in groups:
        fparts = fnode.parts()
        s, d = safepath.open_dir(sfd, fparts), safepath.open_dir(dfd, fparts)
        try:
            fsops.copy_entry(s, fname, d, fname, fst, fxa)
            for onode, oname, _ost, _oxa in others:
                od = safepath.open_dir(dfd, onode.parts())
                try:
                    os.link(fname, oname, src_dir_fd=d, dst_dir_fd=od, follow_symlinks=False)
                finally:
                    os.close(od)
        finally:
            os.close(s)
            os.close(d)


def set_dir_meta(dfd: int, dirs: list[tuple[DirNode, dict[str, bytes]]], workers: int) -> None:
    """Directory owners, modes, xattrs and times, last: creating entries changes mtimes."""

    def one(task: object) -> list[object]:
        for node, xattrs in task:  # type: ignore[attr-defined]
            assert node.st is not None
            fd = safepath.open_dir(dfd, node.parts())
            try:
                fsops.apply_meta_fd(fd, node.st, xattrs, replace_xattrs=True)
            finally:
                os.close(fd)
        return []

    batches = [dirs[i:i + 256] for i in range(0, len(dirs), 256)]
    run_parallel(batches, one, workers)
