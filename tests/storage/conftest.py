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
