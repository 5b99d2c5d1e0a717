"""The browser desktop (labvm_spawner.vnc), end to end in a real Chromium.

A user logs in, opens JupyterLab and its Desktop tile, and types a command into an
XFCE terminal through noVNC; the file it writes is read back from the container.
Another user, and nobody at all, get 403 on the page's websocket; no VNC port
listens anywhere.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright
from support.components import require
from support.desktop_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP_DIR,
    DOCKER_DNS,
    artifact,
    connect_chain,
    connect_direct,
    listening_tcp,
    wait_for,
    ws_url,
    x_run,
)
from support.desktop_rfb import RfbClient
from support.helpers import container_of, sh

pytestmark = pytest.mark.e2e
PORT = 20000
CONNECTED = "document.documentElement.classList.contains('noVNC_connected')"


@pytest.fixture
def browser():
    require(os.access(CHROMIUM, os.X_OK), f"chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def login(browser, hub, user: str):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", hub.password)
    page.click("#login_submit")
    page.wait_for_url(lambda url: "/hub/login" not in url, timeout=60_000)
    return ctx, page


def retried(page, ready, what: str, tries: int = 4, timeout_ms: int = 20_000) -> None:
    """Wait for ``ready(page, timeout_ms)``, reloading the page between tries.

    Chromium aborts requests in flight with ERR_NETWORK_CHANGED whenever dockerd adds or
    removes an interface (any container starting or stopping on the machine), and a
    page that lost one of its scripts never starts. A reload fetches them again.
    """
    for i in range(tries):
        try:
            ready(page, timeout_ms)
            return
        except PlaywrightTimeout:
            if i == tries - 1:
                page.screenshot(path=str(artifact(f"desktop-failed-{what}.png")))
                raise
            page.reload()


def connected(page, timeout_ms: int) -> None:
    page.wait_for_function(CONNECTED, timeout=timeout_ms)


def own_token(ctx, hub, user: str) -> str:
    """An API token the logged-in user makes for themself, as the hub's token page does."""
    xsrf = next(c["value"] for c in ctx.cookies() if c["name"] == "_xsrf")
    r = ctx.request.post(f"{hub.url}/hub/api/users/{user}/tokens",
                         headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
                         data=json.dumps({"note": "desktop test", "expires_in": 600}))
    assert r.ok, r.text()
    return r.json()["token"]


def screen_size(c) -> tuple[int, int]:
    code, out = x_run(c, "xrandr --current | head -1")
    assert code == 0, out
    cur = out.split("current", 1)[1].split(",", 1)[0].split("x")
    return int(cur[0]), int(cur[1])


def pid_of(c, name: str) -> str:
    return sh(c, f"pgrep -u 1000 -x {name} | head -1")[1].strip()


