"""The shipped configuration on this machine, as a new lab admin meets it: log in with a
real (PAM) account, press Start, get JupyterLab; a server that cannot be placed is
refused in our words on the page; a hub restart keeps the browser logged in."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from support import browser
from support.components import REPO, TEST_ROOT

from labvm_spawner.node.overlay import mount_points

pytestmark = pytest.mark.e2e

URL = "http://127.0.0.1:8000"
JUPYTERHUB = Path(sys.executable).parent / "jupyterhub"


def _account(name: str) -> str:
    """A throw-away log-in account of this machine (PAM), admin by the shipped config."""
    for group in ("labvm-users", "labvm-admins"):
        subprocess.run(["groupadd", "--system", "-f", group], check=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G",
                    "labvm-users,labvm-admins", name], check=True)
    password = secrets.token_urlsafe(16)
    subprocess.run(["chpasswd"], input=f"{name}:{password}", text=True, check=True)
    return password


class ShippedHub:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc: subprocess.Popen | None = None
        self.log = state / "hub.log"

    def start(self) -> None:
        (self.state / "hub").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LABVM_STATE_DIR=str(self.state))
        self.proc = subprocess.Popen(
            [str(JUPYTERHUB), "-f", str(REPO / "jupyterhub_config.py")],
            cwd=self.state / "hub", env=env, stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{URL}/hub/api/", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


def test_the_shipped_config_first_spawn_refusal_and_restart(docker_client, labvm_image, chp):
    from playwright.sync_api import sync_playwright

    tag = uuid.uuid4().hex[:6]
    first, second = f"labvmt{tag}a", f"labvmt{tag}b"
    state = TEST_ROOT / f"shipped-{tag}"
    hub = ShippedHub(state)
    passwords = {}
    try:
        passwords = {first: _account(first), second: _account(second)}
        # What setup.sh does for a lab: the uppers on a btrfs with quotas (the shipped
        # policy has disk quotas).
        up = subprocess.run([str(REPO / "scripts" / "upperfs.sh"), "up", str(state), "2G"],
                            capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        hub.start()
        with sync_playwright() as p:
            chromium = browser.launch(p)
            try:
                # An admin (policy 32G) on this machine: the form says what really applies.
                ctx = chromium.new_context()
                page = browser.log_in(ctx, URL, first, passwords[first])
                page.goto(f"{URL}/hub/spawn")
                form = page.inner_text("form")
                assert "not the 32 GiB of your policy" in form, form
                assert re.search(r"Disk space\s+100 GiB", form), form  # the admin quota
                page.click("form [type=submit]")
                page.wait_for_url(f"**/user/{first}/lab**", timeout=180000)
                page.wait_for_selector("#jp-main-dock-panel, .jp-LabShell", timeout=120000)
                page.screenshot(path=str(browser.ARTIFACTS / "shipped-first-spawn.png"))

                # Another admin now asks for the memory the first one holds: refused,
                # in our words, never "500".
                other = chromium.new_context()
                page2 = browser.log_in(other, URL, second, passwords[second])
                page2.goto(f"{URL}/hub/spawn")
                page2.click("form [type=submit]")
                page2.wait_for_selector("text=No node can start this server now",
                                        timeout=60000)
                text = page2.inner_text("body")
                assert "to spare" in text and "500" not in text
                assert "Internal Server Error" not in text
                page2.screenshot(path=str(browser.ARTIFACTS / "shipped-refusal.png"))
                other.close()

                # The hub restarts; the first browser is still logged in.
                hub.stop()
                hub.start()
                page.goto(f"{URL}/hub/home")
                assert "/hub/login" not in page.url
                assert first in page.inner_text("body")
                page.goto(f"{URL}/user/{first}/lab")
                page.wait_for_selector("#jp-main-dock-panel, .jp-LabShell", timeout=120000)
                ctx.close()
            finally:
                chromium.close()
    finally:
        hub.stop()
        for c in docker_client.containers.list(all=True, filters={"label": "labvm.node=local"}):
            if c.labels.get("labvm.user") in (first, second):
                c.remove(force=True)
        for mp in sorted(mount_points(), key=len, reverse=True):
            if mp.startswith(f"{state}/"):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        for name in passwords:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(state)], capture_output=True)
