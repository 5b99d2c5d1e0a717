"""Shared helpers: random file-system operations, overlay mounts, tree snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hypothesis import strategies as st

NAMES = ["a", "b", "c"]
UIDS = [0, 1000, 65534]
MODES = [0o755, 0o700, 0o644, 0o600, 0o4755, 0o1777, 0o444, 0o2750]
XNAMES = ["user.k1", "user.k2"]
SIZES = [0, 3, 5000, 300_000]
OVERLAY_OPTS = "redirect_dir=off,metacopy=off,index=off,xino=off"
# Absolute symlinks in random trees point here, never at a real system path: a
# directory the storage tests make and check is untouched (tests/storage/conftest.py).
CANARY = "/tmp/labvm-test-canary"

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
data = st.binary(max_size=64)
mtimes = st.integers(min_value=0, max_value=2_000_000_000).map(lambda s: s * 10**9 + 123456789)

op = st.one_of(
    st.tuples(st.just("write"), paths, data),
    st.tuples(st.just("pwrite"), paths, st.sampled_from([0, 2, 100_000]), data),
    st.tuples(st.just("truncate"), paths, st.sampled_from(SIZES)),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("rmtree"), paths),
    st.tuples(st.just("mkdir"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("chown"), paths, st.sampled_from(UIDS), st.sampled_from(UIDS)),
    st.tuples(st.just("setxattr"), paths, st.sampled_from(XNAMES), data),
    st.tuples(st.just("rmxattr"), paths, st.sampled_from(XNAMES)),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", CANARY, "x/y"]), paths),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("mkfifo"), paths),
    st.tuples(st.just("mknod"), paths),
    st.tuples(st.just("utime"), paths, mtimes),
)
# Build-up ops for a lower tree: mostly creations so there is something to change.
build_op = st.one_of(
    st.tuples(st.just("mkdir"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("write"), paths, data),
    st.tuples(st.just("truncate"), paths, st.sampled_from(SIZES)),
    st.tuples(st.just("symlink"), st.sampled_from(["a", CANARY]), paths),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("mkfifo"), paths),
    st.tuples(st.just("chown"), paths, st.sampled_from(UIDS), st.sampled_from(UIDS)),
    st.tuples(st.just("setxattr"), paths, st.sampled_from(XNAMES), data),
    st.tuples(st.just("utime"), paths, mtimes),
)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_parent(root: Path, rel: str, create: bool = False) -> tuple[int, str]:
    """The directory holding ``rel`` under ``root`` (a descriptor) and the last name.

    Each component is opened with O_NOFOLLOW, so a symlink on the way fails the op
    (ELOOP/ENOTDIR) instead of leading the test's own writes out of the tree. With
    ``create``, missing directories on the way are made.
    """
    names = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[:-1]:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            nfd = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, names[-1]


def _xpath(dirfd: int, name: str) -> str:
    # The entry itself, by its parent's descriptor: nothing on the way can be a symlink.
    return f"/proc/self/fd/{dirfd}/{name}"


def apply_op(root: Path, o: tuple) -> None:
    """Apply one op under ``root``; ops that make no sense in the current tree just fail.

    Never follows a symlink: the tree holds symlinks to CANARY and elsewhere.
    """
    kind = o[0]
    try:
        if kind == "symlink":
            fd, name = open_parent(root, o[2])
            try:
                os.symlink(o[1], name, dir_fd=fd)
            finally:
                os.close(fd)
            return
        if kind in ("rename", "link"):
            sfd, sname = open_parent(root, o[1])
            try:
                dfd, dname = open_parent(root, o[2])
                try:
                    if kind == "rename":
                        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                    else:
                        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd,
                                follow_symlinks=False)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
            return
        fd, name = open_parent(root, o[1], create=kind in ("write", "truncate"))
        try:
            _apply_at(fd, name, o)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        pass


def _apply_at(fd: int, name: str, o: tuple) -> None:
    kind = o[0]
    nofollow = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if kind == "write":
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | nofollow, 0o644, dir_fd=fd)
        try:
            os.write(f, o[2])
        finally:
            os.close(f)
    elif kind == "pwrite":
        f = os.open(name, os.O_WRONLY | nofollow, dir_fd=fd)
        try:
            os.pwrite(f, o[3], o[2])
        finally:
            os.close(f)
    elif kind == "truncate":
        f = os.open(name, os.O_WRONLY | os.O_CREAT | nofollow, 0o640, dir_fd=fd)
        try:
            os.ftruncate(f, o[2])
        finally:
            os.close(f)
    elif kind == "unlink":
        os.unlink(name, dir_fd=fd)
    elif kind == "rmtree":
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=fd)  # descriptor-based: never follows a symlink
            if len(o[1]) % 2:  # sometimes recreate: rmdir then mkdir over a lower dir
                os.mkdir(name, 0o700, dir_fd=fd)
    elif kind == "mkdir":
        os.mkdir(name, 0o700, dir_fd=fd)
        os.chmod(name, o[2], dir_fd=fd, follow_symlinks=False)
    elif kind == "chmod":
        if not stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            os.chmod(name, o[2], dir_fd=fd, follow_symlinks=False)
    elif kind == "chown":
        os.chown(name, o[2], o[3], dir_fd=fd, follow_symlinks=False)
    elif kind == "setxattr":
        os.setxattr(_xpath(fd, name), o[2], o[3], follow_symlinks=False)
    elif kind == "rmxattr":
        os.removexattr(_xpath(fd, name), o[2], follow_symlinks=False)
    elif kind == "mkfifo":
        os.mkfifo(name, 0o640, dir_fd=fd)
    elif kind == "mknod":
        os.mknod(name, stat.S_IFCHR | 0o660, os.makedev(1, 3), dir_fd=fd)
    elif kind == "utime":
        os.utime(name, ns=(o[2], o[2]), dir_fd=fd, follow_symlinks=False)
    else:
        raise AssertionError(kind)


@contextlib.contextmanager
def overlay(lower: Path, upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """A real kernel overlay mount, unmounted on every way out."""
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},{OVERLAY_OPTS}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True,
                   capture_output=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True, capture_output=True)


def _xattrs_at(dirfd: int, name: str | None) -> dict[str, bytes]:
    target, follow = (dirfd, True) if name is None else (_xpath(dirfd, name), False)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError:
        return {}
    return {n: os.getxattr(target, n, follow_symlinks=follow) for n in sorted(names)
            if not n.startswith("security.")}


def _digest_at(dirfd: int, name: str) -> str:
    h = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, seconds_only: bool = False,
             ident: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple]:
    """Everything a user sees under ``root``: names, types, modes, owners, mtimes,
    xattrs, symlink targets, device numbers and contents (by hash).

    Walks by directory descriptors (any depth, no symlink followed); ``ident`` gets
    each entry's (st_dev, st_ino).
    """
    out: dict[str, tuple] = {}
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, str]] = [(top, "")]
    try:
        while stack:
            fd, rel = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    r = f"{rel}/{name}" if rel else name
                    s = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    mtime = s.st_mtime_ns // 10**9 if seconds_only else s.st_mtime_ns
                    body: object = None
                    if stat.S_ISREG(s.st_mode):
                        body = (s.st_size, _digest_at(fd, name))
                    elif stat.S_ISLNK(s.st_mode):
                        body = os.readlink(name, dir_fd=fd)
                    elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
                        body = (os.major(s.st_rdev), os.minor(s.st_rdev))
                    out[r] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid,
                              s.st_gid, mtime, _xattrs_at(fd, name), body)
                    if ident is not None:
                        ident[r] = (s.st_dev, s.st_ino)
                    if stat.S_ISDIR(s.st_mode):
                        stack.append((os.open(name, _DIR, dir_fd=fd), r))
            finally:
                os.close(fd)
    finally:
        for fd, _rel in stack:
            os.close(fd)
    return out


def snapshot_root(root: Path, seconds_only: bool = False) -> tuple:
    """Owner, mode, mtime and xattrs of the top directory itself."""
    s = os.lstat(root)
    mtime = s.st_mtime_ns // 10**9 if seconds_only else s.st_mtime_ns
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, mtime, _xattrs_at(fd, None))
    finally:
        os.close(fd)


def lstat_rel(root: Path, rel: str) -> os.stat_result:
    """lstat of ``rel`` under ``root`` without following a symlink on the way."""
    fd, name = open_parent(root, rel)
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def groups_from(identity: dict[str, tuple[int, int]]) -> set[frozenset[str]]:
    by: dict[tuple[int, int], set[str]] = {}
    for path, ident in identity.items():
        by.setdefault(ident, set()).add(path)
    return {frozenset(g) for g in by.values() if len(g) > 1}


def link_groups(root: Path, view: dict[str, tuple]) -> set[frozenset[str]]:
    """Hard link groups of the non-directories of a plain tree."""
    ident = {}
    for r, v in view.items():
        if v[0] != stat.S_IFDIR:
            s = lstat_rel(root, r)
            ident[r] = (s.st_dev, s.st_ino)
    return groups_from(ident)


def overlay_link_groups(lower: Path, upper: Path, view: dict[str, tuple]) -> set[frozenset[str]]:
    """Hard link groups of an overlay view, by the real inode behind each name.

    With index=off a copied-up file is a new inode (its former links stay in the
    lower), yet overlay keeps reporting the lower's inode number for it, so the
    view's st_ino cannot tell; the name resolves to the upper entry when there is
    one (the view already showed it is visible), else to the lower's.
    """
    ident = {}
    for r, v in view.items():
        if v[0] == stat.S_IFDIR:
            continue
        try:
            s = lstat_rel(upper, r)
            ident[r] = ("u", s.st_ino)
        except (FileNotFoundError, NotADirectoryError, OSError):
            s = lstat_rel(lower, r)
            ident[r] = ("l", s.st_ino)
    return groups_from(ident)  # type: ignore[arg-type]


def diff(a: dict[str, tuple], b: dict[str, tuple]) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}:\n  expected {a.get(k)}\n  got      {b.get(k)}")
    return "\n".join(lines[:20])
