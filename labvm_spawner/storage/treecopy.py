"""Cheap private copies of a version directory.

On MooseFS a snapshot (``mfsmakesnapshot``) copies only metadata; chunks are
shared copy-on-write, so writing the copy never changes the original. Snapshots
do not keep hard links, so groups are re-linked afterwards. Elsewhere ``cp -a
--reflink=auto`` (a real copy on ext4, a reflink on xfs/btrfs). Never hard links
between versions: a later write through one version would change the other.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from .errors import StoreError
from .mounts import is_moosefs, mount_of


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise StoreError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")


def hardlink_groups(root: str | Path) -> list[list[str]]:
    """Relative paths of each group of hard-linked non-directories under ``root``."""
    groups: dict[tuple[int, int], list[str]] = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                groups.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(p, root))
    return [g for g in groups.values() if len(g) > 1]


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` (must not exist) an independent copy of directory ``src``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise StoreError(f"copy target {dst} exists")
    if is_moosefs(src) and is_moosefs(dst.parent) and mount_of(src)[0] == mount_of(dst.parent)[0]:
        _run(["mfsmakesnapshot", os.fspath(src), os.fspath(dst)])
        for group in hardlink_groups(src):
            first = dst / group[0]
            for other in group[1:]:
                tmp = dst / (other + ".labvm-relink")
                os.link(first, tmp)
                os.replace(tmp, dst / other)
        return
    _run(["cp", "-a", "--reflink=auto", "--no-target-directory", os.fspath(src), os.fspath(dst)])
