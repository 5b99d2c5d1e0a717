"""What file system a path lives on, from /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline, backslash and '#' as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str | Path) -> tuple[str, str, str]:
    """(mount point, fs type, source) of the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("/", "", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = _unescape(left.split()[4])
            fstype, source = (right.split() + ["", ""])[:2]
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype, _unescape(source))
    return best


# A second, read-only mount of the store's MooseFS for roots to read layer versions
# through (a node's cached_store_root): versions never change once published, so an
# hour's caches are safe. scripts/moosefs.sh spells the same (CACHED_OPTS).
CACHED_MOUNT_OPTIONS = ("ro,nosuid,nodev,mfsattrcacheto=3600,mfsentrycacheto=3600,"
                        "mfsnegentrycacheto=3600,mfsdirentrycacheto=3600")


def is_moosefs(path: str | Path) -> bool:
    _mnt, fstype, source = mount_of(path)
    return fstype.startswith("fuse") and (source.startswith("mfs#") or "mfs" in fstype)


def is_fuse(path: str | Path) -> bool:
    return mount_of(path)[1].startswith("fuse")


def is_mountpoint(path: str | Path) -> bool:
    return os.path.ismount(path) or mount_of(path)[0] == os.path.realpath(path)
