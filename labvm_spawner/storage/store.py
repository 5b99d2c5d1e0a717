"""Versioned layer store on a local directory or a MooseFS mount.

Layout under the store root, per key (a validated user or user.server name)::

    <key>/versions/<N>/      immutable, published versions 1..n
    <key>/current            symlink -> versions/<N>, swapped atomically
    <key>/.staging/          versions being built; never visible as current

A version becomes visible only by renaming a finished staging directory into
``versions/`` and then atomically replacing the ``current`` symlink, so a crash
leaves either the old or the new version current.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,31}(\.[a-z0-9][a-z0-9_-]{0,63})?$")


class StoreError(Exception):
    """A store operation was refused; the message says why, for a person."""


class LayerStore:
    """Numbered, immutable layer versions for each key, with an atomic current pointer."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def key_dir(self, key: str) -> Path:
        if not _KEY.match(key):
            raise StoreError(f"invalid layer key {key!r}")
        return self.root / key

    def versions(self, key: str) -> list[int]:
        """Published version numbers of ``key``, oldest first."""
        vdir = self.key_dir(key) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())

    def current_version(self, key: str) -> int | None:
        link = self.key_dir(key) / "current"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        return int(Path(target).name)

    def version_path(self, key: str, n: int) -> Path:
        return self.key_dir(key) / "versions" / str(n)

    def current_path(self, key: str) -> Path:
        """The current version's directory, creating an empty version 1 first if there is none."""
        n = self.current_version(key)
        if n is None:
            staging = self.key_dir(key) / ".staging"
            staging.mkdir(parents=True, exist_ok=True)
            tmp = staging / "1"
            tmp.mkdir(exist_ok=True)
            tmp.chmod(0o755)
            self.publish(key, 1, tmp)
            n = 1
        return self.version_path(key, n)

    def publish(self, key: str, n: int, built: Path) -> None:
        """Make the finished directory ``built`` version ``n`` and point ``current`` at it."""
        kdir = self.key_dir(key)
        final = kdir / "versions" / str(n)
        final.parent.mkdir(parents=True, exist_ok=True)
        if built != final:
            os.rename(built, final)
        tmp_link = kdir / f".current.{n}.tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(f"versions/{n}", tmp_link)
        os.replace(tmp_link, kdir / "current")
        _fsync_dir(kdir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(root: str | os.PathLike[str]) -> LayerStore:
    """Open the store at ``root`` (a local directory or a MooseFS mount point)."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return LayerStore(path)
