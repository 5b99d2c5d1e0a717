"""Where the desktop's sockets live: one private directory per user in the container."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def runtime_dir(base: str | None = None) -> Path:
    """The user's private desktop directory (mode 0700), made if missing.

    Both sockets of the chain live here, so only this uid (and the container's
    root, which is the same person through sudo) can connect to them.
    """
    root = Path(base or os.environ.get("LABVM_DESKTOP_DIR") or f"/tmp/labvm-desktop-{os.getuid()}")
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    # Refuse a directory (or link) someone else planted at our path.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeError(f"{root} exists and is not a directory owned by this user")
    root.chmod(0o700)
    return root


def proxy_socket(base: str | None = None) -> Path:
    """websockify's socket, the one jupyter-server-proxy connects to."""
    return runtime_dir(base) / "websockify.sock"


def vnc_socket(base: str | None = None) -> Path:
    """Xvnc's RFB socket, the one websockify connects to."""
    return runtime_dir(base) / "vnc.sock"
