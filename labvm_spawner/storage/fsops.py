"""Copying one entry with everything a root layer needs, relative to directory descriptors.

Copies a regular file, symlink, fifo, socket or device node with its numeric
owner, mode, times and xattrs; regular files keep their holes. Every function
takes the parent directory's descriptor and a name (reached through
``safepath``) and never follows a symlink.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from . import safepath
from .crash import crashpoint
from .safepath import read_xattrs, set_xattrs

__all__ = ["OVL_PREFIX", "OVL_OPAQUE", "OVL_WHITEOUT", "OVL_REDIRECT", "OVL_METACOPY",
           "read_xattrs", "set_xattrs", "visible_xattrs", "is_char_whiteout", "set_meta",
           "apply_meta", "apply_meta_fd", "open_regular", "copy_entry", "rewrite_file",
           "copy_file_data", "read_umask", "refresh_umask", "fsync_dir", "syncfs"]

OVL_PREFIX = "trusted.overlay."
# Overlayfs escapes a user's own trusted.overlay.* xattr by doubling the prefix.
OVL_ESCAPED = OVL_PREFIX + "overlay."
OVL_OPAQUE = OVL_PREFIX + "opaque"
OVL_WHITEOUT = OVL_PREFIX + "whiteout"
OVL_REDIRECT = OVL_PREFIX + "redirect"
OVL_METACOPY = OVL_PREFIX + "metacopy"

_SMALL = 1 << 20
_CHUNK = 8 << 20
# O_NONBLOCK: a fifo swapped in after the lstat must not block the open.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def visible_xattrs(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The xattrs a user sees through the overlay: overlay's own dropped, escaped ones unescaped."""
    out: dict[str, bytes] = {}
    for name, value in xattrs.items():
        if name.startswith(OVL_ESCAPED):
            out[OVL_PREFIX + name[len(OVL_ESCAPED):]] = value
        elif not name.startswith(OVL_PREFIX):
            out[name] = value
    return out


def is_char_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def set_meta(dirfd: int, name: str | None, kind: int, uid: int, gid: int, mode: int,
             times_ns: tuple[int, int], xattrs: dict[str, bytes] | None,
             replace_xattrs: bool = False) -> None:
    """Owner, mode, xattrs then times (in that order: chown clears set-id bits and
    capabilities, and every change but utime touches ctime).

    Of ``name`` in the directory ``dirfd``, never following it, or (``name`` None) of
    the open file or directory ``dirfd`` itself. ``kind`` is the S_IFMT type.
    """
    if name is None:
        os.fchown(dirfd, uid, gid)
        os.fchmod(dirfd, stat.S_IMODE(mode))
    else:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        if kind != stat.S_IFLNK:  # symlinks have no mode of their own
            safepath.chmod_entry(dirfd, name, stat.S_IMODE(mode))
    if xattrs is not None and (xattrs or replace_xattrs):
        set_xattrs(dirfd, name, xattrs, replace=replace_xattrs)
    if name is None:
        os.utime(dirfd, ns=times_ns)
    else:
        os.utime(name, ns=times_ns, dir_fd=dirfd, follow_symlinks=False)


def apply_meta_fd(fd: int, st: os.stat_result, xattrs: dict[str, bytes] | None,
                  replace_xattrs: bool = False) -> None:
    """``st``'s owner, mode and times, and ``xattrs``, onto an open file or directory."""
    set_meta(fd, None, stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, st.st_mode,
             (st.st_atime_ns, st.st_mtime_ns), xattrs, replace_xattrs)


def apply_meta(dirfd: int, name: str, st: os.stat_result, xattrs: dict[str, bytes] | None,
               replace_xattrs: bool = False) -> None:
    """``apply_meta_fd`` for an entry we do not hold open (symlink, fifo, device, socket)."""
    set_meta(dirfd, name, stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, st.st_mode,
             (st.st_atime_ns, st.st_mtime_ns), xattrs, replace_xattrs)


# Every call is a round trip on a FUSE store, so a new file skips those that would set
# what it already has: the owner we create it with, and its mode when no set-id bit
# (which chown clears) is involved and the umask left it as wanted.
_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def read_umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: every new file gets its mode set


_UMASK = read_umask()


def refresh_umask() -> None:
    """Re-read the umask; copies call this when they start, in case it was changed."""
    global _UMASK
    _UMASK = read_umask()


def _create_mode(st: os.stat_result) -> int:
    return stat.S_IMODE(st.st_mode) & ~_SPECIAL & 0o777 if not st.st_mode & _SPECIAL else 0o600


