"""Overlay roots on the node: mounting and unmounting one server's root filesystem.

Layer order, top to bottom: the node-local upper (writable), the user's current
layer version from the store, the image's root filesystem. ``redirect_dir``,
``metacopy`` and ``index`` stay off so that the upper can always be merged
offline by plain overlayfs rules (see ``labvm_spawner.storage``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabVMError

log = logging.getLogger("labvm.node")

MOUNT_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"


@dataclass(frozen=True)
class RootPaths:
    """Where one server's root lives on the node."""

    upper: Path
    work: Path
    merged: Path

    @classmethod
    def for_key(cls, state_dir: Path, key: str) -> RootPaths:
        base = state_dir / "uppers" / key
        return cls(upper=base / "upper", work=base / "work", merged=state_dir / "mnt" / key)


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape")


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {_unescape_mountinfo(line.split()[4]) for line in f}


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def through_cache(layer: Path, store_root: Path, cached_root: Path | None) -> Path:
    """``layer`` (a published version or pending layer under ``store_root``) as read
    through the cached, read-only mount of the same store, when that mount shows the
    very same directory; otherwise ``layer`` itself.

    The cache may still hold what a path was before (looked up before it was
    published, or a number used again after a prune): a different inode, or none, and
    the root reads that layer through the store's own mount instead.
    """
    if cached_root is None:
        return layer
    cached = cached_root / layer.relative_to(store_root)
    try:
        if os.stat(cached).st_ino == os.stat(layer).st_ino:
            return cached
    except OSError:
        pass
    log.warning("layer %s is read through the store's own mount: the cached mount does not "
                "show it (yet)", layer)
    return layer


def mount_root(paths: RootPaths, lowers: list[Path], owner: int) -> None:
    """Mount the overlay at ``paths.merged`` (idempotent: an existing mount is kept)."""
    for p in lowers:
        if not p.is_dir():
            raise LabVMError(f"layer {p} is missing; the root cannot be mounted")
        if any(c in str(p) for c in ",:\\"):
            raise LabVMError(f"layer path {p} contains a character overlayfs cannot take")
    if is_mounted(paths.merged):
        return
    for d in (paths.upper, paths.work, paths.merged):
        d.mkdir(parents=True, exist_ok=True)
    # The upper's root must belong to the container's root (a shifted, unprivileged uid).
    os.chown(paths.upper, owner, owner)
    paths.upper.chmod(0o755)
    opts = (f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={paths.upper},"
            f"workdir={paths.work},{MOUNT_OPTIONS}")
    proc = subprocess.run(["mount", "-t", "overlay", "labvm", "-o", opts, str(paths.merged)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabVMError(f"mounting the overlay root failed: {proc.stderr.strip()}")


def unmount_root(paths: RootPaths) -> None:
    """Unmount the overlay if mounted; the upper (the user's data) is kept."""
    if not is_mounted(paths.merged):
        return
    proc = subprocess.run(["umount", str(paths.merged)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabVMError(f"unmounting {paths.merged} failed: {proc.stderr.strip()}")


def top_level_dirs(merged: Path, skip: frozenset[str]) -> list[str]:
    """Real directories directly under the merged root, to be bind-mounted into the container."""
    out = []
    for entry in os.scandir(merged):
        if entry.name in skip or not entry.is_dir(follow_symlinks=False):
            continue
        out.append(entry.name)
    return sorted(out)
