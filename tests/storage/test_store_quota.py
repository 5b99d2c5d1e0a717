"""The store quota: a commit that would make a version too big changes nothing, and on
MooseFS a sync past it keeps what fits, whole, and says why the rest is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labvm_spawner.storage import open_store
from labvm_spawner.storage.quota import StoreQuotaExceeded, tree_bytes
from labvm_spawner.storage.sync import UpperSync

M = 1 << 20


def _write(path: Path, n_bytes: int, fill: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, fill * n_bytes)
    finally:
        os.close(fd)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("where", ["local", "moosefs"])
def test_a_commit_over_the_store_quota_changes_nothing(where: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue("mfs_dir") if where == "moosefs" else tmp_path
    store = open_store(base / "store")
    first, second = tmp_path / "u1", tmp_path / "u2"
    for i in range(3):
        _write(first / "data" / f"f{i}", 4 * M, b"a")
        _write(second / "more" / f"g{i}", 4 * M, b"b")
    store.set_quota("alice", 20 * M)
    assert store.quota("alice") == 20 * M
    n1, _ = store.commit("alice", first)
    want = _files(store.version_path("alice", n1))
    assert tree_bytes(store.version_path("alice", n1)) == 12 * M
    assert store.quota_usage("alice") == 12 * M  # what the pages show against the quota
    before = store.versions("alice")

    with pytest.raises(StoreQuotaExceeded, match=f"over its store quota of 20 MiB; version "
                                                 f"{n1} stays current and nothing was written"):
        store.commit("alice", second)
    assert store.current_version("alice") == n1 and store.versions("alice") == before
    assert _files(store.version_path("alice", n1)) == want
    assert not any((store.key_dir("alice") / ".staging").iterdir())
    report = store.fsck()
    assert report.clean, report.problems
    refused = store.quota_refusal("alice")
    assert refused is not None and refused["limit"] == 20 * M and refused["bytes"] == 24 * M

    # A bigger quota lets the same commit through, and the refusal is no longer shown.
    store.set_quota("alice", 64 * M)
    n2, _ = store.commit("alice", second)
    assert store.current_version("alice") == n2
    assert set(_files(store.version_path("alice", n2))) == set(want) | {
        f"more/g{i}" for i in range(3)}
    assert store.quota_refusal("alice") is None
    assert store.quota_usage("alice") == 24 * M


def test_a_sync_past_the_store_quota_on_moosefs_keeps_what_fits(mfs_dir: Path,
                                                                tmp_path: Path) -> None:
    store = open_store(mfs_dir / "store")
    store.set_quota("bob", 16 * M)
    upper = tmp_path / "upper"
    for i in range(4):
        _write(upper / "d" / f"f{i}", 6 * M, bytes([65 + i]))
    syncer = UpperSync(upper, store.sync_path("bob"), journal=False)
    try:
        stats = syncer.sync()
    finally:
        syncer.close()
    assert stats.quota_errors >= 1 and stats.errors == stats.quota_errors, stats
    mirror = store.sync_path("bob")
    kept = _files(mirror)
    src = _files(upper)
    assert kept and all(kept[k] == src[k] for k in kept), "only whole files in the mirror"
    assert len(kept) < len(src)
    report = store.fsck()
    assert report.clean, report.problems

    # With room again, the next sync copies the rest.
    store.set_quota("bob", 64 * M)
    syncer = UpperSync(upper, mirror, journal=False)
    try:
        stats = syncer.sync()
    finally:
        syncer.close()
    assert stats.errors == 0, stats
    assert _files(mirror) == src
