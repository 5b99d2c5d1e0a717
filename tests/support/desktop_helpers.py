"""What the desktop test and benchmark share: sockets, websockets and waits."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from .helpers import sh

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Where labvm_spawner.vnc puts its sockets for the user with uid 1000.
DESKTOP_DIR = "/tmp/labvm-desktop-1000"


def wait_for(what: str, check: Callable[[], object], timeout: float = 60,
             interval: float = 0.25):
    """Poll ``check`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def ws_url(hub, user: str) -> str:
    return f"ws://127.0.0.1:{hub.port}/user/{user}/desktop/websockify"


def direct_socket(container) -> str:
    """websockify's socket inside the container, as the host's root reaches it."""
    container.reload()
    return f"/proc/{container.attrs['State']['Pid']}/root{DESKTOP_DIR}/websockify.sock"


def connect_chain(hub, user: str, token: str, timeout: float = 90):
    """A websocket to the desktop through CHP and jupyter-server-proxy."""
    from websockets.sync.client import connect

    ws = connect(ws_url(hub, user), additional_headers={"Authorization": f"token {token}"},
                 open_timeout=timeout, max_size=None, compression=None)
    # As a browser does: no Nagle delay on the client's small requests.
    ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ws


def connect_direct(container, timeout: float = 30):
    """A websocket straight to websockify's unix socket in the container."""
    from websockets.sync.client import unix_connect

    return unix_connect(direct_socket(container), "ws://localhost/websockify",
                        open_timeout=timeout, max_size=None, compression=None)


def x_run(container, command: str) -> tuple[int, str]:
    """Run an X client command as the user on the desktop's display."""
    return sh(container, f"export DISPLAY=:1 HOME=/home/$(id -un); {command}")


def listening_tcp(container) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state in the container's network
    namespace, IPv4 and IPv6 (addresses as the kernel's hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        code, out = sh(container, f"cat {table}")
        assert code == 0, out
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                addr, port = fields[1].rsplit(":", 1)
                found.add((addr, int(port, 16)))
    return found


# dockerd's embedded DNS server for user-defined networks (127.0.0.11, little-endian hex),
# which dockerd itself runs in every container's network namespace.
DOCKER_DNS = "0B00007F"


def artifact(name: str) -> Path:
    d = Path(__file__).resolve().parent.parent / "artifacts"
    d.mkdir(exist_ok=True)
    return d / name
