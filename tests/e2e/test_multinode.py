"""Two nodes, one hub: placement, background sync, migration, evacuation, faults.

The real test bed (``tests/support/testbed.py``): nodes a and b in their own network
namespaces with their own dockerd and labvm-node agent, the layer store on MooseFS,
the hub in the root namespace. Everything a user checks is checked through the
hub: Jupyter kernels in their server, the admin service's REST API and pages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support.hubharness import HubError
from support.jupyter_exec import MANIFEST, run

pytestmark = pytest.mark.e2e

PORT = 22000
SSH_PORT = 22022
ADMIN = "/services/labvm-monitor/"


@pytest.fixture(scope="module")
def testbed(moosefs, labvm_image, fake_gpu_dev, chp, docker_client):
    from support.testbed import running_testbed

    with running_testbed(moosefs, labvm_image, "testbed", PORT) as tb:
        yield tb


@pytest.fixture(scope="module")
def hub(testbed):
    from support.testbed import enrolled_hub

    with enrolled_hub(testbed, PORT, {"LABVM_TEST_SSH": "1",
                                      "LABVM_TEST_SSH_PORT": str(SSH_PORT)}) as h:
        h.create_user("boss")
        h.boss = h.user_token("boss")
        yield h


def admin(hub, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
    return requests.request(method, f"{hub.url}{ADMIN}{path}", timeout=60,
                            headers={"Authorization": f"token {token or hub.boss}"}, **kw)


def migrate(hub, user: str, node: str, timeout: float = 300) -> dict:
    r = admin(hub, "POST", "api/admin/migrate", json={"user": user, "node": node})
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = admin(hub, "GET", f"api/admin/migrations/{mid}").json()
        if m["state"] != "running":
            return m
        time.sleep(0.5)
    raise AssertionError(f"migration {mid} did not finish: {m}")


def node_of(testbed, key: str) -> str | None:
    return testbed.node_of(key)


def wait_synced(testbed, key: str, after: float, timeout: float = 30) -> None:
    testbed.wait_synced(key, after, timeout)


# What a user does in their server before a move, and how to check it after.
# /etc/issue.net and /etc/motd come with the image; /home is the user's own.
CHANGES = r"""
set -e
sudo -n sh -c 'apt-get update -qq >/dev/null && apt-get install -y -qq hello >/dev/null'
mkdir -p ~/proj/sub && cd ~/proj
echo "keep me" > keep.txt
echo "old name" > before.txt && mv before.txt after.txt
echo "doomed" > doomed.txt && rm doomed.txt
seq 1 100000 > sub/big.txt
chmod 751 sub && chmod 600 keep.txt
python3 -c 'import os; os.setxattr("keep.txt", "user.labvm", b"tagged")'
sudo -n rm /etc/issue.net
sudo -n mv /etc/motd /etc/motd.moved
sudo -n sh -c 'echo edited >> /etc/debian_version'
"""

CHECK = r"""
set -e
cd ~/proj
hello | grep -q 'Hello, world!'
test "$(cat keep.txt)" = "keep me"
test "$(cat after.txt)" = "old name"
test ! -e before.txt && test ! -e doomed.txt
test "$(wc -l < sub/big.txt)" = 100000
test "$(stat -c %a sub)" = 751 && test "$(stat -c %a keep.txt)" = 600
python3 -c 'import os; assert os.getxattr("keep.txt", "user.labvm") == b"tagged"'
test ! -e /etc/issue.net && test ! -e /etc/motd && test -e /etc/motd.moved
tail -1 /etc/debian_version | grep -q edited
echo ALL-GOOD
"""


def test_migration_moves_everything_and_deletions_stay(testbed, hub):
    hub.create_user("alice")
    hub.spawn("alice", {"gpus": 1}, timeout=300)
    home = node_of(testbed, "alice")
    assert home in ("a", "b")
    other = "b" if home == "a" else "a"
    rc, out = run(hub, "alice", CHANGES)
    assert rc == 0, out
    rc, out = run(hub, "alice", CHECK)
    assert rc == 0 and "ALL-GOOD" in out, out

    # The node that mounted alice's root holds a lease on the version it stands on.
    from labvm_spawner.storage import open_store

    leases = open_store(testbed.store).leases("alice")
    assert list(leases) == [home] and leases[home]["versions"]

    # Background sync shows in the admin state ("last synced").
    t = time.time()
    wait_synced(testbed, "alice", t)
    state = admin(hub, "GET", "api/admin/state").json()
    assert state["placements"]["alice"] == home

    # A change right before the move: only the final sync can carry it.
    rc, out = run(hub, "alice", "echo late > ~/proj/late.txt")
    assert rc == 0, out
    m = migrate(hub, "alice", other)
    assert m["state"] == "done", m
    assert m["downtime_s"] and m["downtime_s"] > 0
    assert node_of(testbed, "alice") == other
    assert list(open_store(testbed.store).leases("alice")) == [other]  # the source let go
    # What each node's heartbeat says it has committed (placement weighs it) is what its
    # engine runs: alice's limits on the target, nothing left on the source.
    limits = testbed.docker(other).containers.list(
        filters={"label": "labvm.key=alice"})[0].attrs["HostConfig"]
    deadline = time.monotonic() + 60
    while True:
        nodes = {n["name"]: n for n in admin(hub, "GET", "api/admin/state").json()["cluster_nodes"]}
        if nodes[other]["servers"] == 1 and nodes[home]["servers"] == 0:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(1)
    assert (nodes[other]["cpus_committed"], nodes[other]["mem_committed"]) == (
        limits["NanoCpus"] / 1e9, limits["Memory"])
    assert (nodes[home]["cpus_committed"], nodes[home]["mem_committed"]) == (0, 0)
    # Each node's scheduled housekeeping shows on the admin Nodes page's data.
    deadline = time.monotonic() + 120
    while not all(n["housekeeping"].get("t") for n in
                  admin(hub, "GET", "api/admin/state").json()["cluster_nodes"]):
        assert time.monotonic() < deadline, "no housekeeping round reported"
        time.sleep(2)
    for n in admin(hub, "GET", "api/admin/state").json()["cluster_nodes"]:
        h = n["housekeeping"]
        assert h["node"] == n["name"] and "error" not in h["fsck"], h
        assert "removed" in h["image_prune"] and h["prune"]["errors"] == []
    # The user's spawn page was told why their server restarted (its progress events).
    log = hub.log_path.read_text()
    assert f"Moving your server from node {home} to node {other}" in log
    # ... with every step before this start, and the downtime at the end.
    # (The spawner's progress events, as the hub logs them: "alice: <event>".)
    for step in (f"syncing alice on node {home} while it runs", f"stopping alice on node {home}",
                 f"final sync of alice on node {home}", f"starting alice on node {other}"):
        assert re.search(rf"alice: \d\d:\d\d:\d\d {step}", log), step
    assert re.search(rf"alice: Moved to node {other}: your server was down [0-9.]+ s", log)

    rc, out = run(hub, "alice", CHECK + "test \"$(cat ~/proj/late.txt)\" = late\n")
    assert rc == 0 and "ALL-GOOD" in out, out
    # The GPU moved too: one of the target's, and the source holds none for alice.
    c = testbed.docker(other).containers.get(f"labvm-{other}-alice")
    env = c.exec_run(["sh", "-c", "cat /proc/1/environ | tr '\\0' '\\n'"]).output.decode()
    info = testbed.records()[other]["info"]
    mine = [g["uuid"] for g in info["gpus"] if g["holder"] == "alice"]
    assert len(mine) == 1 and f"CUDA_VISIBLE_DEVICES={mine[0]}" in env
    assert all(g["holder"] != "alice" for g in testbed.records()[home]["info"]["gpus"])
    # Nothing of alice is left on the source: no container, no mount, no upper.
    assert not (testbed.state(home) / "mnt" / "alice").is_mount()
    assert not (testbed.state(home) / "uppers" / "alice").exists()

    # The stacked layer is merged into a new version off the critical path.
    store = open_store(testbed.store)
    deadline = time.monotonic() + 300
    while store.pending("alice") and time.monotonic() < deadline:
        time.sleep(1)
    assert store.pending("alice") == [] and store.pending("alice", merged=True)

    # A stopped server moves too, and starts on its new node with everything.
    hub.unspawn("alice")
    m = migrate(hub, "alice", home)
    assert m["state"] == "done", m
    hub.spawn("alice", {"gpus": 1}, timeout=300)
    assert node_of(testbed, "alice") == home
    rc, out = run(hub, "alice", CHECK)
    assert rc == 0 and "ALL-GOOD" in out, out
    hub.unspawn("alice")
    assert store.leases("alice") == {}  # a stopped root holds nothing


def test_ssh_reaches_a_user_on_either_node_and_after_a_migration(testbed, hub, tmp_path):
    """The gateway in the hub reaches the sshd of a container on a node through that
    node's agent (no port on the node), and again after a move, with the same config."""
    from support.monitorharness import login_token
    from support.sshclient import Client, keygen

    hub.create_user("sam")
    token = login_token(hub, "sam")
    key, pub = keygen(tmp_path, "sam")
    r = admin(hub, "POST", "api/me/ssh", token=token, json={"key": pub})
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 30
    while not (page := admin(hub, "GET", "api/me/ssh", token=token).json())["gateway"]:
        assert time.monotonic() < deadline, "the SSH gateway did not start"
        time.sleep(0.5)
    sam = Client(tmp_path, "sam", key, page)
    hub.spawn("sam", timeout=300)
    home = node_of(testbed, "sam")
    other = "b" if home == "a" else "a"
    sam.ssh("echo written-on-$(hostname) > ~/where.txt && sudo -n true", check=True)
    # Nothing on the node listens for it: sshd is on the container's bridge only.
    c = testbed.docker(home).containers.get(f"labvm-{home}-sam")
    assert not c.attrs["NetworkSettings"]["Ports"].get("22/tcp")
    m = migrate(hub, "sam", other)
    assert m["state"] == "done", m
    p = sam.ssh("cat ~/where.txt; id -un", check=True)
    assert p.stdout.split() == ["written-on-sam", "sam"]
    log = (Path(hub.env["LABVM_TEST_STATE"]) / "ssh" / "audit.log").read_text().splitlines()
    nodes = [json.loads(x)["node"] for x in log if json.loads(x)["event"] == "forward"]
    assert nodes == [home, other]
    hub.unspawn("sam")


