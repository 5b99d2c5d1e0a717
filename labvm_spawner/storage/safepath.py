"""Reaching names inside trees that a user controls, without ever following a symlink.

Host-root code (sync, the journal, merge, commit, take-over, restore, prune, fsck,
the image-layer unpack) works on trees whose names, types and symlinks the root
of a container chose. A user can swap a directory for a symlink at any moment,
so a path string that is fine when checked can lead anywhere when used. This
module is the one place where such trees are entered:

* Only a *root* is opened by path, and roots are LabVM's own directories (an
  upper, a store version, a mirror). Everything below is reached from a directory
  descriptor with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``, or, where the kernel lacks
  openat2, one ``openat(O_NOFOLLOW | O_DIRECTORY)`` per component.
* A symlink, a file or a mount point where a directory was expected fails with
  ELOOP, ENOTDIR or EXDEV. Callers treat that as a changed entry to read again
  (``changed``), never as a path to follow.
* Entries are then created, renamed, linked, chowned and given xattrs relative to
  the parent's descriptor (``dir_fd=``, ``follow_symlinks=False``). Xattrs of an
  entry that cannot be opened (a symlink, a device) go through
  ``/proc/self/fd/<parent>/<name>``: the kernel jumps from the magic link to the
  very directory the descriptor holds, so no name on the way can be redirected.
* A path is a tuple of names, never a joined string, so no PATH_MAX limit applies.
  Walks hold descriptors for only the deepest levels, so no descriptor limit applies
  either: trees of any depth are walked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

Parts = tuple[str, ...]

# Errors that mean "this name is no longer what the walk expected": gone, or a
# symlink / non-directory / other file system in its place.
# ESTALE: a file replaced between its lstat and its open (fsops.open_regular).
CHANGED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.ESTALE})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
_SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)
_OPEN_HOW = struct.Struct("QQQ")  # struct open_how {flags, mode, resolve}
# openat2 takes at most PATH_MAX bytes; longer paths are resolved in segments.
_SEGMENT = 3800

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True


def changed(e: OSError) -> bool:
    """True when ``e`` says a name changed under us (gone, or no longer a directory)."""
    return e.errno in CHANGED


def check_name(name: str) -> str:
    """``name`` if it is one directory entry's name; ValueError otherwise."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a file name: {name!r}")
    return name


def split(rel: str) -> Parts:
    """The names of a relative path (``""`` is the root itself); each one checked."""
    if not rel:
        return ()
    return tuple(check_name(n) for n in rel.split("/"))


def show(parts: Sequence[str], limit: int = 240) -> str:
    """A path for a log line: escaped (names may hold newlines) and cut to ``limit``."""
    text = "/".join(parts) or "."
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def proc_path(dirfd: int, name: str) -> str:
    """A path to ``name`` in the directory ``dirfd`` that cannot be redirected (see above)."""
    return f"/proc/self/fd/{dirfd}/{name}"


# ---- opening directories ----------------------------------------------------------------

def open_root(path: str | os.PathLike[str], create: bool = False, mode: int = 0o700) -> int:
    """Open LabVM's own directory ``path`` (a tree's root); with ``create``, make it first.

    The last component must be a real directory, not a symlink.
    """
    if create:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
    return os.open(path, _DIR_FLAGS)


def _openat2(dirfd: int, path: bytes) -> int:
    global _have_openat2
    how = _OPEN_HOW.pack(_DIR_FLAGS, 0, _RESOLVE)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, path, how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.EAGAIN):  # EAGAIN: a rename raced the lookup
            continue
        if err in (errno.ENOSYS, errno.EPERM) and _have_openat2:  # old kernel, or seccomp
            _have_openat2 = False
            return -1
        raise OSError(err, os.strerror(err), os.fsdecode(path))


def _openat_step(dirfd: int, name: str, dev: int) -> int:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    if os.fstat(fd).st_dev != dev:  # a mount point below the root
        os.close(fd)
        raise OSError(errno.EXDEV, "crosses a mount point", name)
    return fd


def open_dir(dirfd: int, parts: Sequence[str]) -> int:
    """A new descriptor for the directory ``parts`` below ``dirfd`` (``()``: a dup of it).

    Never follows a symlink or crosses a mount; raises OSError (``changed`` true) when
    a component is missing, a symlink or not a directory.
    """
    if not parts:
        return os.dup(dirfd)
    fd = dirfd
    i = 0
    try:
        while i < len(parts):
            # The longest run of names that fits in one openat2 call.
            j, size = i, 0
            while j < len(parts) and (j == i or size + len(parts[j]) + 1 < _SEGMENT):
                size += len(os.fsencode(check_name(parts[j]))) + 1
                j += 1
            nfd = -1
            if _have_openat2:
                nfd = _openat2(fd, os.fsencode("/".join(parts[i:j])))
            if nfd < 0:  # no openat2 here: one component at a time
                dev = os.fstat(fd).st_dev
                nfd = fd
                for name in parts[i:j]:
                    step = _openat_step(nfd, name, dev)
                    if nfd != fd:
                        os.close(nfd)
                    nfd = step
            if fd != dirfd:
                os.close(fd)
            fd = nfd
            i = j
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise
    return fd


