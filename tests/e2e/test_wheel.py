"""An installed wheel runs: built from this checkout, installed into a fresh virtual
environment outside it, it builds the images and starts a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.components import REPO, TEST_ROOT
from support.helpers import container_of, sh
from support.hubharness import node_hub

from labvm_spawner.node.overlay import mount_points

pytestmark = pytest.mark.e2e


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_a_wheel_installed_elsewhere_starts_a_server(docker_client, chp, fake_gpu_dev):
    base = TEST_ROOT / f"wheel-{uuid.uuid4().hex[:8]}"
    dist, venv = base / "dist", base / "venv"
    base.mkdir(parents=True)
    try:
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, REPO,
             timeout=600)
        (wheel,) = dist.glob("labvm_spawner-*.whl")
        _run(sys.executable, "-m", "venv", venv)
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        _run(venv / "bin" / "pip", "install", "-q", wheel, env=env, timeout=900, cwd=base)
        # The install, not the checkout, is what runs (and its image recipes).
        where = _run(venv / "bin" / "python", "-c", "import json, labvm_spawner, "
                     "labvm_spawner.images as i; print(json.dumps([labvm_spawner.__file__, "
                     "str(i.IMAGES_DIR), i.IMAGES_DIR.joinpath('user', 'Dockerfile')"
                     ".is_file()]))", cwd=base)
        package, recipes, has_dockerfile = json.loads(where.stdout)
        assert package.startswith(str(venv)) and recipes.startswith(str(venv))
        assert has_dockerfile
        entrypoint = Path(package).parent / "runtime" / "entrypoint.sh"
        assert os.access(entrypoint, os.X_OK)
        tag = _run(venv / "bin" / "labvm", "image", "build", cwd=base,
                   timeout=1800).stdout.split()[-1]
        assert tag.startswith("labvm/user:")

        node = f"test-{uuid.uuid4().hex[:8]}"
        hub = node_hub(base / "node", node, tag, TEST_ROOT / "rootfs", 18300)
        hub.jupyterhub = venv / "bin" / "jupyterhub"
        hub.env.pop("PYTHONPATH", None)
        hub.start()
        try:
            hub.create_user("wheely")
            hub.spawn("wheely")
            c = container_of(docker_client, "wheely")
            assert sh(c, "id -un") == (0, "wheely\n")
            mounts = {m["Destination"]: m["Source"] for m in c.attrs["Mounts"]}
            assert mounts["/.labvm/runtime"].startswith(str(venv))
        finally:
            hub.stop()
            for c in docker_client.containers.list(all=True,
                                                   filters={"label": f"labvm.node={node}"}):
                c.remove(force=True)
            for mp in sorted(mount_points(), key=len, reverse=True):
                if mp.startswith(f"{base}/"):
                    subprocess.run(["umount", "-l", mp], capture_output=True)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], capture_output=True)