QUOTA_FILL = 'dd if=/dev/zero of="$HOME/{name}" bs=1M count={mb} conv=fsync 2>&1; echo "dd-rc=$?"'


def test_every_node_is_sampled_with_its_users_on_its_gpus(testbed, hub):
    """The agent on the user's node samples it: fake NVML there reports a process whose PID
    is the user's real container; the admin GPUs page, in a real browser, shows that user
    on that node's GPU with its utilisation, and /metrics has it under node="<n>"."""
    hub.create_user("gus")
    hub.spawn("gus", {"gpus": 1}, timeout=300)
    home = node_of(testbed, "gus")
    c = testbed.docker(home).containers.get(f"labvm-{home}-gus")
    [gpu] = [g for g in testbed.records()[home]["info"]["gpus"] if g["holder"] == "gus"]
    index = next(i for i, g in enumerate(testbed.records()[home]["info"]["gpus"])
                 if g["uuid"] == gpu["uuid"])
    testbed.gpu_processes_file(home).write_text(
        json.dumps({str(index): [[c.attrs["State"]["Pid"], 3 << 30]]}))
    deadline = time.monotonic() + 60
    while True:
        gpus = admin(hub, "GET", "api/admin/state").json()["gpus"]
        mine = [g for g in gpus if g["node"] == home and g["uuid"] == gpu["uuid"]]
        if mine and mine[0]["processes"] and mine[0]["processes"][0]["user"] == "gus":
            break
        assert time.monotonic() < deadline, f"node {home}'s sample never showed gus: {mine}"
        time.sleep(1)
    assert mine[0]["holder_user"] == "gus" and mine[0]["processes"][0]["used"] == 3 << 30
    assert {g["node"] for g in gpus} >= {"a", "b"}
    nodes = {n["name"]: n for n in admin(hub, "GET", "api/admin/state").json()["nodes"]}
    assert nodes[home]["up"] and nodes[home]["containers"] >= 1 and nodes[home]["host"]
    metrics = requests.get(f"{hub.url}{ADMIN}metrics", timeout=30, headers={
        "Authorization": f"Bearer {hub.env['LABVM_TEST_METRICS_TOKEN']}"}).text
    assert re.search(rf'DCGM_FI_DEV_GPU_UTIL\{{[^}}]*node="{home}",user="gus"\}}', metrics)
    assert f'node="{home}"' in metrics and 'node="a"' in metrics and 'node="b"' in metrics
    # Each node has its own history, and the Nodes page charts every node.
    hist = admin(hub, "GET", f"api/admin/history?kind=node&subject={home}&hours=1").json()
    assert hist["points"] and all("cpu_percent" in v for _, v in hist["points"]), hist
    _gpus_page_shows(hub, home, gpu["uuid"])
    testbed.gpu_processes_file(home).write_text("{}")
    hub.unspawn("gus")


