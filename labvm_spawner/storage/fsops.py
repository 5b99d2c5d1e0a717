"""Low-level file operations that keep everything a root layer needs.

Copies one entry (regular file, symlink, fifo, socket, device node) with its
numeric owner, mode, times and xattrs; regular files keep their holes.
Everything works on ``lstat`` results and never follows symlinks.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

OVL_PREFIX = "trusted.overlay."
# Overlayfs escapes a user's own trusted.overlay.* xattr by doubling the prefix.
OVL_ESCAPED = OVL_PREFIX + "overlay."
OVL_OPAQUE = OVL_PREFIX + "opaque"
OVL_WHITEOUT = OVL_PREFIX + "whiteout"
OVL_REDIRECT = OVL_PREFIX + "redirect"
OVL_METACOPY = OVL_PREFIX + "metacopy"

_SMALL = 1 << 20
_CHUNK = 8 << 20


def read_xattrs(path: str | Path) -> dict[str, bytes]:
    """All xattrs of ``path`` (not following symlinks); {} where unsupported."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


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


def set_xattrs(path: str | Path, xattrs: dict[str, bytes], *, replace: bool = False) -> None:
    """Set ``xattrs`` on ``path``; with ``replace``, first drop any other xattr it has."""
    if replace:
        for name in os.listxattr(path, follow_symlinks=False):
            if name not in xattrs:
                os.removexattr(path, name, follow_symlinks=False)
    for name, value in xattrs.items():
        os.setxattr(path, name, value, follow_symlinks=False)


def apply_meta(path: str | Path, st: os.stat_result, xattrs: dict[str, bytes] | None,
               *, replace_xattrs: bool = False) -> None:
    """Owner, mode, xattrs then times (in that order: chown clears set-id bits and
    capabilities, and every change but utime touches ctime only)."""
    is_link = stat.S_ISLNK(st.st_mode)
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if xattrs is not None and (xattrs or replace_xattrs):
        set_xattrs(path, xattrs, replace=replace_xattrs)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_range(fd_in: int, fd_out: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
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


def copy_entry(src: str, dst: str, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
    """Create ``dst`` (which must not exist) as a copy of non-directory ``src``."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                copy_file_data(fd_in, fd_out, st)
                os.fchown(fd_out, st.st_uid, st.st_gid)
                os.fchmod(fd_out, stat.S_IMODE(mode))
                for name, value in xattrs.items():
                    os.setxattr(fd_out, name, value)
                os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    else:
        raise OSError(errno.EINVAL, f"cannot copy file type {stat.S_IFMT(mode):o}", src)
    apply_meta(dst, st, xattrs)


def overwrite_file(src: str, dst: str, st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    """Rewrite the existing regular file ``dst`` (a private copy with no other links) to
    be a copy of ``src``: same result as replacing it, but ext4 frees and allocates less.

    Returns False (touching nothing) when ``dst`` is not a single-link regular file.
    """
    try:
        dst_st = os.lstat(dst)
    except FileNotFoundError:
        return False
    # Never open anything but a regular file: opening a device node can have effects.
    if not stat.S_ISREG(dst_st.st_mode) or dst_st.st_nlink != 1:
        return False
    fd_out = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if dst_st.st_size:
                os.ftruncate(fd_out, 0)
            copy_file_data(fd_in, fd_out, st)
        finally:
            os.close(fd_in)
        os.fchown(fd_out, st.st_uid, st.st_gid)
        os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(fd_out):
            if name not in xattrs:
                os.removexattr(fd_out, name)
        for name, value in xattrs.items():
            os.setxattr(fd_out, name, value)
        os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    finally:
        os.close(fd_out)


def remove_any(path: str) -> None:
    """Remove ``path`` whatever it is (a directory with its contents); absent is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        remove_tree(path)
    except PermissionError:  # EPERM from unlink of a directory on some file systems
        if stat.S_ISDIR(os.lstat(path).st_mode):
            remove_tree(path)
        else:
            raise


def remove_tree(path: str | Path) -> None:
    """rmtree that also copes with read-only directories (we are root, but be explicit)."""
    shutil.rmtree(path)