def open_child(dirfd: int, name: str) -> int:
    """Open the subdirectory ``name`` of ``dirfd`` (not following a symlink)."""
    return os.open(check_name(name), _DIR_FLAGS, dir_fd=dirfd)


def lstat(dirfd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def lstat_or_none(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def scandir(dirfd: int) -> dict[str, os.stat_result]:
    """Every entry of the directory ``dirfd`` with its lstat."""
    out: dict[str, os.stat_result] = {}
    with os.scandir(dirfd) as it:
        for e in it:
            try:
                out[e.name] = e.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while we listed
                pass
    return out


def names(dirfd: int) -> list[str]:
    with os.scandir(dirfd) as it:
        return [e.name for e in it]


# ---- removing ---------------------------------------------------------------------------

def remove(dirfd: int, name: str, attempts: int = 5) -> bool:
    """Remove ``name`` in ``dirfd``, whatever it is, with everything below it.

    Returns False when it was absent. Symlinks are removed, never followed. A
    directory that something keeps filling (ENOTEMPTY) is emptied again, up to
    ``attempts`` times, sleeping a little longer each time.
    """
    check_name(name)
    try:
        os.unlink(name, dir_fd=dirfd)
        return True
    except FileNotFoundError:
        return False
    except (IsADirectoryError, PermissionError) as e:
        first = e  # EPERM: a directory on some file systems, else the real error
    for attempt in range(attempts):
        try:
            _remove_dir(dirfd, name)
            return True
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            raise first from None
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return True


def _remove_dir(dirfd: int, name: str) -> None:
    def enter(w: Walk, fds: list[int], _ctx: Any) -> tuple[Iterable[str], Any]:
        subdirs = []
        with os.scandir(fds[0]) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.name)
                    continue
                try:
                    os.unlink(e.name, dir_fd=fds[0])
                except FileNotFoundError:
                    pass
                except IsADirectoryError:  # became a directory meanwhile
                    subdirs.append(e.name)
        return subdirs, None

    def leave(w: Walk, parent: list[int], child: str, _fds: list[int], _ctx: Any) -> None:
        try:
            os.rmdir(child, dir_fd=parent[0])
        except FileNotFoundError:
            pass

    fd = open_child(dirfd, name)
    try:
        walk([fd], enter, leave)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def remove_tree(path: str | os.PathLike[str], attempts: int = 5) -> bool:
    """Remove LabVM's own path ``path`` with everything below it (its contents a user
    may have shaped); absent is fine."""
    path = os.fspath(path)
    parent, name = os.path.split(path.rstrip("/"))
    try:
        pfd = os.open(parent or ".", _DIR_FLAGS)
    except FileNotFoundError:
        return False
    try:
        return remove(pfd, name, attempts=attempts)
    finally:
        os.close(pfd)


# ---- walking ----------------------------------------------------------------------------

# Levels of a walk that keep their descriptors open; shallower ones are reopened
# from the roots when the walk climbs back to them.
KEEP_OPEN = 48

Enter = Callable[["Walk", list[int], Any], tuple[Iterable[str], Any]]
Leave = Callable[["Walk", list[int], str, list[int], Any], None]
Lost = Callable[["Walk", OSError], None]


class Walk:
    """Where a walk is: ``path`` holds the names from the roots to the directory being
    visited (read it, copy it; never keep the list itself).

    The open levels are always one run, the deepest ``keep`` ones: a deep tree costs
    a bounded number of descriptors, and a level closed on the way down is reopened
    from the roots (never following a symlink) when the walk climbs back to it.
    """

    def __init__(self, roots: Sequence[int], keep: int = KEEP_OPEN) -> None:
        self.roots = list(roots)
        self.path: list[str] = []
        self._fds: list[list[int] | None] = []  # per level below the roots
        self._lo = 1  # the shallowest open level (levels are 1-based below the roots)
        self.keep = max(2, keep)

    def fds(self, depth: int) -> list[int]:
        """Descriptors (one per tree) of the directory at ``depth`` (0: the roots)."""
        if depth == 0:
            return self.roots
        if self._fds[depth - 1] is None:
            self._reopen(depth)
        got = self._fds[depth - 1]
        assert got is not None
        return got

    def _reopen(self, depth: int) -> None:
        first = max(1, depth - self.keep + 1)
        opened: list[list[int]] = []
        try:
            fds = [open_dir(root, self.path[:first]) for root in self.roots]
            opened.append(fds)
            for level in range(first + 1, depth + 1):
                name = self.path[level - 1]
                fds = _open_children(opened[-1], name)
                opened.append(fds)
        except BaseException:
            for fds in opened:
                _close(fds)
            raise
        for level, fds in zip(range(first, depth + 1), opened, strict=True):
            old = self._fds[level - 1]
            if old is not None:
                _close(old)
            self._fds[level - 1] = fds
        self._lo = first

    def _push(self, name: str, fds: list[int]) -> None:
        self.path.append(name)
        self._fds.append(fds)
        if len(self._fds) - self._lo + 1 > self.keep:
            old = self._fds[self._lo - 1]
            if old is not None:
                _close(old)
                self._fds[self._lo - 1] = None
            self._lo += 1

    def _pop(self) -> None:
        fds = self._fds.pop()
        if fds is not None:
            _close(fds)
        self.path.pop()
        self._lo = min(self._lo, len(self._fds) + 1)
        if self._lo > len(self._fds):  # the new top was closed: reopen it on demand
            self._lo = len(self._fds) + 1

    def close(self) -> None:
        for i, fds in enumerate(self._fds):
            if fds is not None:
                _close(fds)
                self._fds[i] = None


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _open_children(parents: list[int], name: str) -> list[int]:
    opened: list[int] = []
    try:
        for fd in parents:
            opened.append(open_child(fd, name))
    except BaseException:
        _close(opened)
        raise
    return opened


def walk(roots: Sequence[int], enter: Enter, leave: Leave | None = None,
         lost: Lost | None = None, ctx: Any = None, keep: int = KEEP_OPEN) -> None:
    """Depth-first over the directories common to the trees ``roots`` (one per tree).

    * ``enter(walk, fds, parent_ctx)`` is called for each directory, the roots first,
      with its own descriptors (one per tree). It returns the names of the
      subdirectories to visit (each a directory in every tree by then) and a context.
    * ``leave(walk, parent_fds, name, fds, ctx)`` is called after everything below a
      subdirectory (not for the roots).
    * A subdirectory that cannot be entered, or a level that cannot be reopened,
      because the tree changed (``changed``), goes to ``lost(walk, error)`` with
      ``walk.path`` naming it, and is skipped with everything below. Without ``lost``
      the error is raised.
    """
    w = Walk(roots, keep)
    try:
        children, top = enter(w, w.roots, ctx)
        stack: list[tuple[Iterator[str], Any]] = [(iter(children), top)]
        while stack:
            it, here = stack[-1]
            depth = len(stack) - 1
            name = next(it, None)
            if name is None:
                stack.pop()
                if depth == 0:
                    break
                if leave is not None:
                    try:
                        own, parent = w.fds(depth), w.fds(depth - 1)
                    except OSError as e:
                        if lost is None or not changed(e):
                            raise
                        lost(w, e)
                    else:
                        leave(w, parent, w.path[-1], own, here)
                w._pop()
                continue
            try:
                parent = w.fds(depth)
            except OSError as e:  # this level itself is gone: drop it
                if lost is None or not changed(e):
                    raise
                lost(w, e)
                stack.pop()
                w._pop()
                continue
            try:
                opened = _open_children(parent, name)
            except OSError as e:
                if lost is None or not changed(e):
                    raise
                w.path.append(name)
                try:
                    lost(w, e)
                finally:
                    w.path.pop()
                continue
            w._push(name, opened)
            children, sub = enter(w, opened, here)
            stack.append((iter(children), sub))
    finally:
        w.close()


# ---- xattrs -----------------------------------------------------------------------------

def _xattr_target(dirfd: int, name: str | None) -> tuple[int | str, bool]:
    return (dirfd, True) if name is None else (proc_path(dirfd, check_name(name)), False)


def read_xattrs(dirfd: int, name: str | None = None) -> dict[str, bytes]:
    """All xattrs of ``name`` in the directory ``dirfd``, or (``name`` None) of the open
    file ``dirfd`` itself; {} where the file system has none."""
    target, follow = _xattr_target(dirfd, name)
    try:
        keys = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in keys:
        try:
            out[key] = os.getxattr(target, key, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def set_xattrs(dirfd: int, name: str | None, xattrs: dict[str, bytes],
               replace: bool = False) -> None:
    """Set ``xattrs`` (on ``name`` in ``dirfd``, or on the open file ``dirfd``); with
    ``replace``, first drop every other xattr it has."""
    target, follow = _xattr_target(dirfd, name)
    if replace:
        try:
            present = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            present = []
        for key in present:
            if key not in xattrs:
                os.removexattr(target, key, follow_symlinks=follow)
    for key, value in xattrs.items():
        os.setxattr(target, key, value, follow_symlinks=follow)


def chmod_entry(dirfd: int, name: str, mode: int) -> None:
    """chmod a non-directory we cannot open for writing (fifo, socket, device node).

    Through an O_PATH descriptor of exactly that entry: chmod(2) has no flag to
    refuse a symlink on kernels before 6.6.
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return  # symlinks have no mode of their own
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
