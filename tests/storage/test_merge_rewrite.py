"""A lower file that the upper replaces, on a local disk: rewritten in place, yet what a
user sees is exactly the upper's file (bytes, size, owner, mode, xattrs, times), and a
lower inode with other links, or one that is not a regular file, is replaced instead."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from labvm_spawner.storage.merge import merge_upper


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # not left to the umask


def seen(path: Path) -> tuple:
    st = os.lstat(path)
    xattrs = {k: os.getxattr(path, k) for k in os.listxattr(path)}
    return (path.read_bytes(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), xattrs,
            st.st_mtime_ns)


def test_replaced_files_match_the_upper(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    # lower: longer, set-uid, another owner, an xattr the upper's file does not have
    write(lower / "shrinks", b"old content " * 500, 0o4755)
    os.chown(lower / "shrinks", 1000, 1000)
    os.setxattr(lower / "shrinks", "user.old", b"1")
    write(upper / "shrinks", b"new", 0o640)
    os.setxattr(upper / "shrinks", "user.new", b"2")
    os.utime(upper / "shrinks", ns=(1_000_000_000, 2_000_000_000))
    # lower shorter than upper; the upper's file is set-gid and owned by someone else
    write(lower / "grows", b"x")
    write(upper / "grows", b"y" * 100_000, 0o2750)
    os.chown(upper / "grows", 1001, 1002)
    os.chmod(upper / "grows", 0o2750)  # chown cleared the set-gid bit
    # a sparse upper file keeps its hole
    write(lower / "sparse", b"z" * 10)
    fd = os.open(upper / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 64 << 20)
    os.close(fd)
    # an upper file that empties a lower one
    write(lower / "emptied", b"data")
    write(upper / "emptied", b"")
    # a lower file with two links: its other name keeps the old bytes
    write(lower / "linked", b"lower bytes")
    os.link(lower / "linked", lower / "other-link")
    write(upper / "linked", b"upper bytes")
    # a lower fifo under an upper regular file: replaced, never opened
    os.mkfifo(lower / "fifo")
    write(upper / "fifo", b"now a file")

    rewritten = {n: os.lstat(lower / n).st_ino for n in ("shrinks", "grows", "emptied")}
    want = {n: seen(upper / n) for n in ("shrinks", "grows", "emptied", "linked", "fifo")}
    merge_upper(upper, lower, workers=2)

    for name, expected in want.items():
        assert seen(lower / name) == expected, name
    for name, ino in rewritten.items():
        assert os.lstat(lower / name).st_ino == ino, f"{name} was not rewritten in place"
    assert (lower / "other-link").read_bytes() == b"lower bytes"
    assert os.lstat(lower / "linked").st_ino != os.lstat(lower / "other-link").st_ino
    st = os.lstat(lower / "sparse")
    assert st.st_size == (64 << 20) + 3
    assert st.st_blocks * 512 < 1 << 20, "the hole was filled"
    with open(lower / "sparse", "rb") as f:
        f.seek(64 << 20)
        assert f.read() == b"end"
