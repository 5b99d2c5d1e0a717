"""A key's store quota: how many bytes of files one version of its root may hold.

Versions share their data (snapshots on MooseFS, reflinks elsewhere), so the quota bounds
what a user stores, not the store's raw use of all versions:

* A commit that would publish a version over the quota is refused: its staged copy is
  removed and the current version stays (``LayerStore.commit``).
* On MooseFS the sync's mirror (``upper-sync``) carries the same limit as a hard
  ``mfssetquota`` length quota, so the master itself refuses writes past it (EDQUOT):
  the sync counts them as errors and keeps what it copied.
* A local store's mirror needs no limit of its own: it copies an upper that the node's
  disk quota (node/quota.py) already bounds.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from . import safepath
from .errors import StoreError
from .mounts import is_moosefs


class StoreQuotaExceeded(StoreError):
    """A commit would make a version bigger than the key's store quota."""


def _mfs(*cmd: str) -> str:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise StoreError(f"{cmd[0]} failed: {(out.stderr or out.stdout).strip()[-300:]}")
    return out.stdout


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """The sum of the lengths of the regular files under ``path`` (never following links)."""
    if is_moosefs(path):  # the master keeps this per directory: one call
        first = _mfs("mfsdirinfo", "-n", "-l", os.fspath(path)).split()
        return int(first[0])
    total = 0

    def enter(w: safepath.Walk, fds: list[int], _ctx: object) -> tuple[list[str], None]:
        nonlocal total
        subdirs = []
        for name, st in safepath.scandir(fds[0]).items():
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
        return subdirs, None

    top = safepath.open_root(path)
    try:
        safepath.walk([top], enter, lost=lambda w, e: None)
    finally:
        os.close(top)
    return total


def set_mirror_limit(mirror: Path, limit: int | None) -> None:
    """On MooseFS, a hard length quota on the sync's mirror (None: none)."""
    if not is_moosefs(mirror.parent):
        return
    mirror.mkdir(parents=True, exist_ok=True)
    if limit is None:  # fails harmlessly where none was set
        subprocess.run(["mfsdelquota", "-L", os.fspath(mirror)], capture_output=True,
                       timeout=120)
        return
    _mfs("mfssetquota", "-n", "-L", str(limit), os.fspath(mirror))
