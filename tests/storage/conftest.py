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
from support.components import require  # tests/conftest.py: fail under CI, skip elsewhere


@pytest.fixture(scope="session")
def overlay_ok() -> None:
    """Overlayfs mounts must work here (root, overlay in /proc/filesystems)."""
    ok = os.geteuid() == 0 and "overlay" in Path("/proc/filesystems").read_text()
    require(ok, "root and overlayfs")


@pytest.fixture
def mfs_dir(moosefs: Path) -> Path:
    d = moosefs / uuid.uuid4().hex[:10]
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def canary() -> Path:
    """The directory random trees' absolute symlinks point at (treeops.CANARY).

    Nothing may ever be written through those symlinks: by the code under test or by
    the tests' own writers. The session fails if the canary changed.
    """
    from . import treeops

    root = Path(treeops.CANARY)
    if not root.is_dir() or root.is_symlink():
        subprocess.run(["rm", "-rf", str(root)], check=True)
        (root / "sub").mkdir(parents=True)
        for rel in ("a", "b", "c", "sub/a", "passwd"):
            (root / rel).write_text(f"canary {rel}\n")
    before = treeops.snapshot(root)
    yield root
    after = treeops.snapshot(root)
    assert after == before, "written through a symlink: " + treeops.diff(before, after)
