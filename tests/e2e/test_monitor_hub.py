"""The monitor service in a real hub: admin pages and APIs, users' own pages, /metrics,
admin actions, idle GPU reclaim, and screenshots from a real browser."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest
from support.components import require
from support.helpers import container_of, fixture_uuids, sh, state_dir
from support.hubharness import HubError
from support.monitorharness import Monitor, root_of, start_monitor

from labvm_spawner.storage import open_store

pytestmark = pytest.mark.e2e

# Container names (labvm-<user>) are global on the engine that other test sessions share.
SFX = secrets.token_hex(3)
ALICE, BOB, CAROL, DAVE = (f"{n}-{SFX}" for n in ("alice", "bob", "carol", "dave"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# The user's home, where JupyterLab's file browser opens (helpers.sh sets HOME=/home).
HOME = 'cd "$(getent passwd "$LABVM_USER" | cut -d: -f6)" && '


def pid_of(docker_client, user: str) -> int:
    c = container_of(docker_client, user)
    c.reload()
    return c.attrs["State"]["Pid"]


def test_admin_and_user_views_on_real_servers(hub_factory, docker_client, tmp_path):
    mon = start_monitor(hub_factory, tmp_path)
    hub = mon.hub
    uuids = fixture_uuids()
    for name in (ALICE, BOB):
        hub.create_user(name)
    hub.spawn(ALICE, {"gpus": 2})
    hub.spawn(BOB, {"gpus": 1})
    alice_pid, bob_pid = pid_of(docker_client, ALICE), pid_of(docker_client, BOB)
    mon.gpu_processes({0: [(alice_pid, 5 << 30)], 2: [(bob_pid, 3 << 30)]})

    # GPU processes are mapped to their users through their containers' cgroups.
    state = mon.wait(lambda s: s["gpus"] and s["gpus"][0]["processes"]
                     and s["gpus"][2]["processes"])
    gpus = state["gpus"]
    assert [g["uuid"] for g in gpus] == uuids
    assert [g["holder_user"] for g in gpus[:4]] == [ALICE, ALICE, BOB, ""]
    assert [(p["pid"], p["user"]) for p in gpus[0]["processes"]] == [(alice_pid, ALICE)]
    assert [(p["pid"], p["user"]) for p in gpus[2]["processes"]] == [(bob_pid, BOB)]
    alice = root_of(state, ALICE)
    assert alice["running"] and [g["index"] for g in alice["gpus"]] == [0, 1]
    assert alice["container"]["cpu_limit"] == 1.0
    assert alice["container"]["mem_limit"] == 1 << 30
    # Background sync (every 10 s) shows as a time once it has run.
    synced = mon.wait(lambda s: root_of(s, ALICE)["last_sync"] != "never", timeout=30)
    assert root_of(synced, ALICE)["last_sync"].startswith("20")
    assert state["nodes"][0]["gpus_held"] == 3 and state["nodes"][0]["containers"] == 2
    # What the two servers' limits commit of the node (one CPU and 1 GiB each).
    assert state["nodes"][0]["cpus_committed"] == 2.0
    assert state["nodes"][0]["mem_committed"] == 2 << 30

    # Real CPU figures: a busy loop in alice's container shows (limit: 1 CPU).
    sh(container_of(docker_client, ALICE), "nohup sh -c 'while :; do :; done' "
       ">/dev/null 2>&1 &")
    state = mon.wait(lambda s: root_of(s, ALICE)["container"]["cpu_percent"] > 50, timeout=60)
    assert root_of(state, BOB)["container"]["cpu_percent"] < 30

    # History: GPU utilisation moves over time (the fake is a wave).
    time.sleep(3)
    hist = mon.get(f"api/admin/history?kind=gpu&subject={uuids[0]}&hours=1").json()
    utils = [v["util"] for _, v in hist["points"]]
    assert len(utils) >= 3 and len(set(utils)) > 1

    # A user sees their own usage and nobody else's.
    r = mon.get("api/me", ALICE)
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["name"] == ALICE and [r["key"] for r in me["roots"]] == [ALICE]
    assert BOB not in json.dumps(me)
    r = mon.get(f"api/me/history?kind=user&subject={ALICE}&hours=1", ALICE)
    assert r.status_code == 200 and r.json()["points"]
    for path in (f"api/me/history?kind=user&subject={BOB}",
                 "api/me/history?kind=gpu&subject=x"):
        assert mon.get(path, ALICE).status_code == 403

    # Admin pages and APIs: 403 for a non-admin, anonymous gets no data.
    for path in ("admin/gpus", "admin/users", "admin/nodes", "api/admin/state",
                 f"api/admin/history?kind=gpu&subject={uuids[0]}"):
        assert mon.get(path, ALICE).status_code == 403, path
        assert mon.get(path, None).status_code in (302, 403), path
        assert mon.get(path, "boss").status_code == 200, path
    for path in ("api/admin/stop", "api/admin/drain", "api/admin/restore"):
        assert mon.post(path, {"user": BOB}, ALICE).status_code == 403, path

    # /metrics: the scraper token or an admin; never anonymous.
    bearer = {"Authorization": f"Bearer {mon.metrics_token}"}
    assert mon.get("metrics", None).status_code == 401
    assert mon.get("metrics", None, headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    assert mon.get("metrics", ALICE).status_code == 403
    assert mon.get("metrics", "boss").status_code == 200
    text = mon.get("metrics", None, headers=bearer).text
    line = next(x for x in text.splitlines()
                if x.startswith("DCGM_FI_DEV_FB_USED{") and f'UUID="{uuids[0]}"' in x)
    assert f'user="{ALICE}"' in line and 'gpu="0"' in line and "modelName=" in line
    assert float(line.rsplit(" ", 1)[1]) >= 5 * 1024  # MiB, as DCGM reports it

    # Screenshots from a real browser, and the same 403 there.
    browse(mon)

    # Actions: drain the node, restore a layer version, stop a server.
    node = state["nodes"][0]["name"]
    assert mon.post("api/admin/drain", {"node": node, "drained": True}).json()["drained"]
    assert mon.get("api/admin/state").json()["nodes"][0]["drained"] is True
    # A drained node takes no new users (those already there stay and may restart).
    hub.create_user("newbie")
    with pytest.raises(HubError, match="drained"):
        hub.spawn("newbie")

    assert mon.post("api/admin/stop", {"user": BOB}).status_code == 200
    deadline = time.monotonic() + 60
    while hub.api("GET", f"/users/{BOB}").json()["servers"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    mon.wait(lambda s: not root_of(s, BOB)["running"])

    store = open_store(state_dir(hub) / "store")
    if hasattr(store, "restore"):
        for text_ in ("one", "two"):
            layer = tmp_path / f"layer-{text_}"
            (layer / "home").mkdir(parents=True)
            (layer / "home" / "note").write_text(text_)
            store.commit(BOB, layer)
        versions = store.versions(BOB)  # [..., "one", "two"]
        r = mon.post("api/admin/restore", {"key": BOB, "version": versions[-2]})
        assert r.status_code == 200, r.text
        assert store.current_version(BOB) == r.json()["current_version"] > versions[-1]
        assert (store.version_path(BOB, store.current_version(BOB)) / "home" / "note"
                ).read_text() == "one"
        # A running server's root is not restored under it.
        assert mon.post("api/admin/restore", {"key": ALICE, "version": 1}).status_code == 409
        assert root_of(mon.get("api/admin/state").json(), BOB)["versions"] == \
            store.versions(BOB)


def browse(mon: Monitor) -> None:
    require(CHROMIUM.exists(), f"chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for user, page_path, shot in (("boss", "admin/gpus", "monitor-admin-gpus.png"),
                                          ("boss", "admin/users", "monitor-admin-users.png"),
                                          ("boss", "admin/nodes", "monitor-admin-nodes.png"),
                                          (ALICE, "me", "monitor-user-alice.png")):
                page = login(browser, mon, user)
                errors: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(m.text))
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.goto(mon.url + page_path)
                try:
                    page.wait_for_selector("body[data-loaded='1']", state="attached",
                                           timeout=20000)
                except Exception as e:
                    page.screenshot(path=str(ARTIFACTS / f"failed-{shot}"), full_page=True)
                    raise AssertionError(f"{page_path} did not load: {errors}") from e
                page.wait_for_selector(".uplot" if page_path != "admin/users" else "td",
                                       timeout=20000)
                assert page.get_by_text(user).count() > 0
                if page_path == "admin/gpus":
                    assert page.locator("tr[data-uuid]").count() == 8
                    assert page.locator("td.held").first.inner_text().startswith(ALICE)
                if page_path == "admin/nodes":
                    # What the running servers' limits commit, next to what is in use.
                    assert page.inner_text("#nodes").count(" committed") == 2
                    # The node's first scheduled housekeeping.
                    page.wait_for_selector("tr[data-housekeeping]", timeout=90000)
                    assert "tree(s) removed" in page.inner_text("#housekeeping")
                page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
                if page_path == "admin/nodes":
                    # A POST from the page itself, with the login cookie and xsrf token.
                    page.click("button[data-drain]")
                    page.wait_for_selector("button:text-is('Undrain')", timeout=20000)
                    assert mon.get("api/admin/state").json()["nodes"][0]["drained"] is True
                    page.click("button[data-drain]")
                    page.wait_for_selector("button:text-is('Drain')", timeout=20000)
                page.context.close()
            page = login(browser, mon, ALICE)
            resp = page.goto(mon.url + "admin/gpus")
            assert resp.status == 403
            page.context.close()
        finally:
            browser.close()


def login(browser, mon: Monitor, user: str):
    page = browser.new_context().new_page()
    page.goto(mon.hub.url + "/hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", mon.hub.password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(lambda url: "/hub/login" not in url, timeout=20000)
    return page


def test_idle_gpus_are_reclaimed_after_a_warning_and_files_kept(hub_factory, docker_client,
                                                                tmp_path):
    mon = start_monitor(hub_factory, tmp_path, idle_s=40)  # warned after 20 s, stopped at 40
    hub = mon.hub
    hub.create_user(CAROL)
    hub.create_user(DAVE)
    hub.spawn(DAVE)  # no GPUs: never reclaimed
    hub.spawn(CAROL, {"gpus": 1})
    box = container_of(docker_client, CAROL)
    assert sh(box, HOME + "echo precious > work.txt")[0] == 0

    me = mon.wait(lambda m: m["roots"] and m["roots"][0]["warning"], path="api/me",
                  user=CAROL, timeout=30)
    warning = me["roots"][0]["warning"]
    assert warning["stop_at"] > time.time() - 2
    rc, out = sh(box, HOME + "cat LABVM-IDLE-GPU-WARNING.txt")
    assert rc == 0 and "STOPPED" in out and "files are kept" in out

    deadline = time.monotonic() + 60
    while hub.api("GET", f"/users/{CAROL}").json()["servers"]:
        assert time.monotonic() < deadline, hub.log_tail()
        time.sleep(0.5)
    assert container_of(docker_client, CAROL) is None
    assert hub.api("GET", f"/users/{DAVE}").json()["servers"][""]["ready"]

    hub.spawn(CAROL, {"gpus": 1})
    rc, out = sh(container_of(docker_client, CAROL), HOME + "cat work.txt")
    assert (rc, out.strip()) == (0, "precious")
