"""Apply an overlayfs upper directory onto a lower tree, offline, by the kernel's rules.

The result is what the overlay of lower+upper shows, without overlay markers:

* a whiteout (0/0 char device, or a zero-size file with ``trusted.overlay.whiteout``
  inside a directory whose ``trusted.overlay.opaque`` is ``x``) deletes the lower name;
* an opaque directory (``trusted.overlay.opaque`` = ``y``) replaces the lower one;
* any other upper entry replaces the lower one, except a directory over a
  directory, which is merged and then takes the upper's owner, mode, times, xattrs;
* overlay's own xattrs are dropped, escaped ``trusted.overlay.overlay.*`` unescaped;
* whiteouts with nothing below are dropped.

Lower entries are replaced (unlink + create), never written through, so other
hard links of a lower inode keep their content. Uppers made with redirect_dir or
metacopy are refused while scanning, before anything is written.

Scanning and applying run per directory on a thread pool: the work is syscalls,
which release the GIL, and on a FUSE store each one is a network round trip.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import fsops
from .crash import crashpoint
from .errors import MergeRefused, StoreError
from .mounts import is_fuse, is_mountpoint
from .treecopy import copy_tree


@dataclass
class DirNode:
    """One scanned upper directory."""

    rel: str
    st: os.stat_result
    xattrs: dict[str, bytes]
    entries: list[tuple[str, os.stat_result, dict[str, bytes]]] = field(default_factory=list)
    subdirs: list[DirNode] = field(default_factory=list)

    @property
    def opaque(self) -> bool:
        return self.xattrs.get(fsops.OVL_OPAQUE) == b"y"

    @property
    def has_xwhiteouts(self) -> bool:
        return self.xattrs.get(fsops.OVL_OPAQUE) == b"x"


@dataclass
class MergeStats:
    dirs: int = 0
    files: int = 0
    whiteouts: int = 0


def default_workers(path: str | Path) -> int:
    # Local disks gain little past a few threads per core; FUSE round trips gain more.
    cpus = os.cpu_count() or 2
    return min(64, cpus * (8 if is_fuse(path) else 2))


def _run_parallel(first: Iterable[object], fn: Callable[[object], list[object]],
                  workers: int) -> None:
    """Run ``fn`` on every task on ``workers`` threads; each call returns further tasks.

    The first error stops the run (remaining tasks are dropped) and is raised here.
    """
    tasks: queue.SimpleQueue[object] = queue.SimpleQueue()
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
        while not done.is_set():
            task = tasks.get()
            if task is _STOP:
                return
            try:
                children = [] if errors else fn(task)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                children = []
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


def scan_upper(upper: str | Path, workers: int | None = None) -> DirNode:
    """Read the whole upper tree (lstat + xattrs); refuse redirect_dir/metacopy uppers."""
    upper = os.fspath(upper)
    st = os.lstat(upper)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"upper {upper} is not a directory")
    root = DirNode("", st, fsops.read_xattrs(upper))
    problems: list[str] = []
    lock = threading.Lock()

    def scan(node_obj: object) -> list[object]:
        node = node_obj  # type: DirNode
        assert isinstance(node, DirNode)
        base = os.path.join(upper, node.rel)
        if fsops.OVL_REDIRECT in node.xattrs:
            with lock:
                problems.append(f"{node.rel or '/'}: trusted.overlay.redirect (redirect_dir)")
        children: list[object] = []
        with os.scandir(base) as it:
            for entry in it:
                est = entry.stat(follow_symlinks=False)
                xa = fsops.read_xattrs(entry.path)
                rel = os.path.join(node.rel, entry.name)
                if stat.S_ISDIR(est.st_mode):
                    child = DirNode(rel, est, xa)
                    node.subdirs.append(child)
                    children.append(child)
                else:
                    for attr, what in ((fsops.OVL_METACOPY, "metacopy"),
                                       (fsops.OVL_REDIRECT, "redirect")):
                        if attr in xa:
                            with lock:
                                problems.append(f"{rel}: {attr} ({what})")
                    node.entries.append((entry.name, est, xa))
        return children

    _run_parallel([root], scan, workers or default_workers(upper))
    if problems:
        shown = "; ".join(sorted(problems)[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MergeRefused(
            f"upper {upper} was written with redirect_dir or metacopy enabled, which an offline "
            f"merge cannot resolve; mount with redirect_dir=off,metacopy=off: {shown}{more}")
    return root


def _is_whiteout(st: os.stat_result, xa: dict[str, bytes], parent: DirNode) -> bool:
    if fsops.is_char_whiteout(st):
        return True
    return (parent.has_xwhiteouts and stat.S_ISREG(st.st_mode) and st.st_size == 0
            and fsops.OVL_WHITEOUT in xa)


def _whiteout(dst: str) -> None:
    """A whiteout as overlayfs makes one: a 0/0 character device."""
    os.mknod(dst, stat.S_IFCHR, os.makedev(0, 0))


def apply_upper(tree: DirNode, upper: str | Path, dest: str | Path,
                workers: int | None = None, layer: bool = False) -> MergeStats:
    """Apply a scanned upper onto the existing directory ``dest`` (a private copy of the lower).

    With ``layer`` the result stays a layer over further lower layers (a store version
    sits on the image): whiteouts are kept as whiteouts, and a directory that hid what
    is below it (opaque in the upper, or over a lower non-directory) stays opaque.
    """
    upper = os.fspath(upper)
    dest = os.fspath(dest)
    stats = MergeStats()
    lock = threading.Lock()
    dir_meta: list[tuple[str, DirNode, bool]] = [(dest, tree, False)]
    links: dict[tuple[int, int], list[tuple[str, str, os.stat_result, dict[str, bytes]]]] = {}

    def apply(task: object) -> list[object]:
        node, ddir, lower_present = task  # type: ignore[misc]
        files = whiteouts = 0
        for name, st, xa in node.entries:
            dst = os.path.join(ddir, name)
            if _is_whiteout(st, xa, node):
                if lower_present:
                    fsops.remove_any(dst)
                if layer:
                    _whiteout(dst)
                whiteouts += 1
                continue
            vis = fsops.visible_xattrs(xa)
            src = os.path.join(upper, node.rel, name)
            files += 1
            if st.st_nlink > 1:  # hard link group: created together once all dirs exist
                if lower_present:
                    fsops.remove_any(dst)
                with lock:
                    links.setdefault((st.st_dev, st.st_ino), []).append((src, dst, st, vis))
                continue
            if lower_present:
                # A lower file with other links is replaced, so they keep their content;
                # a single-link one is rewritten in place (cheaper, same result).
                if stat.S_ISREG(st.st_mode) and fsops.overwrite_file(src, dst, st, vis):
                    continue
                fsops.remove_any(dst)
            fsops.copy_entry(src, dst, st, vis)
        children: list[object] = []
        metas = []
        for sub in node.subdirs:
            dst = os.path.join(ddir, os.path.basename(sub.rel))
            child_lower = False
            opaque = sub.opaque
            if lower_present:
                if sub.opaque:
                    fsops.remove_any(dst)
                else:
                    try:
                        if stat.S_ISDIR(os.lstat(dst).st_mode):
                            child_lower = True
                            opaque = fsops.read_xattrs(dst).get(fsops.OVL_OPAQUE) == b"y"
                        else:
                            os.unlink(dst)  # it hid the layers below: so does the dir
                            opaque = True
                    except FileNotFoundError:
                        pass
            if not child_lower:
                os.mkdir(dst, 0o700)
            metas.append((dst, sub, layer and opaque))
            children.append((sub, dst, child_lower))
        with lock:
            stats.files += files
            stats.whiteouts += whiteouts
            stats.dirs += len(node.subdirs)
            dir_meta.extend(metas)
        return children

    _run_parallel([(tree, dest, True)], apply, workers or default_workers(dest))
    for group in links.values():
        first = group[0]
        fsops.copy_entry(first[0], first[1], first[2], first[3])
        for _src, dst, _st, _xa in group[1:]:
            os.link(first[1], dst)
    # Directory metadata last: creating entries changes a directory's mtime.
    def set_meta(task: object) -> list[object]:
        for path, node, opaque in task:  # type: ignore[attr-defined]
            xattrs = fsops.visible_xattrs(node.xattrs)
            if opaque:
                xattrs[fsops.OVL_OPAQUE] = b"y"
            fsops.apply_meta(path, node.st, xattrs, replace_xattrs=True)
        return []

    batches = [dir_meta[i:i + 256] for i in range(0, len(dir_meta), 256)]
    _run_parallel(batches, set_meta, workers or default_workers(dest))
    return stats


def merge_upper(upper: str | Path, dest: str | Path, workers: int | None = None) -> MergeStats:
    """Scan ``upper`` (refusing unsupported uppers) and apply it onto ``dest`` in place."""
    tree = scan_upper(upper, workers)
    return apply_upper(tree, upper, dest, workers)


def check_merge_args(lower: Path, upper: Path, into: Path) -> None:
    """Validate ``merge --lower --upper --into`` arguments; raise StoreError with a reason."""
    for what, path in (("lower", lower), ("upper", upper)):
        if not path.is_dir() or path.is_symlink():
            raise StoreError(f"--{what} {path} is not an existing directory")
    if is_mountpoint(lower):
        raise StoreError(f"--lower {lower} is a mount point (a live overlay?); pass the layer "
                         "directory itself")
    if into.exists() or into.is_symlink():
        raise StoreError(f"--into {into} already exists; it must be a new directory")
    if not into.parent.is_dir():
        raise StoreError(f"parent of --into {into} does not exist")
    for what, path in (("lower", lower), ("upper", upper)):
        r, i = path.resolve(), into.resolve()
        if i == r or r in i.parents:
            raise StoreError(f"--into {into} lies inside --{what} {path}")


_TMP_TAG = ".{name}.labvm-merge-"


def _remove_stale_tmps(into: Path) -> None:
    """Remove work directories of earlier merges into ``into`` whose process died."""
    prefix = _TMP_TAG.format(name=into.name)
    for p in into.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            fsops.remove_any(os.fspath(p))
        except PermissionError:
            continue


def merge_into_new(lower: str | Path, upper: str | Path, into: str | Path,
                   workers: int | None = None) -> MergeStats:
    """Write into the new directory ``into`` what the overlay of lower+upper shows."""
    lower, upper, into = Path(lower), Path(upper), Path(into)
    check_merge_args(lower, upper, into)
    tree = scan_upper(upper, workers)  # refuses before anything is written
    _remove_stale_tmps(into)
    tmp = into.parent / f"{_TMP_TAG.format(name=into.name)}{os.getpid()}"
    try:
        copy_tree(lower, tmp)
        crashpoint("merge.copied")
        stats = apply_upper(tree, upper, tmp, workers)
        crashpoint("merge.applied")
        os.rename(tmp, into)
    except BaseException:
        if tmp.exists():
            fsops.remove_tree(tmp)
        raise
    return stats