def _gpus_page_shows(hub, node: str, uuid: str) -> None:
    from playwright.sync_api import sync_playwright
    from support.browser import ARTIFACTS, launch, log_in

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = log_in(browser.new_context(), hub.url, "boss", hub.password)
            page.goto(f"{hub.url}{ADMIN}admin/gpus")
            row = page.locator(f"tr[data-uuid='{uuid}'][data-node='{node}']")
            row.wait_for(timeout=30000)
            assert "gus" in row.inner_text()
            page.screenshot(path=str(ARTIFACTS / "testbed-admin-gpus.png"), full_page=True)
            page.goto(f"{hub.url}{ADMIN}admin/nodes")
            legend = page.locator("#chart-node .u-legend .u-series .u-label")
            legend.nth(2).wait_for(timeout=30000)
            assert {"a", "b"} <= set(legend.all_inner_texts()), legend.all_inner_texts()
            page.screenshot(path=str(ARTIFACTS / "testbed-admin-nodes.png"), full_page=True)
        finally:
            browser.close()


def test_a_running_roots_version_outlives_prunes_from_elsewhere(testbed, hub, tmp_path):
    """keep=2; a server runs over version 2; five commits of its root come from elsewhere.
    Prune and fsck leave version 2 (leased by the server's node) in place, and the server
    reads every file of it; once it stops, the next prune removes it."""
    from labvm_spawner.storage import open_store

    store = open_store(testbed.store, keep=2)
    store.current_path("lea")
    up = tmp_path / "v2"
    (up / "srv" / "set").mkdir(parents=True)
    for i in range(200):
        (up / "srv" / "set" / f"f{i}").write_text(f"{i}\n" * 500)
    v2, _ = store.commit("lea", up)
    hub.create_user("lea")
    hub.spawn("lea", timeout=300)
    home = node_of(testbed, "lea")
    assert store.leases("lea")[home]["versions"] == [v2]
    # Its root reads that version through the node's cached, read-only MooseFS mount.
    from labvm_spawner.node.rootfs import layers_in_use

    cached = testbed.node_path(home, testbed.store, cached=True) / "lea" / "versions"
    assert str(cached / str(v2)) in layers_in_use()
    for i in range(5):  # as a restore or a merge on another node would
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / f"c{i}").write_text(str(i))
        store.commit("lea", tmp_path / f"c{i}")
    assert v2 in store.versions("lea") and len(store.versions("lea")) == 3
    assert store.prune("lea") == [] and store.skipped["lea"] == {v2: [home]}
    assert store.fsck(keys=["lea"]).clean and v2 in store.versions("lea")
    rc, out = run(hub, "lea", "cat /srv/set/f* | wc -l; find /srv/set -type f | wc -l")
    assert rc == 0 and out.split() == ["100000", "200"], out
    # An admin's restore through the pages is refused while it runs on its node, and
    # changes nothing (the service samples another node than the server's).
    versions, current = store.versions("lea"), store.current_version("lea")
    r = admin(hub, "POST", "api/admin/restore", json={"key": "lea", "version": v2})
    assert r.status_code == 409 and f"node {home}" in r.json()["message"], r.text
    assert store.versions("lea") == versions and store.current_version("lea") == current
    hub.unspawn("lea")
    assert store.leases("lea") == {}
    assert store.prune("lea") == [v2]


