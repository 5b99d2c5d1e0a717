"""Shared fixtures. Real components only: a missing one fails under CI=true, never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from support.components import IN_CI, MFS_STATE, MOOSEFS_SH, REPO, TEST_ROOT, require  # noqa: F401

# What a test needs, from the fixtures it uses (transitively); any of them makes it slow.
_NEEDS = {
    "needs_root": {"overlay_ok", "fake_gpu_dev"},
    "needs_docker": {"docker_client", "labvm_image", "hub", "hub_factory", "testbed"},
    "needs_moosefs": {"moosefs", "mfs_dir", "testbed"},
}


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if item.path.parent.name == "storage" and item.path.name != "test_safepath.py":
            item.add_marker("needs_root")  # overlay mounts, also in hypothesis tests
        for marker, fixtures in _NEEDS.items():
            if used & fixtures:
                item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in (*_NEEDS, "e2e")):
            item.add_marker("slow")


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means no usable engine
        require(False, f"dockerd ({e})")
    info = client.info()
    require(any("name=userns" in o for o in info.get("SecurityOptions", [])),
            "dockerd with userns-remap")
    return client


@pytest.fixture(scope="session")
def labvm_image(docker_client) -> str:
    from labvm_spawner import images

    return images.build_all(docker_client)


@pytest.fixture(scope="session")
def chp() -> str:
    path = shutil.which("configurable-http-proxy")
    require(path is not None, "configurable-http-proxy")
    return path


def _unmount_under(root: Path) -> None:
    from labvm_spawner.node.overlay import mount_points

    for mp in sorted(mount_points(), key=len, reverse=True):
        if mp.startswith(str(root) + "/"):
            subprocess.run(["umount", "-l", mp], check=False)


@pytest.fixture(scope="session")
def fake_gpu_dev():
    """/dev/nvidiaN and control nodes made with mknod, as on an 8-GPU host.

    They must sit at their real paths: with user namespaces, runc bind-mounts a
    device into the container from the same path on the host. Test sessions
    running side by side share them; the last one to finish removes them.
    """
    from support.fake_devices import CONTROL, make_fake_dev

    dev = Path("/dev")
    users = dev / ".labvm-fake-gpus.d"
    names = [f"nvidia{i}" for i in range(8)] + list(CONTROL)
    if (dev / "nvidiactl").exists() and not users.exists():
        pytest.fail("this host has real NVIDIA devices; the fake-GPU tests need a host without")
    users.mkdir(exist_ok=True)
    me = users / str(os.getpid())
    me.touch()
    make_fake_dev(Path("/"), count=8)
    yield dev
    me.unlink(missing_ok=True)
    alive = [p for p in users.iterdir() if Path(f"/proc/{p.name}").exists()]
    if not alive:
        for n in names:
            (dev / n).unlink(missing_ok=True)
        shutil.rmtree(users, ignore_errors=True)


@pytest.fixture
def hub_factory(docker_client, labvm_image, chp, fake_gpu_dev):
    """Make hubs on a fresh node state; everything they made is removed afterwards."""
    from support.hubharness import node_hub

    made: list[tuple] = []

    def make(port: int = 18000, env: dict[str, str] | None = None, upperfs: str | None = None):
        """``upperfs``: a size; the node's uppers then go on their own btrfs with quotas
        (scripts/upperfs.sh, as setup.sh makes for a lab), so 'disk' policies apply."""
        node = f"test-{uuid.uuid4().hex[:8]}"
        base = TEST_ROOT / node
        # The exact image this checkout built, not the shared "latest" tag.
        hub = node_hub(base, node, labvm_image, TEST_ROOT / "rootfs", port, env=env)
        made.append((hub, base, node))
        if upperfs:
            up = subprocess.run([str(REPO / "scripts" / "upperfs.sh"), "up",
                                 str(base / "state"), upperfs], capture_output=True, text=True)
            require(up.returncode == 0, f"a btrfs for uppers ({up.stderr.strip()[-300:]})")
        hub.start()
        return hub

    yield make
    artifacts = Path(__file__).resolve().parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    for hub, base, node in made:
        hub.stop()
        if hub.log_path.exists():  # kept for reading after a failure
            shutil.copyfile(hub.log_path, artifacts / f"hub-{node}.log")
        for c in docker_client.containers.list(all=True, filters={"label": f"labvm.node={node}"}):
            c.remove(force=True)
        _unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hub(hub_factory):
    return hub_factory()


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
