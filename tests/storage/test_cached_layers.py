"""Roots read their layers through the cached, read-only MooseFS mount (cached_store_root),
and only when that mount shows the very layer the store's own mount does.

Both mounts are scripts/moosefs.sh's: the store's (caches off) and the cached one
(read-only, an hour's caches), of one MooseFS.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from support.components import MFS_STATE

from labvm_spawner.node import doctor
from labvm_spawner.node.overlay import through_cache

pytestmark = pytest.mark.slow

CACHED = MFS_STATE / "mnt-cached"


@pytest.fixture
def store(moosefs: Path) -> tuple[Path, Path]:
    """A store root on MooseFS, and the same directory through the cached mount."""
    root = moosefs / f"store-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    return root, CACHED / root.relative_to(MFS_STATE / "mnt")


def test_a_published_layer_is_read_through_the_cached_mount(store) -> None:
    root, cached = store
    v1 = root / "alice" / "versions" / "1"
    (v1 / "etc").mkdir(parents=True)
    (v1 / "etc" / "motd").write_text("version one\n")
    got = through_cache(v1, root, cached)
    assert got == cached / "alice" / "versions" / "1"
    assert (got / "etc" / "motd").read_text() == "version one\n"
    assert through_cache(v1, root, None) == v1  # no cached mount set


def test_what_the_cache_holds_from_before_is_never_read(store) -> None:
    root, cached = store
    vdir = root / "bob" / "versions"
    vdir.mkdir(parents=True)
    # Looked up through the cached mount before it existed: an hour's negative entry.
    assert not (cached / "bob" / "versions" / "2").exists()
    (vdir / "2").mkdir()
    assert through_cache(vdir / "2", root, cached) == vdir / "2"
    # A number used again for another directory: the cache still has the old one.
    (vdir / "3").mkdir()
    assert through_cache(vdir / "3", root, cached) == cached / "bob" / "versions" / "3"
    os.rmdir(vdir / "3")
    (vdir / "3").mkdir()
    (vdir / "3" / "new").write_text("the new three\n")
    got = through_cache(vdir / "3", root, cached)
    assert got == vdir / "3" and (got / "new").read_text() == "the new three\n"


def test_doctor_wants_the_cached_mount_for_a_store_on_moosefs(store, tmp_path) -> None:
    root, cached = store
    ok = doctor.cached_store(str(root), str(cached))
    assert ok.ok and str(CACHED) in ok.detail and "read-only" in ok.detail
    missing = doctor.cached_store(str(root), "")
    assert not missing.ok and "--cached-store-root" in missing.fix
    same = doctor.cached_store(str(root), str(root))  # the store's own mount again
    assert not same.ok and "second mount" in same.detail
    other = doctor.cached_store(str(root), str(cached.parent))  # not the store's root
    assert not other.ok
    gone = doctor.cached_store(str(root), str(tmp_path / "nope"))
    assert not gone.ok and "No such file" in gone.detail
    assert doctor.cached_store(str(tmp_path), "").ok  # a local store needs none
