"""Disk quotas in a real hub on this node (uppers on a btrfs with quotas, as setup.sh makes).

A user past 90% of a small quota is warned on their page and in their home; they fill it
from a Jupyter kernel and get "Disk quota exceeded", while a second user writes normally
and the hub starts a third server. Deleting frees the room; the admin raises the quota
live; the quota holds after a stop, a start and a hub restart.
"""

from __future__ import annotations

import json
import secrets
import threading

import pytest
from support import jupyter_exec
from support.browser import ARTIFACTS, launch, log_in
from support.helpers import container_of, sh
from support.monitorharness import root_of, start_monitor

pytestmark = pytest.mark.e2e

PORT = 21400
SFX = secrets.token_hex(3)
ALICE, BOB, CAROL = (f"{n}-{SFX}" for n in ("alice", "bob", "carol"))
M = 1 << 20
FILL = 'dd if=/dev/zero of="$HOME/{name}" bs=1M count={mb} conv=fsync 2>&1; echo "dd-rc=$?"'


def _dd(hub, user: str, name: str, mb: int) -> str:
    rc, out = jupyter_exec.run(hub, user, FILL.format(name=name, mb=mb), timeout=300)
    assert rc == 0, out
    return out


def test_a_full_quota_fails_only_its_own_user(hub_factory, docker_client, tmp_path) -> None:
    mon = start_monitor(hub_factory, tmp_path, port=PORT, upperfs="3G", env={
        "LABVM_TEST_USER_POLICY": json.dumps({ALICE: {"disk": "64M"}, BOB: {"disk": "1G"}})})
    hub = mon.hub
    for name in (ALICE, BOB, CAROL, "boss"):
        hub.create_user(name)
    hub.spawn(ALICE)
    hub.spawn(BOB)

    # Past 90% of her quota Alice is warned: on her page, the admin's, and in her home,
    # where JupyterLab's file browser opens.
    assert "dd-rc=0" in _dd(hub, ALICE, "data", 60)
    see_warning_in_browser(mon)
    state = mon.wait(lambda s: root_of(s, ALICE)["disk_warning"])
    disk = root_of(state, ALICE)["disk"]
    assert disk["limit"] == 64 * M and 58 * M < disk["used"] <= 64 * M
    assert root_of(state, BOB)["disk"]["limit"] == 1 << 30
    assert root_of(state, BOB)["disk_warning"] is False
    me = mon.wait(lambda r: r["roots"] and r["roots"][0]["disk_warning"], path="api/me",
                  user=ALICE)
    assert me["roots"][0]["disk"]["limit"] == 64 * M
    c = container_of(docker_client, ALICE)
    notice_file = '"$(getent passwd "$LABVM_USER" | cut -d: -f6)"/LABVM-DISK-QUOTA-WARNING.txt'
    mon.wait(lambda _s: sh(c, f"test -s {notice_file}")[0] == 0)
    assert "of your 64 MiB quota" in sh(c, f"cat {notice_file}")[1]
    metrics = mon.get("metrics", None,
                      headers={"Authorization": f"Bearer {mon.metrics_token}"}).text
    limits = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("labvm_root_disk_limit_bytes{") and f'key="{ALICE}"' in line]
    assert limits == [64 * M], metrics

    # Alice fills her quota while Bob writes and Carol's server starts, all at once.
    results: dict[str, object] = {}

    def bob_writes() -> None:
        results["bob"] = _dd(hub, BOB, "data", 200)

    def carol_starts() -> None:
        results["carol"] = hub.spawn(CAROL)

    others = [threading.Thread(target=bob_writes), threading.Thread(target=carol_starts)]
    for t in others:
        t.start()
    alice = _dd(hub, ALICE, "big", 200)
    for t in others:
        t.join(300)
    assert "Disk quota exceeded" in alice and "dd-rc=1" in alice, alice
    assert "dd-rc=0" in str(results["bob"]), results["bob"]
    assert container_of(docker_client, CAROL) is not None

    # Deleting frees the room again.
    rc, out = jupyter_exec.run(hub, ALICE, 'rm "$HOME/big" "$HOME/data" && sync')
    assert rc == 0, out
    assert "dd-rc=0" in _dd(hub, ALICE, "small", 40)

    # Refusals change nothing; a raise applies to the running server at once.
    r = mon.post("api/admin/quota", {"key": ALICE, "disk": "lots"})
    assert r.status_code == 400 and "not a size" in r.json()["error"]
    r = mon.post("api/admin/quota", {"key": ALICE, "disk": "8M"})
    assert r.status_code == 400 and "at least 16 MiB" in r.json()["error"]
    r = mon.post("api/admin/quota", {"key": ALICE, "disk": "20M"})  # she has 40M
    assert r.status_code == 409, r.text
    assert "Nothing was changed; the quota stays 64 MiB" in r.json()["error"]
    raise_in_browser(mon, "256M")
    mon.wait(lambda s: (root_of(s, ALICE).get("disk") or {}).get("limit") == 256 * M)
    assert "dd-rc=0" in _dd(hub, ALICE, "more", 150)  # beyond the old 64M, no restart

    # The quota holds across a stop and start, and a hub restart.
    hub.unspawn(ALICE)
    hub.spawn(ALICE)
    out = _dd(hub, ALICE, "again", 200)
    assert "Disk quota exceeded" in out, out
    hub.restart()
    if container_of(docker_client, ALICE) is None:  # the hub stopped it on shutdown
        hub.spawn(ALICE)
    state = mon.wait(lambda s: (root_of(s, ALICE).get("disk") or {}).get("limit") == 256 * M,
                     timeout=60)
    assert root_of(state, ALICE)["disk"]["used"] <= 256 * M
    rc, out = jupyter_exec.run(hub, ALICE, 'rm -f "$HOME/again" "$HOME/more" && sync')
    assert rc == 0, out
    out = _dd(hub, ALICE, "last", 300)
    assert "Disk quota exceeded" in out, out


def _page(browser, mon, user: str, path: str):  # noqa: ANN001, ANN202
    page = log_in(browser.new_context(), mon.hub.url, user, mon.hub.password)
    page.goto(mon.url + path)
    page.wait_for_selector("body[data-loaded='1']", state="attached", timeout=30000)
    return page


def see_warning_in_browser(mon) -> None:  # noqa: ANN001
    """Alice's own page, in a real browser, says her disk is almost full."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = _page(browser, mon, ALICE, "me")
            page.wait_for_selector("#warnings .warning:has-text('is almost full')",
                                   timeout=30000)
            assert "MiB of 64 MiB (9" in page.inner_text("#warnings")  # used of quota (94%)
            page.screenshot(path=str(ARTIFACTS / "quota-user-warning.png"), full_page=True)
        finally:
            browser.close()


def raise_in_browser(mon, size: str) -> None:  # noqa: ANN001
    """The admin sets Alice's quota on the Users page: the page's own POST."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = _page(browser, mon, "boss", "admin/users")
            page.on("dialog", lambda d: d.accept())
            box = page.locator(f"input[data-quota-for='{ALICE}']")
            box.wait_for(timeout=30000)
            box.fill(size)
            page.click(f"button[data-quota='{ALICE}']")
            page.wait_for_selector(f"#status:has-text('Disk quota of {ALICE}:')",
                                   timeout=30000)
            assert "in force now" in page.inner_text("#status")
            page.screenshot(path=str(ARTIFACTS / "quota-admin-users.png"), full_page=True)
        finally:
            browser.close()
