"""Pruning unpacked image layers never touches one a mounted root uses."""

import os
import subprocess
import time
from pathlib import Path

import pytest
from support.components import require

from labvm_spawner.node.rootfs import layers_in_use, prune_rootfs


@pytest.fixture
def overlay_ok():
    require(os.geteuid() == 0 and "overlay" in Path("/proc/filesystems").read_text(),
            "root and overlayfs")


def test_prune_keeps_mounted_and_kept_layers(tmp_path, overlay_ok):
    cache = tmp_path / "rootfs"
    kept, mounted, unused = cache / "aaaa1111-100000", cache / "bbbb2222-100000", \
        cache / "cccc3333-100000"
    old_partial, new_partial = cache / ".partial-old", cache / ".partial-new"
    for d in (kept, mounted, unused, old_partial, new_partial):
        (d / "etc").mkdir(parents=True)
        (d / "etc" / "os-release").write_text(d.name)
    two_hours_ago = time.time() - 7200
    os.utime(old_partial, (two_hours_ago, two_hours_ago))

    upper, work, merged = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "t", "-o",
                    f"lowerdir={mounted},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        assert str(mounted) in layers_in_use()
        removed = prune_rootfs(cache, keep_ids={"aaaa1111" + "0" * 56})
        assert sorted(removed) == sorted([unused, old_partial])
        assert kept.is_dir() and mounted.is_dir() and new_partial.is_dir()
        assert (merged / "etc" / "os-release").read_text() == mounted.name
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert prune_rootfs(cache, keep_ids=set()) == [kept, mounted]


def test_the_engines_own_image_ids_keep_their_trees_and_removal_is_never_half_seen(tmp_path):
    # housekeeping passes the ids as the engine lists them: sha256:<hex>.
    cache = tmp_path / "rootfs"
    kept, gone = cache / "aaaa1111-100000", cache / "cccc3333-100000"
    leftover = cache / ".removing-dddd4444-100000-x1" / "tree"  # a removal cut short
    for d in (kept, gone, leftover):
        (d / "etc").mkdir(parents=True)
        (d / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    removed = prune_rootfs(cache, keep_ids={"sha256:aaaa1111" + "0" * 56})
    assert removed == [gone]
    assert sorted(p.name for p in cache.iterdir()) == [kept.name]
    assert (kept / "etc" / "passwd").is_file()
