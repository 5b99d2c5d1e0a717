"""Container root is not host root, and the container holds no way out."""

import json
import os
import time
from pathlib import Path

import pytest
from storage import treeops  # snapshots that never follow a symlink
from support import jupyter_exec
from support.helpers import container_of, sh, state_dir

from labvm_spawner.node.userns import remap_base

pytestmark = pytest.mark.e2e

CAP_SYS_ADMIN, CAP_MKNOD, CAP_NET_RAW = 21, 27, 13


def test_root_in_container_is_unprivileged_on_host(hub, docker_client):
    hub.create_user("alice")
    hub.spawn("alice")
    c = container_of(docker_client, "alice")
    assert sh(c, "sudo -n touch /etc/made-by-root && sudo -n id -u") == (0, "0\n")

    on_host = state_dir(hub) / "uppers" / "alice" / "upper" / "etc" / "made-by-root"
    st = os.stat(on_host)
    assert st.st_uid != 0 and st.st_gid != 0
    assert st.st_uid == remap_base("dockremap")

    c.reload()
    pid = c.attrs["State"]["Pid"]
    with open(f"/proc/{pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert all(int(u) != 0 for u in uids), uids


def test_no_privilege_no_socket_reduced_capabilities(hub, docker_client):
    hub.create_user("bob")
    hub.spawn("bob")
    c = container_of(docker_client, "bob")
    host = c.attrs["HostConfig"]
    assert host["Privileged"] is False
    assert "ALL" in host["CapDrop"]
    binds = " ".join(host.get("Binds") or [])
    assert "docker.sock" not in binds
    rc, _ = sh(c, "ls -la /var/run/docker.sock /run/docker.sock", root=True)
    assert rc != 0
    _, out = sh(c, "grep CapBnd /proc/self/status", root=True)
    bnd = int(out.split()[1], 16)
    for cap in (CAP_SYS_ADMIN, CAP_MKNOD, CAP_NET_RAW):
        assert not bnd & (1 << cap), f"capability {cap} must be dropped"
    rc, out = sh(c, "sudo -n mount -t tmpfs x /mnt")
    assert rc != 0
    # The server itself runs as the user's own account.
    _, out = sh(c, "ps -o user= -C jupyterhub-singleuser -C python3 | sort -u", root=True)
    assert out.split() == ["bob"], out


def test_containers_cannot_reach_each_other(hub, docker_client):
    hub.create_user("alice")
    hub.create_user("bob")
    hub.spawn("alice")
    hub.spawn("bob")
    alice, bob = container_of(docker_client, "alice"), container_of(docker_client, "bob")
    bob.reload()
    bob_ip = bob.attrs["NetworkSettings"]["Networks"]["labvm"]["IPAddress"]
    # Bob's server answers the hub (it is ready), but not a neighbour's container.
    rc, out = sh(alice, f"curl -sS -m 3 -o /dev/null http://{bob_ip}:8888/")
    assert rc != 0, out


def _synced_at(store: Path, key: str) -> float:
    try:
        return json.loads((store / key / "synced.json").read_text())["t"]
    except (OSError, ValueError, KeyError):
        return 0.0


def _wait_syncs(store: Path, key: str, n: int = 2, timeout: float = 60) -> None:
    """Wait until the background sync has run ``n`` more times."""
    last = _synced_at(store, key)
    deadline = time.monotonic() + timeout
    while n and time.monotonic() < deadline:
        time.sleep(0.2)
        now = _synced_at(store, key)
        if now != last:
            last, n = now, n - 1
    assert n == 0, "the background sync stopped running"


def test_symlink_races_through_the_sync_touch_nothing_on_the_host(hub_factory, docker_client):
    """The security review's exploit, by a real user with sudo, from a Jupyter kernel,
    against the hub's real background sync. Its symlinks point at a canary directory
    this test made on the host (never a real system path)."""
    hub = hub_factory(env={"LABVM_TEST_SYNC_INTERVAL": "1"})
    canary = Path(hub.env["LABVM_TEST_STATE"]).parent / "canary"
    (canary / "sub").mkdir(parents=True)
    for name in ("ld.so.preload", "passwd", "sub/authorized_keys"):
        (canary / name).write_text(f"canary {name}\n")
    before = treeops.snapshot(canary)
    hub.create_user("mallory")
    hub.spawn("mallory")
    store = state_dir(hub) / "store"
    home = "/home/mallory"
    rc, out = jupyter_exec.run(hub, "mallory", f"cd {home} && sudo -n bash -c '"
                               f"mkdir -p z/z/z L P && ln -s {canary} z/z/z/M' && sudo -n id -u")
    assert (rc, out.strip()) == (0, "0"), out
    _wait_syncs(store, "mallory")
    rc, out = jupyter_exec.run(hub, "mallory", f"cd {home} && sudo -n bash -c '"
                               "touch L/ld.so.preload; rm -rf L; ln -s z/z/z/M L; "
                               "echo /path/to/evil.so > P/ld.so.preload; "
                               "ln -sfn ../../../P z/z/z/M'")
    assert rc == 0, out
    _wait_syncs(store, "mallory", n=3)
    assert treeops.snapshot(canary) == before, "the sync wrote through the user's symlinks"
    # The sync still did its job: the user's own files and links are in the store.
    mirror = store / "mallory" / "upper-sync" / "home" / "mallory"
    assert (mirror / "P" / "ld.so.preload").read_text() == "/path/to/evil.so\n"
    assert os.readlink(mirror / "L") == "z/z/z/M"
    assert os.readlink(mirror / "z" / "z" / "z" / "M") == "../../../P"
    synced = json.loads((store / "mallory" / "synced.json").read_text())
    assert synced["errors"] == 0
