"""A node's engine restarted, and a node rebooted, on the real two-node test bed.

The hub here has ``restart_interrupted`` on (it is off by default): the servers a node's
going down stopped start again once it is back. Each test writes a checksum manifest of
the user's home before the fault and compares it after.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from support.jupyter_exec import MANIFEST, run

pytestmark = pytest.mark.e2e

PORT = 22200


@pytest.fixture(scope="module")
def testbed(moosefs, labvm_image, fake_gpu_dev, chp, docker_client):
    from support.testbed import running_testbed

    with running_testbed(moosefs, labvm_image, "testbed-restarts", PORT) as tb:
        yield tb


@pytest.fixture(scope="module")
def hub(testbed):
    from support.testbed import enrolled_hub

    with enrolled_hub(testbed, PORT, {"LABVM_TEST_RESTART_INTERRUPTED": "1"}) as h:
        yield h


def _container_id(testbed, n: str, key: str) -> str:
    [c] = testbed.docker(n).containers.list(filters={"label": f"labvm.key={key}"})
    return c.id


def _server(hub, user: str) -> dict:
    return hub.api("GET", f"/users/{user}").json().get("servers", {}).get("") or {}


def test_a_dockerd_restart_leaves_the_servers_running(testbed, hub):
    """unattended-upgrades restarts dockerd: with live-restore the container, its Jupyter,
    its files and its background sync go on, and the hub never sees it stop."""
    hub.create_user("dora")
    hub.spawn("dora", timeout=300)
    n = testbed.node_of("dora")
    before_id = _container_id(testbed, n, "dora")
    rc, out = run(hub, "dora", "mkdir -p ~/w && seq 1 20000 > ~/w/a.txt && echo ok")
    assert rc == 0 and "ok" in out, out
    rc, before = run(hub, "dora", MANIFEST)
    assert rc == 0, before

    testbed.restart_dockerd(n)
    restarted = time.time()
    assert _container_id(testbed, n, "dora") == before_id
    rc, after = run(hub, "dora", MANIFEST)
    assert rc == 0 and after == before, after
    rc, out = run(hub, "dora", "echo after-restart > ~/w/b.txt && echo ok")
    assert rc == 0 and "ok" in out, out
    testbed.wait_synced("dora", restarted + 1, timeout=60)  # the agent syncs on
    time.sleep(7)  # more than one poll_interval: the hub still counts it running
    assert _server(hub, "dora").get("ready")
    assert _container_id(testbed, n, "dora") == before_id
    hub.unspawn("dora")


def test_a_rebooted_node_gives_each_server_back_with_its_unsynced_changes(testbed, hub):
    """A power cut of the user's node: the hub shows the server stopped, and when the node is
    back it starts again by itself, with every file, including those written after its
    last sync (they were only in the node's upper)."""
    hub.create_user("rhea")
    hub.spawn("rhea", {"gpus": 1}, timeout=300)
    n = testbed.node_of("rhea")
    before_id = _container_id(testbed, n, "rhea")
    rc, out = run(hub, "rhea", "mkdir -p ~/w && seq 1 30000 > ~/w/synced.txt && "
                  "sudo -n rm /etc/motd && echo ok")
    assert rc == 0 and "ok" in out, out
    testbed.wait_synced("rhea", time.time())
    testbed.kill_agent(n)  # no sync after this
    rc, out = run(hub, "rhea", "seq 1 500 > ~/w/unsynced.txt && mv ~/w/synced.txt "
                  "~/w/renamed.txt && echo ok")
    assert rc == 0 and "ok" in out, out
    rc, before = run(hub, "rhea", MANIFEST)
    assert rc == 0 and "unsynced.txt" in before, before

    testbed.power_cut(n)
    # Only the upper on the node's disk has the last changes; the store has not.
    assert not [f for _, _, files in os.walk(testbed.store / "rhea") for f in files
                if f == "unsynced.txt"]
    testbed.start_dockerd(n)
    deadline = time.monotonic() + 120
    while _server(hub, "rhea").get("ready"):
        assert time.monotonic() < deadline, "the hub still shows the server running"
        time.sleep(1)

    testbed.start_agent(n)
    testbed.wait_up(n)
    back_at = time.time()
    deadline = time.monotonic() + 300
    while not _server(hub, "rhea").get("ready"):
        assert time.monotonic() < deadline, f"not started again:\n{hub.log_tail()}"
        time.sleep(1)
    print(f"started again {time.time() - back_at:.1f} s after node {n} was back")
    assert testbed.node_of("rhea") == n
    assert _container_id(testbed, n, "rhea") != before_id
    rc, after = run(hub, "rhea", MANIFEST + "; test ! -e /etc/motd && echo MOTD-GONE")
    assert rc == 0 and "MOTD-GONE" in after, after
    lost = set(before.splitlines()) - set(after.splitlines())
    print(f"files lost across the reboot: {len(lost)}")
    assert lost == set()
    # The node's record of the cut-short server is gone with the new start, and so is
    # the ask to restart it; the GPU is held once, by rhea.
    assert "rhea" not in json.loads((testbed.state(n) / "interrupted.json").read_text())
    held = [g["holder"] for g in testbed.records()[n]["info"]["gpus"] if g["holder"]]
    assert held == ["rhea"]
    hub.unspawn("rhea")