def test_the_disk_quota_follows_the_user_to_another_node(testbed, hub):
    hub.create_user("quinn")
    r = admin(hub, "POST", "api/admin/quota", json={"key": "quinn", "disk": "64M"})
    assert r.status_code == 200 and r.json()["applied"] is None, r.text  # no root yet
    hub.spawn("quinn", timeout=300)
    home = node_of(testbed, "quinn")
    other = "b" if home == "a" else "a"
    rc, out = run(hub, "quinn", QUOTA_FILL.format(name="kept", mb=40))
    assert rc == 0 and "dd-rc=0" in out, out
    rc, out = run(hub, "quinn", QUOTA_FILL.format(name="big", mb=100))
    assert "Disk quota exceeded" in out, out
    rc, out = run(hub, "quinn", 'rm "$HOME/big" && sync')
    assert rc == 0, out

    m = migrate(hub, "quinn", other)
    assert m["state"] == "done", m
    assert node_of(testbed, "quinn") == other
    # On the new node: the file came along, and the same 64M quota holds there.
    rc, out = run(hub, "quinn", 'test "$(stat -c %s "$HOME/kept")" = 41943040 && echo KEPT')
    assert "KEPT" in out, out
    rc, out = run(hub, "quinn", QUOTA_FILL.format(name="big", mb=100))
    assert "Disk quota exceeded" in out, out
    # A live raise reaches the agent of the node that runs it.
    r = admin(hub, "POST", "api/admin/quota", json={"key": "quinn", "disk": "256M"})
    assert r.status_code == 200, r.text
    assert r.json()["node"] == other and r.json()["applied"]["limit_bytes"] == 256 << 20
    rc, out = run(hub, "quinn", 'rm -f "$HOME/big"; ' + QUOTA_FILL.format(name="big", mb=100))
    assert "dd-rc=0" in out, out
    hub.unspawn("quinn")


def _placements(hub) -> dict:
    return admin(hub, "GET", "api/admin/state").json()["placements"]


