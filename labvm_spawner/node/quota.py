"""Per-root disk quotas on a node's uppers: a btrfs subvolume per root, with a qgroup limit.

The node's ``<state_dir>/uppers`` is a btrfs of its own with quotas enabled
(``scripts/upperfs.sh``: a disk in production, a sparse file in the one-node default).
Each root's ``uppers/<key>/`` is a subvolume holding its ``upper/`` and ``work/`` (overlayfs
needs both on one subvolume: btrfs refuses renames between subvolumes). The kernel
charges every block the container writes to that subvolume's qgroup; past the limit
the write fails with EDQUOT ("Disk quota exceeded") while other roots, the hub and the
node keep working. Limits change on a live subvolume, so a raise needs no restart.

Why btrfs and not XFS project quotas: the kernels we run on are not all built with
quota support. This machine's and CI's kernel has neither CONFIG_XFS_QUOTA (XFS says
"quota support not available in this kernel") nor CONFIG_QUOTA (ext4's prjquota
fails the same way). btrfs qgroups are btrfs's own accounting and need neither.

Only LabVM's own paths (``uppers/<key>``) are handed to ``btrfs``; the tree inside
``upper/`` is the user's, and this module never enters it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabVMError
from ..names import is_key
from ..storage.fsops import syncfs


class QuotaError(LabVMError):
    """The node cannot apply a disk quota, or refuses the one asked."""

    status = 409


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    limit_bytes: int | None  # None: no limit


NO_QUOTA_FS = ("are not on a btrfs with quotas on (scripts/upperfs.sh sets one up)")


def _btrfs(*args: str) -> str:
    try:
        out = subprocess.run(["btrfs", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise QuotaError("btrfs is not installed on this node (apt-get install btrfs-progs)"
                         ) from None
    if out.returncode != 0:
        raise QuotaError(f"btrfs {' '.join(args[:2])} failed: "
                         f"{(out.stderr or out.stdout).strip()[-300:]}")
    return out.stdout


def _fstype(path: Path) -> str | None:
    """The type of the file system mounted at ``path`` (the last mount wins)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4].encode().decode("unicode_escape") == str(path):
                found = right.split()[0]
    return found


def _listing(uppers: Path) -> str | None:
    """``btrfs qgroup show -r --raw`` of ``uppers``; None unless it is the mount point of
    a btrfs with quotas enabled (the listing itself says whether they are)."""
    if _fstype(uppers) != "btrfs":
        return None
    try:
        return _btrfs("qgroup", "show", "-r", "--raw", str(uppers))
    except QuotaError:
        return None  # "quotas not enabled"


def quotas_on(uppers: Path) -> bool:
    """True when ``uppers`` is the mount point of a btrfs with quotas enabled."""
    return _listing(uppers) is not None


def is_subvolume(path: Path) -> bool:
    # A subvolume's root directory has inode 256 on btrfs.
    try:
        return path.lstat().st_ino == 256 and not path.is_symlink()
    except OSError:
        return False


# "btrfs qgroup show -r --raw": qgroupid, referenced, exclusive, max referenced, path
_SHOW = re.compile(r"^0/(\d+)\s+(\d+)\s+(\d+)\s+(\S+)(?:\s+(\S.*))?$")


def _parse(line: str) -> tuple[str, Usage] | None:
    m = _SHOW.match(line.strip())
    if not m:
        return None
    limit = m.group(4)
    return m.group(5) or "", Usage(int(m.group(2)), int(limit) if limit.isdigit() else None)


def usage(base: Path) -> Usage:
    """What the subvolume ``base`` uses, and its limit."""
    out = _btrfs("qgroup", "show", "-rF", "--raw", str(base))
    for line in out.splitlines():
        got = _parse(line)
        if got:
            return got[1]
    raise QuotaError(f"no quota group for {base}")


def set_limit(base: Path, limit_bytes: int | None) -> None:
    _btrfs("qgroup", "limit", "none" if limit_bytes is None else str(limit_bytes), str(base))


class Quotas:
    """The disk quotas of the roots under one node's ``uppers`` directory."""

    def __init__(self, uppers: Path) -> None:
        self.uppers = uppers

    def enabled(self) -> bool:
        return quotas_on(self.uppers)

    def make_base(self, base: Path) -> None:
        """Create ``uppers/<key>`` as a subvolume where quotas are on, else a directory."""
        if base.exists():
            return
        base.parent.mkdir(parents=True, exist_ok=True)
        if base.parent == self.uppers and self.enabled():
            _btrfs("subvolume", "create", str(base))
            base.chmod(0o700)
        else:
            base.mkdir(mode=0o700)

    def apply(self, key: str, limit_bytes: int | None) -> Usage | None:
        """Put ``key``'s quota in force; None where this node has no quotas.

        A limit on a node without quotas is refused rather than silently not enforced.
        """
        base = self.uppers / key
        if not self.enabled():
            if limit_bytes is not None:
                raise QuotaError(f"this node cannot enforce a disk quota: {self.uppers} "
                                 + NO_QUOTA_FS)
            return None
        if not is_subvolume(base):
            if limit_bytes is None:
                return None
            raise QuotaError(f"the upper of {key} predates this node's quota file system; "
                             "move it aside (labvm-node doctor) before giving it a quota")
        set_limit(base, limit_bytes)
        return usage(base)

    def change(self, key: str, limit_bytes: int | None) -> Usage:
        """Change a live root's limit; one below what it already uses is refused."""
        base = self.uppers / key
        if not self.enabled() or not is_subvolume(base):
            raise QuotaError(f"{key} has no disk quota on this node: {self.uppers} "
                             + NO_QUOTA_FS)
        syncfs(base)  # commits btrfs's transaction: usage is otherwise up to 30 s old
        now = usage(base)
        if limit_bytes is not None and limit_bytes < now.used_bytes:
            raise QuotaError(
                f"{key} already uses {now.used_bytes >> 20} MiB; a quota of "
                f"{limit_bytes >> 20} MiB would leave it unable to write anything. Nothing "
                "was changed; the quota stays "
                + ("unlimited" if now.limit_bytes is None else f"{now.limit_bytes >> 20} MiB"))
        set_limit(base, limit_bytes)
        return usage(base)

    def all_usage(self) -> dict[str, Usage]:
        """Every root's usage and limit, from one listing (what the monitor samples)."""
        out = _listing(self.uppers)  # one btrfs run per sample
        if out is None:
            return {}
        return {path: u for path, u in filter(None, map(_parse, out.splitlines()))
                if is_key(path)}

    def usage(self, key: str) -> Usage | None:
        base = self.uppers / key
        if not is_subvolume(base) or not self.enabled():
            return None
        return usage(base)
