"""A user's root survives a stop, the container's removal and a hub restart."""

import pytest
from support.helpers import container_of, mounts_under, sh, state_dir

pytestmark = pytest.mark.e2e


def test_everything_written_under_root_persists(hub, docker_client):
    assert hub.create_user("alice").status_code == 201
    hub.spawn("alice")

    # The home directory, written through Jupyter itself.
    r = hub.server_put("alice", "api/contents/notes.txt",
                       {"type": "file", "format": "text", "content": "kept across restarts"})
    assert r.status_code in (200, 201), r.text

    c = container_of(docker_client, "alice")
    rc, out = sh(c, "sudo -n apt-get update -qq && "
                    "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hello")
    assert rc == 0, out
    rc, out = sh(c, "echo lab=1 | sudo -n tee /etc/labvm-test.conf >/dev/null && "
                    "printf '#!/bin/sh\\necho mytool-ok\\n' | sudo -n tee /usr/local/bin/mytool "
                    ">/dev/null && sudo -n chmod 755 /usr/local/bin/mytool && "
                    "test -e /etc/issue.net && sudo -n rm /etc/issue.net")
    assert rc == 0, out

    hub.unspawn("alice")
    assert container_of(docker_client, "alice") is None, "the container is removed on stop"
    assert mounts_under(state_dir(hub) / "mnt") == [], "the root is unmounted on stop"
    hub.restart()

    hub.spawn("alice")
    c = container_of(docker_client, "alice")
    assert sh(c, "hello") == (0, "Hello, world!\n")
    assert sh(c, "cat /etc/labvm-test.conf") == (0, "lab=1\n")
    assert sh(c, "/usr/local/bin/mytool") == (0, "mytool-ok\n")
    rc, _ = sh(c, "test -e /etc/issue.net")
    assert rc == 1, "a deleted file of the base image stays deleted"
    r = hub.server_get("alice", "api/contents/notes.txt")
    assert r.ok and r.json()["content"] == "kept across restarts"
    # dpkg knows the package too, so apt stays consistent.
    rc, out = sh(c, "dpkg -s hello | grep '^Status'")
    assert out.strip() == "Status: install ok installed"


def test_hub_restart_reattaches_to_running_server(hub, docker_client):
    hub.create_user("dave")
    hub.spawn("dave")
    before = container_of(docker_client, "dave").id
    hub.restart(kill=True)
    model = hub.api("GET", "/users/dave").json()
    assert model["servers"][""]["ready"], model
    assert container_of(docker_client, "dave").id == before
    assert hub.server_get("dave", "api/status").ok


def test_named_servers_each_get_their_own_root(hub, docker_client):
    hub.create_user("erin")
    hub.spawn("erin")
    hub.spawn("erin", server="work")
    default, work = container_of(docker_client, "erin"), container_of(docker_client, "erin", "work")
    assert default.id != work.id
    assert sh(default, "echo default | sudo -n tee /etc/which-root")[0] == 0
    assert sh(work, "cat /etc/which-root")[0] == 1, "named server sees another root"
    assert sh(work, "echo work | sudo -n tee /etc/which-root")[0] == 0
    assert sh(default, "cat /etc/which-root") == (0, "default\n")


def test_new_top_level_entries_fail_loudly(hub, docker_client):
    """Only the bound overlay directories persist, so / itself is read-only."""
    hub.create_user("fay")
    hub.spawn("fay")
    rc, out = sh(container_of(docker_client, "fay"), "sudo -n mkdir /newdir")
    assert rc != 0 and "Read-only file system" in out
