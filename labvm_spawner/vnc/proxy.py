"""The jupyter-server-proxy entry: ``/user/<name>/desktop/`` and its launcher tile."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def setup_desktop() -> dict:
    """Server-process config for jupyter-server-proxy (entry point ``desktop``).

    jupyter-server-proxy starts the session on the first authenticated request and
    keeps it for the life of the Jupyter server, so a browser reload or a second tab
    reattaches to the same desktop. Its handler demands Jupyter's login for pages and
    answers 403 to an unauthenticated websocket.
    """
    from .nodelay import enable_nodelay
    from .paths import proxy_socket

    enable_nodelay()
    sock = proxy_socket()
    return {
        "command": [sys.executable, "-m", "labvm_spawner.vnc.session", "--listen", str(sock)],
        # A socket path instead of a port: nothing of the desktop listens on TCP.
        "unix_socket": str(sock),
        # Xvnc, the XFCE session and websockify must all be up; a cold start takes seconds.
        "timeout": 60,
        "new_browser_tab": True,
        "launcher_entry": {
            "title": "Desktop",
            # JupyterLab draws an icon from a URL only on cards of its kernel categories,
            # so the tile stays in jupyter-server-proxy's default one ("Notebook").
            "icon_path": str(HERE / "desktop.svg"),
        },
    }
