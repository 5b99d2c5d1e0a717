"""Two real hubs side by side for the spawn benchmarks: LabVMSpawner and DockerSpawner.

Same machine, dockerd and image; the DockerSpawner hub (from PyPI) is configured in
``bench/hub_config.py``. Both hubs, their containers and mounts go away on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import docker  # noqa: E402
from support.hubharness import Hub, node_hub  # noqa: E402

from labvm_spawner import images  # noqa: E402
from labvm_spawner.node.overlay import mount_points  # noqa: E402

KINDS = ("labvm", "docker")


@contextlib.contextmanager
def two_hubs(root: Path, tag: str, base_port: int = 19000) -> Iterator[dict[str, Hub]]:
    """Started hubs by kind, each already warmed by one untimed spawn of ``warmup``
    (one-off work, such as unpacking the image layer, is charged to neither)."""
    client = docker.from_env()
    image = images.build_all(client)
    node = f"{tag}-{uuid.uuid4().hex[:8]}"
    base = root / node
    hubs: dict[str, Hub] = {}
    for i, kind in enumerate(KINDS):
        hub = node_hub(base / kind, node, image, root / "rootfs", port=base_port + 10 * i,
                       config=REPO / "bench" / "hub_config.py", env={"BENCH_SPAWNER": kind})
        hub.poll_interval = 0.05
        hubs[kind] = hub
    try:
        for hub in hubs.values():
            hub.start()
        for hub in hubs.values():
            hub.create_user("warmup")
            hub.spawn("warmup")
            hub.unspawn("warmup")
        yield hubs
    finally:
        artifacts = REPO / "tests" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        for kind, hub in hubs.items():
            hub.stop()
            if hub.log_path.exists():  # for reading where the time went
                shutil.copyfile(hub.log_path, artifacts / f"bench-{tag}-{kind}.log")
        for c in client.containers.list(all=True, filters={"label": f"labvm.node={node}"}):
            c.remove(force=True)
        for mp in sorted(mount_points(), key=len, reverse=True):
            if mp.startswith(str(base)):
                subprocess.run(["umount", "-l", mp], check=False)
        shutil.rmtree(base, ignore_errors=True)
