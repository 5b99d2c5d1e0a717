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
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/etc", "x/y"]), paths),
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
    st.tuples(st.just("symlink"), st.sampled_from(["a", "/etc"]), paths),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("mkfifo"), paths),
    st.tuples(st.just("chown"), paths, st.sampled_from(UIDS), st.sampled_from(UIDS)),
    st.tuples(st.just("setxattr"), paths, st.sampled_from(XNAMES), data),
    st.tuples(st.just("utime"), paths, mtimes),
)


def apply_op(root: Path, o: tuple) -> None:
    """Apply one op under ``root``; ops that make no sense in the current tree just fail."""
    kind, p = o[0], root / o[1]
    try:
        if kind == "write":
            p.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(p, flags, 0o644)
            try:
                os.write(fd, o[2])
            finally:
                os.close(fd)
        elif kind == "pwrite":
            fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                os.pwrite(fd, o[3], o[2])
            finally:
                os.close(fd)
        elif kind == "truncate":
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
            try:
                os.ftruncate(fd, o[2])
            finally:
                os.close(fd)
        elif kind == "unlink":
            os.unlink(p)
        elif kind == "rmtree":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                if len(o[1]) % 2:  # sometimes recreate: rmdir then mkdir over a lower dir
                    p.mkdir()
        elif kind == "mkdir":
            p.mkdir(mode=0o700)
            os.chmod(p, o[2])
        elif kind == "rename":
            os.rename(p, root / o[2])
        elif kind == "chmod":
            if not p.is_symlink():
                os.chmod(p, o[2])
        elif kind == "chown":
            os.chown(p, o[2], o[3], follow_symlinks=False)
        elif kind == "setxattr":
            os.setxattr(p, o[2], o[3], follow_symlinks=False)
        elif kind == "rmxattr":
            os.removexattr(p, o[2], follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(o[1], root / o[2])
        elif kind == "link":
            os.link(p, root / o[2], follow_symlinks=False)
        elif kind == "mkfifo":
            os.mkfifo(p, 0o640)
        elif kind == "mknod":
            os.mknod(p, stat.S_IFCHR | 0o660, os.makedev(1, 3))
        elif kind == "utime":
            os.utime(p, ns=(o[2], o[2]), follow_symlinks=False)
        else:
            raise AssertionError(kind)
    except (OSError, ValueError):
        pass


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


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
            if not n.startswith("security.")}


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, seconds_only: bool = False) -> dict[str, tuple]:
    """Everything a user sees under ``root``: names, types, modes, owners, mtimes,
    xattrs, symlink targets, device numbers and contents (by hash)."""
    out: dict[str, tuple] = {}

    def walk(d: str, rel: str) -> None:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            r = f"{rel}/{name}" if rel else name
            s = os.lstat(p)
            mtime = s.st_mtime_ns // 10**9 if seconds_only else s.st_mtime_ns
            body: object = None
            if stat.S_ISREG(s.st_mode):
                body = (s.st_size, _digest(p))
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
                body = (os.major(s.st_rdev), os.minor(s.st_rdev))
            out[r] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                      mtime, _xattrs(p), body)
            if stat.S_ISDIR(s.st_mode):
                walk(p, r)

    walk(str(root), "")
    return out


def snapshot_root(root: Path, seconds_only: bool = False) -> tuple:
    """Owner, mode, mtime and xattrs of the top directory itself."""
    s = os.lstat(root)
    mtime = s.st_mtime_ns // 10**9 if seconds_only else s.st_mtime_ns
    return (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, mtime, _xattrs(str(root)))


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
            s = os.lstat(root / r)
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
            s = os.lstat(upper / r)
            ident[r] = ("u", s.st_ino)
        except (FileNotFoundError, NotADirectoryError):
            s = os.lstat(lower / r)
            ident[r] = ("l", s.st_ino)
    return groups_from(ident)  # type: ignore[arg-type]


def diff(a: dict[str, tuple], b: dict[str, tuple]) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}:\n  expected {a.get(k)}\n  got      {b.get(k)}")
    return "\n".join(lines[:20])
