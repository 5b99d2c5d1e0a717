"""A change journal for a directory tree, on inotify (through ctypes, no dependency).

Overlayfs changes its upper layer through the VFS, so inotify watches on the
upper directories see every change the container makes. The journal records
the paths that changed; the consumer decides what to copy, and resolves every
path again through ``safepath`` before it touches anything. When the kernel's
event queue overflowed, or a watch could not be added, ``take()`` reports that a
full rescan is needed instead of trusting the journal.

The tree belongs to a user, who can turn any directory into a symlink at any
moment. So a watch is never added by path: the directory is opened through
``safepath`` (no symlink in any component) and watched through
``/proc/self/fd/<fd>``, which the kernel resolves to exactly that directory.
Subtrees are walked the same way. A user with very many directories could use
up root's inotify watches for everyone on the node; past ``max_watches`` this
journal gives up and asks for rescans instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from . import safepath
from .safepath import Parts

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

# No IN_DONT_FOLLOW: the watched path is the /proc/self/fd magic link to a directory
# we opened safely, and that link must be followed to reach it.
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
         | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")
DEFAULT_MAX_WATCHES = 65536

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Changes:
    """Paths (tuples of names, ``()`` is the root) that changed; ``trees`` changed with
    everything below."""

    paths: set[Parts] = field(default_factory=set)
    trees: set[Parts] = field(default_factory=set)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.paths or self.trees or self.rescan)


class _Watch:
    """One watched directory: its name under its parent's watch (so a moved directory's
    whole subtree follows by updating one record)."""

    __slots__ = ("parent", "name")

    def __init__(self, parent: _Watch | None, name: str) -> None:
        self.parent = parent
        self.name = name


class ChangeJournal:
    """Recursive inotify watch on ``root`` recording changed paths."""

    def __init__(self, root: str | os.PathLike[str],
                 max_watches: int = DEFAULT_MAX_WATCHES) -> None:
        self.root = os.fspath(root)
        self.max_watches = max_watches
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.gave_up = False
        self._watches: dict[int, _Watch] = {}
        self._pending = Changes()
        self._watch_root()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- watches -----------------------------------------------------------------
    def _add_watch(self, dirfd: int, parent: _Watch | None, name: str) -> _Watch | None:
        if self.gave_up:
            return None
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(f"/proc/self/fd/{dirfd}"), _MASK)
        if wd < 0:
            # ENOSPC (max_user_watches) and friends: we can no longer see everything.
            self._pending.rescan = True
            return None
        known = self._watches.get(wd)
        if known is not None:  # the same directory, moved: its subtree moves with it
            known.parent, known.name = parent, name
            return known
        w = self._watches[wd] = _Watch(parent, name)
        if len(self._watches) > self.max_watches:
            self._give_up()
            return None
        return w

    def _give_up(self) -> None:
        log.warning("%s: more than %d directories; journal off, syncs rescan instead",
                    self.root, self.max_watches)
        self.gave_up = True
        self._drop_watches()

    def _drop_watches(self) -> None:
        for wd in list(self._watches):
            _libc.inotify_rm_watch(self.fd, wd)
        self._watches.clear()

    def _watch_root(self) -> None:
        fd = safepath.open_root(self.root)
        try:
            top = self._add_watch(fd, None, "")
            if top is not None:
                self._watch_below(fd, top)
        finally:
            os.close(fd)

    def _watch_subtree(self, parent: _Watch, name: str) -> None:
        """Watch the new directory ``name`` under ``parent`` and everything below it."""
        parts = self._parts(parent)
        if parts is None:
            return
        try:
            root = safepath.open_root(self.root)
        except OSError:
            self._pending.rescan = True
            return
        try:
            fd = safepath.open_dir(root, (*parts, name))
        except OSError as e:
            if not safepath.changed(e):
                raise
            return  # gone again, or a symlink now: that change is journaled
        finally:
            os.close(root)
        try:
            w = self._add_watch(fd, parent, name)
            if w is not None:
                self._watch_below(fd, w)
        finally:
            os.close(fd)

    def _watch_below(self, fd: int, top: _Watch) -> None:
        def enter(walk: safepath.Walk, fds: list[int], ctx: Any) -> tuple[list[str], Any]:
            here = top if not walk.path else self._add_watch(fds[0], ctx, walk.path[-1])
            if here is None:
                return [], None
            subdirs = [n for n, st in safepath.scandir(fds[0]).items()
                       if stat.S_ISDIR(st.st_mode)]
            return subdirs, here

        # A directory that vanished or became a symlink meanwhile: its change is journaled.
        safepath.walk([fd], enter, lost=lambda walk, e: None)

    def _parts(self, w: _Watch) -> Parts | None:
        names: list[str] = []
        node: _Watch | None = w
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
            if len(names) > 10_000_000:  # a cycle cannot happen; never spin on one
                return None
        return tuple(reversed(names))

    # ---- events ------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            off = 0
            while off < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                name = os.fsdecode(buf[off + 16:off + 16 + length].rstrip(b"\0"))
                off += 16 + length
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        p = self._pending
        if mask & IN_Q_OVERFLOW:
            p.rescan = True
            return
        w = self._watches.get(wd)
        if mask & IN_IGNORED:
            self._watches.pop(wd, None)
            return
        if w is None:
            return
        base = self._parts(w)
        if base is None:
            p.rescan = True
            return
        if not name:  # the watched directory itself (attributes, or it went away)
            p.paths.add(base)
            return
        rel = (*base, name)
        p.paths.add(base)  # its mtime changed
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            # Watch first, then sync the whole subtree: nothing made inside it
            # before the watch existed is missed.
            self._watch_subtree(w, name)
            p.trees.add(rel)
        else:
            p.paths.add(rel)

    def take(self) -> Changes:
        """Everything journaled since the last call."""
        if self.gave_up:
            return Changes(rescan=True)
        self._read()
        out, self._pending = self._pending, Changes()
        if out.rescan:
            # Directories may have moved under stale watch records; start over.
            self._drop_watches()
            self._read()
            self._pending = Changes()
            self._watch_root()
        return out