def _new_file_meta(fd: int, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
    """``apply_meta_fd`` for a file just made with ``_create_mode(st)``."""
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        os.fchown(fd, st.st_uid, st.st_gid)
    wanted = stat.S_IMODE(st.st_mode)
    if st.st_mode & _SPECIAL or _create_mode(st) & ~_UMASK != wanted:
        os.fchmod(fd, wanted)
    if xattrs:
        set_xattrs(fd, None, xattrs)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def open_regular(dirfd: int, name: str, st: os.stat_result | None = None) -> int:
    """Open the regular file ``name`` for reading; ESTALE when it is not one (any more),
    or not the inode ``st`` describes."""
    fd = os.open(name, _READ, dir_fd=dirfd)
    got = os.fstat(fd)
    if not stat.S_ISREG(got.st_mode) or (st is not None and got.st_ino != st.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "replaced while being copied", name)
    return fd


def _copy_range(fd_in: int, fd_out: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        if pos > start and os.fstat(fd_in).st_nlink == 0:
            # Deleted while we copy: our descriptor alone keeps its blocks, and a user
            # who removed a big file to free room would wait for the whole copy.
            raise FileNotFoundError(errno.ENOENT, "deleted while it was being copied")
        n = min(_CHUNK, end - pos)
        try:
            done = os.copy_file_range(fd_in, fd_out, n, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = 0
            buf = os.pread(fd_in, n, pos)
            if buf:
                done = os.pwrite(fd_out, buf, pos)
        if done == 0:  # file shrank under us
            return
        pos += done


def copy_file_data(fd_in: int, fd_out: int, st: os.stat_result) -> None:
    """Copy a regular file's bytes, keeping holes when the source has any."""
    size = st.st_size
    if size == 0:
        return
    if st.st_blocks * 512 >= size:  # no holes worth keeping
        if size <= _SMALL:
            buf = os.read(fd_in, size)
            view = memoryview(buf)
            while view:
                view = view[os.write(fd_out, view):]
        else:
            _copy_range(fd_in, fd_out, 0, size)
        return
    os.ftruncate(fd_out, size)
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd_in, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                _copy_range(fd_in, fd_out, pos, size)
                break
            raise
        hole = os.lseek(fd_in, data, os.SEEK_HOLE)
        _copy_range(fd_in, fd_out, data, hole)
        pos = hole


def copy_entry(src_dir: int, src_name: str, dst_dir: int, dst_name: str,
               st: os.stat_result, xattrs: dict[str, bytes] | None = None) -> os.stat_result:
    """Create ``dst_name`` (which must not exist) as a copy of the non-directory
    ``src_name``; ``xattrs`` None copies the source's own. Returns the source's stat as
    copied (for a regular file, of the inode actually read)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fd_in = open_regular(src_dir, src_name, st)
        try:
            st = os.fstat(fd_in)
            if xattrs is None:
                xattrs = read_xattrs(fd_in)
            fd_out = os.open(dst_name, _CREATE, _create_mode(st), dir_fd=dst_dir)
            try:
                copy_file_data(fd_in, fd_out, st)
                crashpoint("copy.data_written")
                _new_file_meta(fd_out, st, xattrs)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        return st
    if xattrs is None:
        xattrs = read_xattrs(src_dir, src_name)
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        os.mknod(dst_name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_dir)
    else:
        raise OSError(errno.EINVAL, f"cannot copy file type {stat.S_IFMT(mode):o}", src_name)
    apply_meta(dst_dir, dst_name, st, xattrs)
    return st


def rewrite_file(src_dir: int, src_name: str, dst_dir: int, dst_name: str,
                 st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    """Make the existing regular file ``dst_name`` (in a private copy, not shared with
    another link) a copy of ``src_name``, keeping its inode.

    For local disks: an unlinked inode is one that ext4 without a journal skips for 30 s
    when it allocates the next, so unlinking and creating many files in one directory
    makes each create scan past all those freed before it. The bytes are written over the
    old ones and the file cut to size, never truncated to zero first (which makes ext4
    write the file out when it is closed). Returns False, touching nothing, when
    ``dst_name`` is not a single-link regular file.
    """
    dst = safepath.lstat_or_none(dst_dir, dst_name)
    # Never open anything but a regular file: opening a device node can have effects.
    if dst is None or not stat.S_ISREG(dst.st_mode) or dst.st_nlink != 1:
        return False
    fd_out = os.open(dst_name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dst_dir)
    try:
        got = os.fstat(fd_out)
        if (got.st_ino, got.st_nlink) != (dst.st_ino, 1):
            raise OSError(errno.ESTALE, "replaced while being rewritten", dst_name)
        fd_in = open_regular(src_dir, src_name, st)
        try:
            st = os.fstat(fd_in)
            if st.st_blocks * 512 < st.st_size:  # sparse: its holes must not show old bytes
                os.ftruncate(fd_out, 0)
            copy_file_data(fd_in, fd_out, st)
            if got.st_size > st.st_size:
                os.ftruncate(fd_out, st.st_size)
        finally:
            os.close(fd_in)
        # Owner, mode, xattrs, times: in set_meta's order, skipping what already matches.
        if (st.st_uid, st.st_gid) != (got.st_uid, got.st_gid):
            os.fchown(fd_out, st.st_uid, st.st_gid)
        if st.st_mode & _SPECIAL or stat.S_IMODE(st.st_mode) != stat.S_IMODE(got.st_mode):
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
        set_xattrs(fd_out, None, xattrs, replace=True)
        os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    finally:
        os.close(fd_out)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush the file system holding the directory ``path`` (one call instead of an fsync
    per file; on btrfs it also commits the transaction, which updates quota usage)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)
