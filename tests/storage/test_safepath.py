"""safepath: reaching names in a user's tree without following symlinks, at any depth.

Every check runs twice: with openat2 and with the per-component openat fallback that
kernels before 5.6 (or a seccomp filter) leave us with.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
from pathlib import Path

import pytest

from labvm_spawner.storage import safepath

from . import treeops

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["openat2", "openat"])
def resolver(request, monkeypatch) -> str:
    if request.param == "openat":
        monkeypatch.setattr(safepath, "_have_openat2", False)
    return request.param


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("f")
    (root / "file").write_text("x")
    os.symlink(treeops.CANARY, root / "a" / "out")
    os.symlink("b", root / "a" / "in")


def test_open_dir_never_follows_a_symlink(tmp_path: Path, resolver: str) -> None:
    _tree(tmp_path)
    top = safepath.open_root(tmp_path)
    try:
        fd = safepath.open_dir(top, ("a", "b"))
        assert sorted(os.listdir(fd)) == ["f"]
        os.close(fd)
        for parts in (("a", "out"), ("a", "in"), ("a", "in", "x"), ("a", "out", "sub"),
                      ("file",), ("file", "x"), ("missing", "x")):
            with pytest.raises(OSError) as e:
                safepath.open_dir(top, parts)
            assert safepath.changed(e.value), (parts, e.value)
        for bad in ((".."), ("a", ".."), ("",), ("a/b",)):
            with pytest.raises(ValueError):
                safepath.open_dir(top, bad)
    finally:
        os.close(top)


def test_open_dir_does_not_cross_a_mount(tmp_path: Path, resolver: str,
                                        overlay_ok: None) -> None:
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "labvm-test", str(tmp_path / "m")], check=True)
    try:
        (tmp_path / "m" / "d").mkdir()
        top = safepath.open_root(tmp_path)
        try:
            with pytest.raises(OSError) as e:
                safepath.open_dir(top, ("m", "d"))
            assert e.value.errno == errno.EXDEV
        finally:
            os.close(top)
    finally:
        subprocess.run(["umount", str(tmp_path / "m")], check=True)


def _chain(root: Path, depth: int, name: str) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        os.symlink(treeops.CANARY, "s", dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)


def test_walk_any_depth_with_few_descriptors(tmp_path: Path, resolver: str) -> None:
    depth, name = 600, "d" * 100  # 60 KB of path, deeper than the descriptors kept
    _chain(tmp_path, depth, name)
    top = safepath.open_root(tmp_path)
    seen = {"enter": 0, "leave": 0, "fds": 0}

    def enter(w, fds, ctx):
        seen["enter"] += 1
        seen["fds"] = max(seen["fds"], len(os.listdir("/proc/self/fd")))
        return [n for n, st in safepath.scandir(fds[0]).items() if st.st_mode & 0o040000
                and not os.path.islink(f"/proc/self/fd/{fds[0]}/{n}")], None

    def leave(w, parent, child, fds, ctx):
        assert child == name and len(w.path) >= 1
        seen["leave"] += 1

    base = len(os.listdir("/proc/self/fd"))
    try:
        safepath.walk([top], enter, leave)
        assert seen["enter"] == depth + 1 and seen["leave"] == depth
        assert seen["fds"] - base <= safepath.KEEP_OPEN + 4
        assert len(os.listdir("/proc/self/fd")) == base  # nothing leaked
        assert safepath.remove(top, name)
        assert os.listdir(top) == ["s"]  # its sibling symlink stays; the canary too
    finally:
        os.close(top)


def test_remove_takes_symlinks_never_their_targets(tmp_path: Path, resolver: str) -> None:
    _tree(tmp_path / "t")
    before = treeops.snapshot(Path(treeops.CANARY))
    assert safepath.remove_tree(tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert treeops.snapshot(Path(treeops.CANARY)) == before
    assert not safepath.remove_tree(tmp_path / "t")  # absent is fine


def test_only_safepath_resolves_paths_in_user_trees() -> None:
    # The storage engine and the image unpack reach user trees only through safepath:
    # none of them walks or joins paths below a root by itself.
    banned = {("os", "walk"), ("shutil", "rmtree"), ("shutil", "copytree"),
              ("os", "removedirs"), ("os", "makedirs")}
    allowed_makedirs = {"sync.py"}  # the mirror's parent: the store's own key directory
    files = sorted((REPO / "labvm_spawner" / "storage").glob("*.py"))
    files.append(REPO / "labvm_spawner" / "node" / "rootfs.py")
    found = []
    for f in files:
        if f.name == "safepath.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                call = (node.value.id, node.attr)
                if call in banned and not (call[1] == "makedirs" and f.name in allowed_makedirs):
                    found.append(f"{f.name}:{node.lineno} {'.'.join(call)}")
                if call == ("path", "join") or node.attr == "rglob":
                    found.append(f"{f.name}:{node.lineno} .{node.attr}")
    assert found == []
