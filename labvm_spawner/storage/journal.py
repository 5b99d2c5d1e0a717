"""A change journal for a directory tree, on inotify (through ctypes, no dependency).

Overlayfs changes its upper layer through the VFS, so inotify watches on the
upper directories see every change the container makes. The journal records
the relative paths that changed; the consumer decides what to copy. When the
kernel's event queue overflowed, or a watch could not be added, ``take()``
reports that a full rescan is needed instead of trusting the journal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field

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
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
         | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Changes:
    """Paths (relative, "" is the root) that changed; ``trees`` changed with everything below."""

    paths: set[str] = field(default_factory=set)
    trees: set[str] = field(default_factory=set)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.paths or self.trees or self.rescan)


class ChangeJournal:
    """Recursive inotify watch on ``root`` recording changed relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._wd_path: dict[int, str] = {}
        self._pending = Changes()
        self.watch_tree("")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _add_watch(self, rel: str) -> None:
        path = os.path.join(self.root, rel) if rel else self.root
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):  # gone again; its removal is journaled
                return
            # ENOSPC (max_user_watches) and friends: we can no longer see everything.
            self._pending.rescan = True
            return
        self._wd_path[wd] = rel

    def watch_tree(self, rel: str) -> None:
        """Watch ``rel`` and every directory below it (after a create or a move-in)."""
        self._add_watch(rel)
        top = os.path.join(self.root, rel) if rel else self.root
        for dirpath, dirnames, _files in os.walk(top):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    self._add_watch(os.path.relpath(full, self.root))

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
        base = self._wd_path.get(wd)
        if mask & IN_IGNORED:
            self._wd_path.pop(wd, None)
            return
        if base is None:
            return
        if not name:  # the watched directory itself (attributes, or it went away)
            p.paths.add(base)
            return
        rel = os.path.join(base, name) if base else name
        p.paths.add(base)  # its mtime changed
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            # Watch first, then sync the whole subtree: nothing made inside it
            # before the watch existed is missed.
            self.watch_tree(rel)
            p.trees.add(rel)
        else:
            p.paths.add(rel)

    def take(self) -> Changes:
        """Everything journaled since the last call."""
        self._read()
        out, self._pending = self._pending, Changes()
        if out.rescan:
            # Directories may have moved under stale watch paths; start over.
            for wd in list(self._wd_path):
                _libc.inotify_rm_watch(self.fd, wd)
            self._wd_path.clear()
            self._read()
            self._pending = Changes()
            self.watch_tree("")
        return out
