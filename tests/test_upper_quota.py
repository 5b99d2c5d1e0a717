"""Disk quotas on a node's uppers: a real btrfs (scripts/upperfs.sh) and real overlay mounts.

One root with a small quota fills it and gets EDQUOT through its overlay while another
root on the same file system writes on; deleting frees the room again; a live raise
takes effect at once, and a limit below what is used is refused with nothing changed.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from support.components import REPO, require

from labvm_spawner.node import overlay
from labvm_spawner.node.quota import QuotaError, Quotas, is_subvolume

UPPERFS = REPO / "scripts" / "upperfs.sh"
M = 1 << 20


@pytest.fixture
def uppers(tmp_path: Path):
    require(os.geteuid() == 0, "root for btrfs and overlay mounts")
    up = subprocess.run([str(UPPERFS), "up", str(tmp_path), "512M"], capture_output=True,
                        text=True)
    require(up.returncode == 0, f"a btrfs for uppers ({up.stderr.strip()[-300:]})")
    mounted: list[overlay.RootPaths] = []
    try:
        yield tmp_path / "uppers", mounted
    finally:
        for paths in mounted:
            overlay.unmount_root(paths)
        subprocess.run([str(UPPERFS), "down", str(tmp_path)], check=True)


def _root(tmp_path: Path, uppers: Path, key: str, mounted: list) -> overlay.RootPaths:
    lower = tmp_path / "lower"
    lower.mkdir(exist_ok=True)
    Quotas(uppers).make_base(uppers / key)
    paths = overlay.RootPaths(upper=uppers / key / "upper", work=uppers / key / "work",
                              merged=tmp_path / "mnt" / key)
    overlay.mount_root(paths, [lower], 0)
    mounted.append(paths)
    return paths


def _write(path: Path, n_bytes: int) -> int:
    """Write up to ``n_bytes`` (synced); return what got written before an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    done = 0
    chunk = b"\xa5" * M
    try:
        while done < n_bytes:
            done += os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def test_a_full_quota_fails_only_its_own_root(tmp_path: Path, uppers) -> None:
    up, mounted = uppers
    quotas = Quotas(up)
    assert quotas.enabled()
    alice = _root(tmp_path, up, "alice", mounted)
    bob = _root(tmp_path, up, "bob", mounted)
    assert is_subvolume(up / "alice") and is_subvolume(up / "bob")
    assert quotas.apply("alice", 32 * M).limit_bytes == 32 * M
    assert quotas.apply("bob", None).limit_bytes is None
    listed = quotas.all_usage()  # what the monitor samples, in one listing
    assert listed["alice"].limit_bytes == 32 * M and listed["bob"].limit_bytes is None

    with pytest.raises(OSError) as full:
        _write(alice.merged / "big", 64 * M)
    assert full.value.errno == errno.EDQUOT
    # Bob, on the same file system, is not affected.
    assert _write(bob.merged / "big", 64 * M) == 64 * M
    used = quotas.usage("alice")
    assert used is not None and 24 * M < used.used_bytes <= 33 * M

    # A quota below what alice uses is refused; the old one stays.
    with pytest.raises(QuotaError, match="already uses .* Nothing was changed; the quota "
                                         "stays 32 MiB"):
        quotas.change("alice", 16 * M)
    assert quotas.usage("alice").limit_bytes == 32 * M

    # Deleting frees the room again.
    os.unlink(alice.merged / "big")
    subprocess.run(["sync", "-f", str(up)], check=True)
    assert _write(alice.merged / "small", 8 * M) == 8 * M

    # A raise on the live root applies at once, without a remount.
    quotas.change("alice", 128 * M)
    assert _write(alice.merged / "bigger", 80 * M) == 80 * M
    assert (alice.merged / "bigger").stat().st_size == 80 * M
    assert quotas.all_usage()["alice"].used_bytes > 80 * M

    # Quotas switched off on the file system: the node says so, the monitor lists none.
    subprocess.run(["btrfs", "quota", "disable", str(up)], check=True)
    assert not quotas.enabled() and quotas.all_usage() == {}


def test_a_quota_on_a_node_without_the_quota_file_system_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "uppers"
    plain.mkdir()
    quotas = Quotas(plain)
    assert not quotas.enabled() and quotas.all_usage() == {}
    quotas.make_base(plain / "alice")
    assert not is_subvolume(plain / "alice")
    assert quotas.apply("alice", None) is None  # no quota asked: nothing to enforce
    with pytest.raises(QuotaError, match=r"cannot enforce a disk quota: .* \(scripts/upperfs.sh"):
        quotas.apply("alice", 64 * M)


def test_doctor_says_whether_the_node_enforces_disk_quotas(tmp_path: Path, uppers) -> None:
    from labvm_spawner.node import doctor

    assert doctor.disk_quotas(str(tmp_path)).ok
    plain = tmp_path / "plain"
    (plain / "uppers").mkdir(parents=True)
    check = doctor.disk_quotas(str(plain))
    assert not check.ok and "one user can fill the node's disk" in check.detail
    assert f"scripts/upperfs.sh up {plain}" in check.fix