def test_desktop_in_browser(hub_factory, docker_client, browser):
    hub = hub_factory(port=PORT)
    for u in ("alice", "bob"):
        hub.create_user(u)
    hub.spawn("alice")
    c = container_of(docker_client, "alice")

    ctx, page = login(browser, hub, "alice")
    page.goto(f"{hub.url}/user/alice/lab")
    tile = page.locator(".jp-LauncherCard", has_text="Desktop")
    retried(page, lambda p, t: tile.wait_for(timeout=t), "lab", timeout_ms=40_000)
    page.screenshot(path=str(artifact("desktop-lab-launcher.png")))
    with ctx.expect_page(timeout=60_000) as opened:
        tile.click()
    desk = opened.value
    retried(desk, connected, "connect", timeout_ms=30_000)
    assert "/user/alice/desktop/vnc.html" in desk.url
    desk.locator("#noVNC_container canvas").wait_for(timeout=30_000)
    wait_for("the XFCE panel", lambda: pid_of(c, "xfce4-panel"), timeout=60)

    # The session follows the browser window (resize=remote).
    desk.set_viewport_size({"width": 1024, "height": 700})
    wait_for("the screen to follow the window", lambda: screen_size(c) == (1024, 700), 30)

    # A terminal opened from the keyboard, and a command typed into it.
    canvas = desk.locator("#noVNC_container canvas")
    time.sleep(2)  # let XFCE settle (xfsettingsd grabs the keyboard shortcuts)
    canvas.click(position={"x": 500, "y": 350})
    desk.keyboard.press("Control+Alt+t")
    wait_for("xfce4-terminal", lambda: pid_of(c, "xfce4-terminal"), timeout=30)
    wait_for("the terminal to have focus",
             lambda: "Terminal" in x_run(c, "xdotool getactivewindow getwindowname")[1], 30)
    time.sleep(1)
    desk.keyboard.type("echo typed-in-desktop-$(id -un) > ~/desktop-proof.txt\n", delay=20)
    proof = wait_for("the file typed in the desktop",
                     lambda: sh(c, "cat /home/alice/desktop-proof.txt")[1].strip()
                     == "typed-in-desktop-alice", timeout=30)
    assert proof
    desk.screenshot(path=str(artifact("desktop.png")))

    # The clipboard, both ways.
    x_run(c, "printf from-x | setsid xclip -selection clipboard >/dev/null 2>&1 &")
    wait_for("the X clipboard in noVNC",
             lambda: desk.eval_on_selector("#noVNC_clipboard_text", "e => e.value") == "from-x",
             timeout=20)
    desk.eval_on_selector("#noVNC_clipboard_text", """e => {
        e.value = 'from-browser'; e.dispatchEvent(new Event('change')); }""")
    wait_for("noVNC's clipboard in X",
             lambda: x_run(c, "xclip -o -selection clipboard")[1] == "from-browser", timeout=20)

    # A reload joins the same session: same terminal, same Xvnc.
    xvnc, term = pid_of(c, "Xvnc"), pid_of(c, "xfce4-terminal")
    desk.reload()
    retried(desk, connected, "reload")
    assert (pid_of(c, "Xvnc"), pid_of(c, "xfce4-terminal")) == (xvnc, term)

    # A dropped connection comes back by itself (reconnect=true): end websockify's
    # per-connection child, as a network drop would.
    procs = sh(c, "ps -eo pid=,ppid=,args=")[1]
    rows = [line.split(None, 2) for line in procs.splitlines()]
    bridge = {pid for pid, _, args in rows if "-m websockify" in args}
    children = [pid for pid, ppid, _ in rows if ppid in bridge]
    assert children, f"no websockify connection to drop:\n{procs}"
    sh(c, f"kill {' '.join(children)}")
    desk.wait_for_function(f"!{CONNECTED}", timeout=20_000)
    desk.wait_for_function(CONNECTED, timeout=60_000)  # noVNC's own reconnect, no reload
    assert pid_of(c, "Xvnc") == xvnc

    # The owner's view is still live after all this.
    desk.screenshot(path=str(artifact("desktop-after-reconnect.png")))
    ctx.close()

    # Another user: 403 on the page in the browser, and on the websocket.
    bctx, bpage = login(browser, hub, "bob")
    resp = bpage.goto(f"{hub.url}/user/alice/desktop/")
    assert resp is not None and resp.status == 403, (resp and resp.status, bpage.url)
    bob = {"Authorization": f"token {own_token(bctx, hub, 'bob')}"}
    bctx.close()
    _assert_websocket_refused(hub, "alice", headers=bob)
    r = requests.get(f"{hub.url}/user/alice/desktop/", headers=bob, timeout=30)
    assert r.status_code == 403, r.status_code

    # Nobody logged in: the websocket gets 403, the page a redirect to the login.
    _assert_websocket_refused(hub, "alice", headers={})
    r = requests.get(f"{hub.url}/user/alice/desktop/", allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "/hub/" in r.headers["Location"], r.status_code
    assert "noVNC" not in r.text

    # An admin with access to alice's server (the hub's test service) gets in.
    with connect_chain(hub, "alice", hub.token) as ws:
        rfb = RfbClient(ws)
        rfb.handshake()
        rfb.first_frame()
        assert (rfb.width, rfb.height) == screen_size(c)


def _assert_websocket_refused(hub, user: str, headers: dict[str, str]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(hub, user), additional_headers=headers, open_timeout=30).close()
    assert err.value.response.status_code == 403


def test_desktop_has_no_network_listener_and_no_password(hub_factory, docker_client):
    hub = hub_factory(port=PORT)
    hub.create_user("carol")
    hub.spawn("carol")
    c = container_of(docker_client, "carol")
    before = listening_tcp(c)
    t0 = time.perf_counter()
    with connect_chain(hub, "carol", hub.token) as ws:  # the first visit starts the desktop
        rfb = RfbClient(ws)
        rfb.handshake()
        rfb.first_frame()
    assert time.perf_counter() - t0 < 60

    # Only Jupyter and sshd (for the SSH gateway) listen on the network; VNC and
    # websockify are unix sockets. (Nothing new, and nothing but 8888 and 22 beside
    # dockerd's own DNS.)
    after = listening_tcp(c)
    assert after == before, after - before
    assert {port for addr, port in after if addr != DOCKER_DNS} == {8888, 22}, after
    code, out = sh(c, f"stat -c '%a %u %n' {DESKTOP_DIR} {DESKTOP_DIR}/vnc.sock "
                      f"{DESKTOP_DIR}/websockify.sock")
    assert code == 0, out
    modes = [line.split()[:2] for line in out.splitlines()]
    assert modes == [["700", "1000"], ["600", "1000"], ["600", "1000"]], out

    # No VNC password anywhere: none configured, none in the environment or on disk.
    code, out = sh(c, "tr '\\0' ' ' < /proc/$(pgrep -u 1000 -x Xvnc)/cmdline")
    assert "-SecurityTypes None" in out and "passwd" not in out.lower(), out
    assert sh(c, "test -e ~/.vnc/passwd || test -e /home/carol/.vnc/passwd")[0] != 0
    code, out = sh(c, "cat /proc/$(pgrep -u 1000 -x Xvnc)/environ | tr '\\0' '\\n'")
    assert code == 0 and "TOKEN" not in out and "VNC" not in out, out

    # Direct to websockify inside the container: the same RFB server.
    with connect_direct(c) as ws:
        rfb = RfbClient(ws)
        rfb.handshake()
        rfb.first_frame()
        assert rfb.width > 0
