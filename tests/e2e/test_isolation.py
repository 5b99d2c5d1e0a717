"""Container root is not host root, and the container holds no way out."""

import os

import pytest
from helpers import container_of, sh, state_dir

from labvm_spawner.userns import remap_base

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
