"""A root's layer version read through the store's own MooseFS mount, against the cached one.

A user who installed anything has its directories in their layer version: site-packages
of the Jupyter venv after a ``pip install``, /etc after any account change. overlayfs
looks each file of such a directory up in that layer first. Through the store's own
mount (MooseFS's caches off, as the sync between nodes needs) every lookup is a round
trip to the master, on every open. This times what a server start does first, the
import of Jupyter (jupyterhub.singleuser, jupyter_server, jupyterlab and
jupyter_server_proxy), in a fresh root of three layers whose middle one, on MooseFS,
holds such directories, read:

- store:  through the store's own mount (scripts/moosefs.sh's ``mnt``);
- cached: through the read-only mount with long caches (``mnt-cached``: a node's
  cached_store_root).

Each round mounts a fresh overlay for each, the order flipping every round, and
imports in it (chroot, as root: the image is our own, the layer the benchmark's).

    .venv/bin/python bench/layer_reads.py     # BENCH_ROUNDS=5

Last line: cached_layer_ratio=<cached time / store time> (below 1: the cached mount is
quicker).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import docker
from _common import alternate, median, moosefs_up

from labvm_spawner import images
from labvm_spawner.node.overlay import MOUNT_OPTIONS
from labvm_spawner.node.rootfs import prepare_rootfs
from labvm_spawner.node.userns import remap_base

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))
SITE = "opt/labvm/venv/lib/python3.11/site-packages"
IMPORT = ("import jupyterhub.singleuser, jupyter_server.serverapp, jupyterlab, "
          "jupyter_server_proxy")


def clock_ticks(name: str) -> int:
    """CPU ticks used so far by every process called ``name`` (mfsmount, mfsmaster)."""
    total = 0
    for p in Path("/proc").iterdir():
        try:
            if (p / "comm").read_text().strip() == name:
                f = (p / "stat").read_text().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
        except (OSError, IndexError):
            continue
    return total


def make_layer(layer: Path, image_layer: Path) -> None:
    """What a user's version holds after a pip install and an account change."""
    pkg = layer / SITE / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    (layer / "etc").mkdir()
    shutil.copyfile(image_layer / "etc" / "passwd", layer / "etc" / "passwd")
    (layer / "usr" / "lib" / "python3" / "dist-packages").mkdir(parents=True)


def main() -> int:
    mnt = moosefs_up()
    if mnt is None:
        return 1
    cached_mnt = mnt.with_name("mnt-cached")
    client = docker.from_env()
    image_layer = prepare_rootfs(client, images.build_all(client), ROOT / "rootfs",
                                 remap_base())
    base = mnt / f"bench-layers-{uuid.uuid4().hex[:8]}"
    layer = base / "store" / "bench" / "versions" / "1"
    make_layer(layer, image_layer)
    through = {"store": layer, "cached": cached_mnt / layer.relative_to(mnt)}
    assert (through["cached"] / SITE / "mypkg" / "__init__.py").is_file()
    scratch = Path(tempfile.mkdtemp(prefix="labvm-bench-layers-"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch)], check=True)
    cpu: dict[str, list[tuple[float, float, float]]] = {}

    def run(kind: str):
        def go() -> None:
            d = scratch / uuid.uuid4().hex[:8]
            upper, work, merged = d / "upper", d / "work", d / "merged"
            for p in (upper, work, merged):
                p.mkdir(parents=True)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={through[kind]}:{image_layer},upperdir={upper},"
                            f"workdir={work},{MOUNT_OPTIONS}", str(merged)], check=True)
            try:
                m0, s0 = clock_ticks("mfsmount"), clock_ticks("mfsmaster")
                k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(["chroot", str(merged), "/opt/labvm/venv/bin/python", "-c",
                                IMPORT], check=True)
                k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                hz = os.sysconf("SC_CLK_TCK")
                cpu.setdefault(kind, []).append((
                    k1.ru_utime + k1.ru_stime - k0.ru_utime - k0.ru_stime,
                    (clock_ticks("mfsmount") - m0) / hz, (clock_ticks("mfsmaster") - s0) / hz))
            finally:
                subprocess.run(["umount", str(merged)], check=True)
        return go

    times: dict[str, list[float]] = {}
    try:
        for r in range(ROUNDS):
            took = alternate(r, {"store": run("store"), "cached": run("cached")}, times)
            print(f"round {r + 1}: " + "  ".join(f"{k} {v:.2f} s" for k, v in took.items()),
                  flush=True)
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False)
        scratch.rmdir()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    for kind in ("store", "cached"):
        py, mount, master = (median([c[i] for c in cpu[kind]]) for i in range(3))
        print(f"{kind}: import of Jupyter {median(times[kind]):.2f} s (median of {ROUNDS}); "
              f"CPU seconds: Python {py:.2f}, mfsmount {mount:.2f}, mfsmaster {master:.2f}")
    print(f"cached_layer_ratio={median(times['cached']) / median(times['store']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
