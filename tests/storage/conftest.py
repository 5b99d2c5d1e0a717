"""Fixtures for the layer store tests: real overlay mounts and a real MooseFS.

A component that cannot be started fails the test under CI=true; elsewhere it
skips with the reason.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import require  # tests/conftest.py: fail under CI, skip elsewhere

REPO = Path(__file__).resolve().parents[2]
MOOSEFS_SH = REPO / "scripts" / "moosefs.sh"
MFS_STATE = Path(os.environ.get("LABVM_MFS_DIR", "/var/lib/labvm/mfs-test"))


@pytest.fixture(scope="session")
def overlay_ok() -> None:
    """Overlayfs mounts must work here (root, overlay in /proc/filesystems)."""
    ok = os.geteuid() == 0 and "overlay" in Path("/proc/filesystems").read_text()
    require(ok, "root and overlayfs")


@pytest.fixture(scope="session")
def moosefs() -> Path:
    """A running MooseFS mount (scripts/moosefs.sh), started once per session.

    An instance that is already up is reused and left running; one we start is
    taken down again at the end of the session.
    """
    if os.geteuid() != 0:
        require(False, "root for MooseFS")
    status = subprocess.run([str(MOOSEFS_SH), "status", str(MFS_STATE)], capture_output=True)
    started = False
    if status.returncode != 0:
        up = subprocess.run([str(MOOSEFS_SH), "up", str(MFS_STATE)], capture_output=True,
                            text=True, timeout=300)
        if up.returncode != 0:
            subprocess.run([str(MOOSEFS_SH), "down", str(MFS_STATE)], capture_output=True)
            require(False, f"MooseFS (scripts/moosefs.sh up failed: {up.stderr[-2000:]})")
        started = True
    mnt = MFS_STATE / "mnt"
    base = mnt / f"pytest-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        yield base
    finally:
        subprocess.run(["rm", "-rf", str(base)], capture_output=True)
        if started:
            subprocess.run([str(MOOSEFS_SH), "down", str(MFS_STATE)], capture_output=True)


@pytest.fixture
def mfs_dir(moosefs: Path) -> Path:
    d = moosefs / uuid.uuid4().hex[:10]
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], capture_output=True)
