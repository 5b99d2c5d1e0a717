"""Overlay markers an upper mount seldom produces, checked against the kernel too:
a hand-made layer (char whiteouts, xattr whiteouts in an opaque="x" dir, opaque
dirs, escaped trusted.overlay.overlay.* xattrs, hard-linked whiteouts) is mounted
as the middle layer of a read-only overlay, whose view must equal our merge."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from labvm_spawner.storage.merge import merge_into_new

from . import treeops


def _layer(upper: Path) -> None:
    (upper / "x").mkdir(parents=True)
    os.setxattr(upper / "x", "trusted.overlay.opaque", b"x")  # holds xattr whiteouts
    (upper / "x" / "gone").touch()
    os.setxattr(upper / "x" / "gone", "trusted.overlay.whiteout", b"")
    (upper / "x" / "added").write_text("added")
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq" / "only").write_text("only")
    os.mknod(upper / "wh1", stat.S_IFCHR | 0o600, 0)
    os.link(upper / "wh1", upper / "wh2")  # overlay shares one whiteout inode
    os.mknod(upper / "orphan", stat.S_IFCHR | 0o600, 0)
    (upper / "esc").write_text("e")
    os.setxattr(upper / "esc", "trusted.overlay.overlay.keep", b"1")
    os.setxattr(upper / "esc", "trusted.overlay.origin", b"junk")
    (upper / "x" / "sub").mkdir()
    os.mknod(upper / "x" / "sub" / "f", stat.S_IFCHR | 0o600, 0)


def _lower(lower: Path) -> None:
    for rel in ("x/gone", "x/kept", "opq/hidden", "wh1", "wh2", "esc", "x/sub/f", "x/sub/g"):
        p = lower / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)


def test_markers_match_kernel_view(tmp_path: Path, overlay_ok: None) -> None:
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "m"
    _lower(lower)
    _layer(upper)
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={upper}:{lower},redirect_dir=off,metacopy=off,index=off,xino=off",
                    str(mnt)], check=True)
    try:
        kernel = treeops.snapshot(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    merge_into_new(lower, upper, tmp_path / "out")
    ours = treeops.snapshot(tmp_path / "out")
    assert ours == kernel, treeops.diff(kernel, ours)
    # and what that view is, spelled out
    assert "x/gone" not in ours and "x/kept" in ours and "x/added" in ours
    assert "opq/hidden" not in ours and "opq/only" in ours
    assert not {"wh1", "wh2", "orphan", "x/sub/f"} & set(ours) and "x/sub/g" in ours
    assert ours["esc"][5] == {"trusted.overlay.keep": b"1"}
