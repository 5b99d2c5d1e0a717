"""Where the tests find the real components, and what happens when one is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MOOSEFS_SH = REPO / "scripts" / "moosefs.sh"
MFS_STATE = Path(os.environ.get("LABVM_MFS_DIR", "/var/lib/labvm/mfs-test"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))



def require(ok: bool, what: str) -> None:
    """Fail (in CI) or skip (elsewhere) when a real component is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"required component missing: {what} (run scripts/setup.sh --test)")
    pytest.skip(f"component missing: {what}")
