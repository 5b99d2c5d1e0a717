"""A committed version is a layer over the image: what a user deleted or replaced of
the image stays deleted or replaced after the upper is merged into a version.

Checked against the kernel: the overlay of (new version, image) must show what the
overlay of (upper, old version, image) showed, over two rounds of changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from labvm_spawner.storage import open_store

from . import treeops


def _view(layers: list[Path], tmp: Path) -> dict:
    """What a container sees: an overlay of ``layers`` (top first) with an empty upper."""
    for d in ("u", "w", "m"):
        shutil.rmtree(tmp / d, ignore_errors=True)
    with treeops.overlay(":".join(map(str, layers)), tmp / "u", tmp / "w", tmp / "m") as mnt:
        return treeops.snapshot(mnt)


def _change(layers: list[Path], upper: Path, work: Path, changes) -> dict:
    with treeops.overlay(":".join(map(str, layers)), upper, work, work.parent / "mnt") as mnt:
        changes(mnt)
        return treeops.snapshot(mnt)


def test_versions_keep_hiding_image_files(tmp_path: Path, overlay_ok: None) -> None:
    image = tmp_path / "image"
    for rel in ("etc/motd", "etc/keep", "opt/a/x", "opt/b/y", "var/d/file", "srv/s/t"):
        (image / rel).parent.mkdir(parents=True, exist_ok=True)
        (image / rel).write_text(rel)
    store = open_store(tmp_path / "store")
    v1 = store.current_path("u")

    def first(m: Path) -> None:
        (m / "etc/motd").unlink()                     # a whiteout over the image
        shutil.rmtree(m / "opt/a")                    # gone, then made again: opaque
        (m / "opt/a").mkdir()
        (m / "opt/a/new").write_text("new")
        shutil.rmtree(m / "var/d")                    # a directory replaced by a file
        (m / "var/d").write_text("now a file")
        (m / "home").mkdir()
        (m / "home/data").write_text("data")

    want = _change([v1, image], tmp_path / "up1", tmp_path / "w1" / "w", first)
    n, _ = store.commit("u", tmp_path / "up1")
    assert _view([store.version_path("u", n), image], tmp_path / "v") == want

    def second(m: Path) -> None:
        (m / "etc/motd").mkdir()                      # a directory where a whiteout was
        (m / "etc/motd/inside").write_text("x")
        (m / "var/d").unlink()                        # the file goes: the image dir stays hidden
        (m / "srv/s/t").unlink()
        shutil.move(m / "opt/b", m / "opt/c")         # what mv does without redirect_dir

    v2 = store.version_path("u", n)
    want = _change([v2, image], tmp_path / "up2", tmp_path / "w2" / "w", second)
    m, _ = store.commit("u", tmp_path / "up2")
    assert _view([store.version_path("u", m), image], tmp_path / "v") == want
    assert "etc/motd/inside" in want and "var/d/file" not in want and "opt/b/y" not in want