def test_bad_migrations_are_refused_and_change_nothing(testbed, hub):
    for u in ("dave", "erin", "fred"):
        hub.create_user(u)
    hub.spawn("dave", {"gpus": 2}, timeout=300)
    home = node_of(testbed, "dave")
    other = "b" if home == "a" else "a"
    before = _placements(hub)
    migrations_before = len(admin(hub, "GET", "api/admin/migrations").json()["migrations"])

    def refused(body: dict, status: int, match: str, token: str | None = None) -> None:
        r = admin(hub, "POST", "api/admin/migrate", token=token, json=body)
        assert r.status_code == status, r.text
        if match:
            assert match in r.json().get("error", ""), r.text

    refused({"user": "dave", "node": "nowhere"}, 400, "no node 'nowhere'")
    refused({"user": "nobody", "node": other}, 400, "no user 'nobody'")
    refused({"user": "dave", "node": home}, 400, "already on node")
    refused({"user": "dave", "node": other}, 403, "", token=hub.user_token("erin"))
    # The target's two GPUs go to erin (pinned there): dave's two cannot follow.
    pin = admin(hub, "POST", "api/admin/pin", json={"user": "erin", "node": other})
    assert pin.ok, pin.text
    hub.spawn("erin", {"gpus": 2}, timeout=300)
    assert node_of(testbed, "erin") == other
    refused({"user": "dave", "node": other}, 400, "GPU")
    hub.unspawn("erin")

    # Twice at once: the second is refused while the first runs.
    r1 = admin(hub, "POST", "api/admin/migrate", json={"user": "dave", "node": other})
    assert r1.status_code == 202, r1.text
    refused({"user": "dave", "node": other}, 400, "already being migrated")
    mid = r1.json()["id"]
    deadline = time.monotonic() + 300
    while admin(hub, "GET", f"api/admin/migrations/{mid}").json()["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert node_of(testbed, "dave") == other

    # A down node: its agent stops answering, it is shown down, and refused as a target.
    testbed.kill_agent(home)
    testbed.wait_down(home)
    nodes = {n["name"]: n for n in admin(hub, "GET", "api/admin/state").json()["cluster_nodes"]}
    assert nodes[home]["up"] is False and nodes[other]["up"] is True
    refused({"user": "dave", "node": home}, 400, "down")
    testbed.start_agent(home)
    testbed.wait_up(home)

    after = _placements(hub)
    assert {k: v for k, v in after.items() if k not in ("dave", "erin")} == \
        {k: v for k, v in before.items() if k not in ("dave", "erin")}
    migrations = admin(hub, "GET", "api/admin/migrations").json()["migrations"]
    assert len(migrations) == migrations_before + 1  # only the one that was accepted
    hub.unspawn("dave")


def test_cli_migrates_and_refuses(testbed, hub):
    hub.create_user("hank")
    hub.spawn("hank", timeout=300)
    home = node_of(testbed, "hank")
    other = "b" if home == "a" else "a"
    env = {"LABVM_ADMIN_URL": f"{hub.url}{ADMIN}", "JUPYTERHUB_API_TOKEN": hub.boss,
           "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "labvm_spawner.cli", "migrate"]
    bad = subprocess.run(cli + ["hank", "nowhere"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "nowhere" in bad.stderr, bad
    ok = subprocess.run(cli + ["hank", other], env=env, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok
    assert node_of(testbed, "hank") == other
    hub.unspawn("hank")


def test_evacuation_from_a_dead_node_keeps_what_was_synced(testbed, hub):
    hub.create_user("ivy")
    hub.spawn("ivy", timeout=300)
    home = node_of(testbed, "ivy")
    other = "b" if home == "a" else "a"
    rc, out = run(hub, "ivy", "echo synced > ~/before-crash.txt")
    assert rc == 0, out
    wait_synced(testbed, "ivy", time.time())
    # The node is gone: its agent and its engine die (the container with them).
    testbed.kill_agent(home)
    testbed.kill_dockerd(home)
    testbed.wait_down(home)
    m = migrate(hub, "ivy", other)
    assert m["state"] == "done", m
    assert "down" in json.dumps(admin(hub, "GET", "api/admin/migrations").json())
    assert node_of_alive(testbed, "ivy", other)
    rc, out = run(hub, "ivy", "cat ~/before-crash.txt")
    assert rc == 0 and "synced" in out, out
    # The node comes back: the stale copy does not run there, nor overwrite the store.
    testbed.start_dockerd(home)
    testbed.start_agent(home)
    testbed.wait_up(home)
    deadline = time.monotonic() + 60
    while testbed.docker(home).containers.list(filters={"label": "labvm.key=ivy"}):
        assert time.monotonic() < deadline, "the stale copy still runs on the old node"
        time.sleep(1)
    rc, out = run(hub, "ivy", "cat ~/before-crash.txt")
    assert rc == 0 and "synced" in out, out
    hub.unspawn("ivy")


def test_a_stale_upper_found_at_a_take_over_can_be_restored(testbed, hub):
    """A node dies with changes not yet synced; the user is evacuated. When the root comes
    back to that node, its stale upper is set aside, not lost: the admin sees it, cannot
    restore it under the running server, and restores it as a new version once stopped."""
    hub.create_user("una")
    hub.spawn("una", timeout=300)
    home = node_of(testbed, "una")
    other = "b" if home == "a" else "a"
    rc, out = run(hub, "una", "echo synced > ~/synced.txt")
    assert rc == 0, out
    wait_synced(testbed, "una", time.time())
    testbed.kill_agent(home)  # no more syncs from here on
    rc, out = run(hub, "una", "echo only-on-the-dead-node > ~/unsynced.txt")
    assert rc == 0, out
    testbed.kill_dockerd(home)
    testbed.wait_down(home)
    assert migrate(hub, "una", other)["state"] == "done"
    testbed.start_dockerd(home)
    testbed.start_agent(home)
    testbed.wait_up(home)
    # Back to the old node: its stale upper is set aside, and the root starts clean.
    assert migrate(hub, "una", home)["state"] == "done"
    rc, out = run(hub, "una", "cat ~/synced.txt; test ! -e ~/unsynced.txt && echo clean")
    assert rc == 0 and out.split() == ["synced", "clean"], out
    deadline = time.monotonic() + 60
    while not (found := [a for a in admin(hub, "GET", "api/admin/state").json()["asides"]
                         if a["key"] == "una"]):
        assert time.monotonic() < deadline, "the set-aside upper is not listed"
        time.sleep(1)
    [aside] = found
    assert aside["node"] == home and aside["bytes"] > 0
    assert time.time() - aside["set_aside_at"] < 600
    body = {"node": home, "id": aside["id"], "action": "restore"}
    r = admin(hub, "POST", "api/admin/aside", json=body)
    assert r.status_code == 409 and f"running on node {home}" in r.json()["message"], r.text
    hub.unspawn("una")
    r = admin(hub, "POST", "api/admin/aside", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["version"] > 1
    hub.spawn("una", timeout=300)
    rc, out = run(hub, "una", "cat ~/synced.txt ~/unsynced.txt")
    assert rc == 0 and out.split() == ["synced", "only-on-the-dead-node"], out
    assert not [a for a in admin(hub, "GET", "api/admin/state").json()["asides"]
                if a["key"] == "una"]
    hub.unspawn("una")


def node_of_alive(testbed, key: str, n: str) -> bool:
    return bool(testbed.docker(n).containers.list(filters={"label": f"labvm.key={key}"}))


FAULTS = [
    ("source", "node.sync"),          # the source agent dies syncing the running server
    ("source", "node.stop.synced"),   # ... right after the final sync, mid-stop
    ("target", "node.start.owned"),   # the target agent dies having taken the root over
    ("target", "node.start.mounted"),  # ... with the root mounted and GPUs allocated
    ("target", "dockerd"),            # the target's dockerd dies while it starts
]


@pytest.mark.parametrize("who,point", FAULTS)
def test_kill_9_during_migration_loses_nothing(testbed, hub, who, point):
    user = f"k{FAULTS.index((who, point))}"
    hub.create_user(user)
    hub.spawn(user, {"gpus": 1}, timeout=300)
    home = node_of(testbed, user)
    other = "b" if home == "a" else "a"
    victim = home if who == "source" else other
    rc, out = run(hub, user, "mkdir -p ~/w && seq 1 5000 > ~/w/data && sudo -n rm /etc/motd")
    assert rc == 0, out
    if point != "dockerd":
        testbed.kill_agent(victim, signal.SIGTERM)
        testbed.start_agent(victim, crash_at=point)
        testbed.wait_up(victim)
    r = admin(hub, "POST", "api/admin/migrate", json={"user": user, "node": other})
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    if point == "dockerd":
        deadline = time.monotonic() + 120
        while "starting" not in admin(hub, "GET", f"api/admin/migrations/{mid}").json()["step"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        testbed.kill_dockerd(victim)
    else:
        assert testbed.agent_died(victim, 120), f"agent {victim} did not reach {point}"
    deadline = time.monotonic() + 300
    while (m := admin(hub, "GET", f"api/admin/migrations/{mid}").json())["state"] == "running":
        assert time.monotonic() < deadline, m
        time.sleep(0.5)
    # Bring the victim back, as an admin would.
    if point == "dockerd":
        testbed.start_dockerd(victim)
    else:
        testbed.start_agent(victim)
    testbed.wait_up(victim)
    # The server can be started (wherever the migration left it), with all its data.
    if hub.api("GET", f"/users/{user}").json()["servers"].get(""):
        hub.unspawn(user)
    hub.spawn(user, {"gpus": 1}, timeout=300)
    rc, out = run(hub, user, "test \"$(wc -l < ~/w/data)\" = 5000 && test ! -e /etc/motd "
                  "&& echo INTACT")
    if rc != 0 or "INTACT" not in out:
        _, seen = run(hub, user, "ls -la ~ ~/w /etc/motd 2>&1; wc -l ~/w/data")
        mounts = [ln for ln in Path("/proc/mounts").read_text().splitlines() if user in ln]
        layout = subprocess.run(["find", str(testbed.store / user), "-maxdepth", "3"],
                                capture_output=True, text=True).stdout
        raise AssertionError(f"data lost after {point}: {m}\n{out}\n{seen}\n{mounts}\n{layout}")
    # Nothing held on the node that does not run it: no mount, no GPU.
    where = node_of(testbed, user)
    spare = "b" if where == "a" else "a"
    assert not (testbed.state(spare) / "mnt" / user).is_mount()
    held = [g for g in testbed.records()[spare]["info"]["gpus"] if g["holder"] == user]
    assert held == []
    hub.unspawn(user)


def test_admin_pages_are_admin_only(testbed, hub):
    hub.create_user("judy")
    token = hub.user_token("judy")
    for path in ("api/admin/state", "api/admin/migrations"):
        assert admin(hub, "GET", path, token=token).status_code == 403
        assert admin(hub, "GET", path).status_code == 200
    r = requests.get(f"{hub.url}{ADMIN}api/admin/state", timeout=30, allow_redirects=False)
    assert r.status_code in (302, 401, 403)


def test_agents_refuse_requests_without_their_token(testbed, hub):
    from support.testbed import AGENT_PORT, NODE_IP

    from labvm_spawner.node import auth

    rec = {"url": f"https://{NODE_IP['a']}:{AGENT_PORT}"}
    cert = testbed.state("a") / "tls" / "node.crt"  # the one node a enrolled with
    key = auth.load_key(testbed.key_file)
    body = {"key": "mallory", "username": "mallory", "server": "", "image": testbed.image,
            "cmd": ["sleep", "infinity"], "env": {}, "secrets": {},
            "limits": {"cpus": 1, "mem_bytes": 1 << 30, "pids": 100, "blkio_weight": None,
                       "io_read_bps": None, "io_write_bps": None, "disk_bytes": None,
                      "store_bytes": None}}
    wrong = [{}, {"Authorization": "Bearer nope"},
             {"Authorization": f"Bearer {auth.node_token(key, 'b')}"},  # node b's token
             {"Authorization": f"token {auth.node_token(key, 'a')}"}]
    for headers in wrong:
        for method, path in (("POST", "/v1/servers/mallory/start"), ("GET", "/v1/info"),
                             ("POST", "/v1/servers/alice/stop")):
            r = requests.request(method, rec["url"] + path, headers=headers, verify=str(cert),
                                 json=body if method == "POST" else None, timeout=30)
            assert r.status_code == 401, (headers, path, r.status_code)
    # Plain HTTP gets no answer from the agent at all.
    with pytest.raises(requests.RequestException):
        requests.get(rec["url"].replace("https://", "http://") + "/v1/info", timeout=10)
    assert not testbed.docker("a").containers.list(all=True,
                                                   filters={"label": "labvm.key=mallory"})
    # The right token, through the pinned certificate, is answered.
    ok = requests.get(rec["url"] + "/v1/info", verify=str(cert), timeout=30,
                      headers={"Authorization": f"Bearer {auth.node_token(key, 'a')}"})
    assert ok.status_code == 200 and ok.json()["name"] == "a"


# ---- trust between the hub and its nodes, and what containers reach ----------------

NET_PROBE = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=4).close()
        print(target, "open")
    except OSError as e:
        print(target, "closed", type(e).__name__)
"""


class Listener:
    """A TCP port in the root namespace that counts who connects (a stand-in for one of
    the hub's other services, or a forger's endpoint)."""

    def __init__(self, host: str) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _probe(hub, user: str, targets: list[str]) -> dict[str, str]:
    import shlex

    rc, out = run(hub, user, f"python3 -c {shlex.quote(NET_PROBE)} {' '.join(targets)}")
    assert rc == 0, out
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def _from_node(n: str, targets: list[str]) -> dict[str, str]:
    r = subprocess.run(["nsenter", f"--net=/var/run/netns/labvm-{n}", sys.executable, "-c",
                        NET_PROBE, *targets], capture_output=True, text=True, timeout=120)
    return {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.strip()}


def _doctor(testbed, n: str) -> subprocess.CompletedProcess:
    from support.testbed import HUB_IP

    return subprocess.run(["nsenter", f"--net=/var/run/netns/labvm-{n}", sys.executable, "-m",
                           "labvm_spawner.cli.node", "doctor", "--docker-url", testbed.sock(n),
                           "--state-dir", str(testbed.state(n)),
                           "--token-hash-file", str(testbed.work / f"{n}.token-hash"),
                           "--store-root", str(testbed.node_path(n, testbed.store)),
                           "--cached-store-root",
                           str(testbed.node_path(n, testbed.store, cached=True)),
                           "--hub-url", f"http://{HUB_IP}:{PORT}"],
                          capture_output=True, text=True, timeout=60)


def test_containers_reach_only_the_hub_api_and_the_outside(testbed, hub):
    from support.testbed import AGENT_PORT, HUB_IP, MFS_MASTER, NODE_IP

    other_port = Listener(HUB_IP)  # one of the hub host's other services
    try:
        hub.create_user("netcheck")
        hub.spawn("netcheck", timeout=300)
        n = node_of(testbed, "netcheck")
        other = "b" if n == "a" else "a"
        blocked = [f"{MFS_MASTER}:9421", "10.77.0.2:9422", f"{NODE_IP[other]}:{AGENT_PORT}",
                   f"{NODE_IP[n]}:{AGENT_PORT}", f"{HUB_IP}:{PORT}",
                   f"{HUB_IP}:{other_port.port}"]
        hub_api = f"{HUB_IP}:{PORT + 2}"
        # They all answer the node itself: only its containers are kept away.
        assert set(_from_node(n, blocked + [hub_api]).values()) == {"open"}
        seen = _probe(hub, "netcheck", blocked + [hub_api])
        assert {t: seen[t] for t in blocked} == {t: "closed" for t in blocked}, seen
        assert seen[hub_api] == "open"
        rc, out = run(hub, "netcheck", "sudo -n apt-get update -qq && echo APT-OK")
        assert rc == 0 and "APT-OK" in out, out  # the package mirrors, outside
        doctor = _doctor(testbed, n)
        assert doctor.returncode == 0 and "LABVM-FWD" in doctor.stdout, doctor.stdout
        for what in ("dockerd: running, with userns-remap", "layer store: MooseFS",
                     "cached layer reads: through",
                     "clock: within", "enrollment: enrolled", "container network policy: "
                     "in place"):
            assert what in doctor.stdout, (what, doctor.stdout)

        # A dockerd restart (unattended upgrades) leaves the policy in place.
        testbed.kill_dockerd(n)
        testbed.start_dockerd(n)
        doctor = _doctor(testbed, n)
        assert doctor.returncode == 0 and "MISSING" not in doctor.stdout, doctor.stdout
        hub.unspawn("netcheck")
        hub.spawn("netcheck", timeout=300)
        assert node_of(testbed, "netcheck") == n
        seen = _probe(hub, "netcheck", [f"{MFS_MASTER}:9421", hub_api])
        assert seen == {f"{MFS_MASTER}:9421": "closed", hub_api: "open"}
    finally:
        other_port.close()
        hub.unspawn("netcheck")


def _state(hub) -> dict:
    return admin(hub, "GET", "api/admin/state").json()


def _wait_node(hub, name: str, up: bool, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(hub)
        nodes = {n["name"]: n for n in state["cluster_nodes"]}
        if (name in nodes and nodes[name]["up"]) == up:
            return state
        time.sleep(0.5)
    raise AssertionError(f"node {name} did not become {'up' if up else 'down'}")


def test_forged_heartbeats_are_never_used(testbed, hub, tmp_path):
    from support.testbed import HUB_IP

    from labvm_spawner.node import auth, registry

    forger = Listener(HUB_IP)
    record_b = testbed.registry / "b.json"
    genuine = record_b.read_text()  # replayed later: properly signed, but old
    _, bad_key = auth.ensure_cert(tmp_path / "forger", "b", HUB_IP)
    gpus = [{"index": i, "uuid": f"GPU-forged-{i}", "name": "NVIDIA A100-SXM4-80GB",
             "memory_total": 80 << 30, "holder": None} for i in range(8)]
    info = {"gpus": gpus, "cpus": 512, "mem_bytes": 1 << 42, "cpus_committed": 0,
            "mem_committed": 0, "servers": {}}
    # A node nobody enrolled, advertising a lot, at the forger's address.
    registry.write_record(testbed.registry, {"name": "c", "url": f"http://{HUB_IP}:"
                                             f"{forger.port}", "info": info}, bad_key)
    agent_b = testbed.agents["b"]
    os.killpg(agent_b.pid, signal.SIGSTOP)  # b's own heartbeats would overwrite ours
    try:
        forged = {
            "unsigned, plain HTTP": (None, f"http://{HUB_IP}:{forger.port}"),
            "another certificate": (bad_key, f"https://{HUB_IP}:{forger.port}"),
        }
        for what, (key, url) in forged.items():
            registry.write_record(testbed.registry, {"name": "b", "url": url, "cert": "forged",
                                                     "info": info}, key)
            state = _wait_node(hub, "b", up=False)
            warnings = " ".join(state["node_warnings"])
            assert "node b" in warnings and "not signed" in warnings, (what, warnings)
            assert "c: a heartbeat record from a node that is not enrolled" in warnings
            assert "c" not in {n["name"] for n in state["cluster_nodes"]}
        # A stale signature: b's own record, replayed after it went out of date.
        time.sleep(testbed.down_after_s + 1)
        record_b.write_text(genuine)
        state = _wait_node(hub, "b", up=False)
        assert not any("node b" in w for w in state["node_warnings"])  # signed, just old
        # New servers go nowhere near the forgeries.
        hub.create_user("forgery")
        hub.spawn("forgery", timeout=300)
        assert node_of(testbed, "forgery") == "a"
        hub.unspawn("forgery")
        assert forger.accepted == 0, "the hub called a forged address"
    finally:
        os.killpg(agent_b.pid, signal.SIGCONT)
        (testbed.registry / "c.json").unlink(missing_ok=True)
        forger.close()
    _wait_node(hub, "b", up=True)


def test_a_revoked_node_gets_no_more_calls(testbed, hub):
    hub.create_user("revokee")
    r = admin(hub, "POST", "api/admin/nodes/revoke", json={"node": "b"})
    assert r.status_code == 200, r.text
    try:
        calls = testbed.agent_log("b").read_text().count(" /v1/")
        state = _state(hub)
        assert "b" not in {n["name"] for n in state["cluster_nodes"]}
        enrolled = {n["name"]: n for n in state["enrolled_nodes"]}
        assert enrolled["b"]["revoked_by"] == "boss" and not enrolled["a"]["revoked_at"]
        assert admin(hub, "POST", "api/admin/pin", json={"user": "revokee", "node": "b"}
                     ).status_code == 400
        hub.spawn("revokee", timeout=300)
        assert node_of(testbed, "revokee") == "a"
        hub.unspawn("revokee")
        time.sleep(3)
        assert testbed.agent_log("b").read_text().count(" /v1/") == calls
    finally:
        testbed.enroll(hub, ("b",))  # back, with a new join token
    _wait_node(hub, "b", up=True)


def test_agents_refuse_starts_they_must_not_run(testbed, hub):
    from support.testbed import AGENT_PORT, NODE_IP

    from labvm_spawner.node import auth

    url = f"https://{NODE_IP['a']}:{AGENT_PORT}"
    cert = testbed.state("a") / "tls" / "node.crt"
    token = auth.node_token(auth.load_key(testbed.key_file), "a")
    good = {"key": "mallory", "username": "mallory", "server": "", "image": testbed.image,
            "cmd": ["jupyterhub-singleuser"], "env": {}, "secrets": {}, "gpus": 0,
            "limits": {"cpus": 1, "mem_bytes": 1 << 30, "pids": 100, "blkio_weight": None,
                       "io_read_bps": None, "io_write_bps": None, "disk_bytes": None,
                      "store_bytes": None}}
    cases = {
        "a foreign image": dict(good, image="evil/miner:latest"),
        "a user that is not the key's": dict(good, username="alice"),
        "more CPUs than the node": dict(good, limits=dict(good["limits"], cpus=4000)),
        "more memory than the node": dict(good, limits=dict(good["limits"],
                                                            mem_bytes=1 << 50)),
        "more GPUs than the node": dict(good, gpus=16),
    }
    for what, body in cases.items():
        r = requests.post(f"{url}/v1/servers/mallory/start", json=body, verify=str(cert),
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert r.json()["error"], what
    assert not testbed.docker("a").containers.list(all=True,
                                                   filters={"label": "labvm.key=mallory"})


def test_idle_reclaim_stops_an_idle_server_on_a_node_after_the_warning(testbed, hub):
    """Idle GPU reclaim for a server on an agent's node: the service sees the idle GPU in
    that node's own sample, leaves the warning in the user's home there (through the
    agent), then stops the server. A second hub with reclaim on takes the test bed's hub
    address for this test (containers may reach only that one)."""
    hub.stop()
    other = testbed.hub(testbed.work / "hub-reclaim", PORT,
                        env={"LABVM_TEST_MONITOR_IDLE_S": "40"})  # warned at 20 s, stop at 40
    try:
        other.start()
        testbed.enroll(other)
        other.create_user("rita")
        other.spawn("rita", {"gpus": 1}, timeout=300)
        node = node_of(testbed, "rita")
        box = testbed.docker(node).containers.get(f"labvm-{node}-rita")
        warning = '"$(getent passwd rita | cut -d: -f6)"/LABVM-IDLE-GPU-WARNING.txt'
        deadline = time.monotonic() + 60
        while box.exec_run(["sh", "-c", f"test -s {warning}"]).exit_code != 0:
            assert time.monotonic() < deadline, f"no warning in rita's home on node {node}"
            time.sleep(1)
        text = box.exec_run(["sh", "-c", f"cat {warning}"]).output.decode()
        assert "STOPPED" in text and "files are kept" in text
        deadline = time.monotonic() + 90
        while other.api("GET", "/users/rita").json()["servers"]:
            assert time.monotonic() < deadline, other.log_tail()
            time.sleep(1)
        assert node_of(testbed, "rita") is None
    finally:
        other.stop()
        hub.start()


OUTAGE_S = float(os.environ.get("LABVM_OUTAGE_S", "30"))
MOOSEFS_SH = Path(__file__).resolve().parents[2] / "scripts" / "moosefs.sh"


def _moosefs(cmd: str) -> None:
    r = subprocess.run([str(MOOSEFS_SH), cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _store_shown(hub, reachable: bool, timeout: float = 60) -> dict:
    """The admin state once every node's sample shows the store (un)reachable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = [n for n in _state(hub)["nodes"] if n["name"] in ("a", "b")]
        if len(nodes) == 2 and all(n["host"]["store_reachable"] is reachable for n in nodes):
            return nodes
        time.sleep(1)
    raise AssertionError(f"the admin state never showed the store reachable={reachable}: "
                         f"{nodes}\n{hub.log_tail(40)}")


def test_a_moosefs_outage_blocks_no_one_and_loses_nothing(testbed, hub):
    hub.create_user("olga")
    hub.spawn("olga", timeout=300)
    home = node_of(testbed, "olga")
    other = "b" if home == "a" else "a"
    rc, out = run(hub, "olga", "mkdir -p ~/work && seq 1 20000 > ~/work/before.txt && "
                  "head -c 3000000 /dev/urandom > ~/work/blob.bin && echo ok")
    assert rc == 0 and "ok" in out, out
    wait_synced(testbed, "olga", time.time())

    _moosefs("master-stop")
    try:
        down_at = time.time()
        # The running server goes on: it reads and writes what is on its node.
        rc, out = run(hub, "olga", "wc -l < ~/work/before.txt && seq 1 5000 > "
                      "~/work/during.txt && mv ~/work/blob.bin ~/work/blob.moved && echo ok",
                      timeout=120)
        assert rc == 0 and out.split()[0] == "20000" and "ok" in out, out
        # The admin pages say the store does not answer.
        nodes = _store_shown(hub, False)
        assert all(n["host"]["store_since"] >= down_at - 5 for n in nodes), nodes
        # A start now is refused at once, with our sentence.
        hub.create_user("pavel")
        t0 = time.monotonic()
        with pytest.raises(HubError, match="layer store does not answer"):
            hub.spawn("pavel", timeout=120)
        assert time.monotonic() - t0 < 60
        time.sleep(max(0.0, down_at + OUTAGE_S - time.time()))
    finally:
        _moosefs("master-start")
    up_at = time.time()
    rc, before_move = run(hub, "olga", MANIFEST)
    assert rc == 0 and "during.txt" in before_move and "blob.moved" in before_move, before_move

    # Sync catches up by itself, and the pages show the store again.
    wait_synced(testbed, "olga", up_at, timeout=180)
    print(f"sync caught up {time.time() - up_at:.1f} s after a {up_at - down_at:.0f} s "
          "MooseFS master outage")
    _store_shown(hub, True)
    # Nothing was lost: on another node, from the store alone, every file is there.
    m = migrate(hub, "olga", other)
    assert m["state"] == "done", m
    rc, after_move = run(hub, "olga", MANIFEST)
    assert rc == 0, after_move
    lost = set(before_move.splitlines()) - set(after_move.splitlines())
    print(f"files lost across the outage: {len(lost)}")
    assert lost == set() and after_move == before_move
    hub.unspawn("olga")
    hub.spawn("pavel", timeout=300)  # and starts work again
    hub.unspawn("pavel")
