"""The store's MooseFS mount is nosuid,nodev, and layers on it still work in the overlay.

A setuid file in a user's layer must not give anything to a host process that
reaches the store directly, yet sudo installed into a layer must keep working in
the container: overlayfs applies the flags of its own mount, not of its lowers'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from labvm_spawner.storage.mounts import mount_of

from . import treeops

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _mount_options(path: Path) -> set[str]:
    mnt = mount_of(path)[0]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} not in mountinfo")


def test_setuid_in_a_moosefs_layer_works_only_through_the_overlay(
        tmp_path: Path, overlay_ok: None, mfs_dir: Path) -> None:
    assert {"nosuid", "nodev"} <= _mount_options(mfs_dir)
    layer = mfs_dir / "layer"
    layer.mkdir()
    layer.chmod(0o755)
    shutil.copy2("/usr/bin/id", layer / "id")
    os.chmod(layer / "id", 0o4755)  # setuid root, as sudo is
    direct = subprocess.run([*AS_NOBODY, str(layer / "id"), "-u"], capture_output=True,
                            text=True, check=True)
    assert direct.stdout.strip() == "65534", "a setuid file on the store mount worked"
    with treeops.overlay(layer, tmp_path / "u", tmp_path / "w", tmp_path / "m") as mnt:
        through = subprocess.run([*AS_NOBODY, str(mnt / "id"), "-u"], capture_output=True,
                                 text=True, check=True)
    assert through.stdout.strip() == "0", "setuid from a MooseFS lower no longer works"
