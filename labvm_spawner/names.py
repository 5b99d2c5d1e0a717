"""Names that become paths, mount options and container names, checked before any use.

A username ends up in host paths (``uppers/<key>``), overlay mount options
(where ``,`` and ``:`` are separators) and a Linux account inside the container
(at most 32 bytes). So only a small, safe alphabet is accepted, and a refused
name fails before anything is created.
"""

from __future__ import annotations

import re

from .errors import LabVMError

_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SERVER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_username(name: str) -> str:
    if not isinstance(name, str) or not _USER.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}…"
        raise LabVMError(
            f"The username {shown!r} cannot be used for a LabVM container: use 1 to 32 "
            "characters from lower-case ASCII letters, digits, '_' and '-', starting with "
            "a letter or '_'. Ask your admin to rename the account."
        )
    return name


def check_server_name(name: str) -> str:
    if not _SERVER.fullmatch(name):
        raise LabVMError(
            f"The server name {name[:70]!r} cannot be used: use 1 to 64 characters from "
            "lower-case ASCII letters, digits, '_' and '-', starting with a letter or digit."
        )
    return name


def root_key(username: str, server_name: str = "") -> str:
    """The key of a server's own root filesystem: ``alice`` or ``alice.work``."""
    check_username(username)
    if server_name:
        return f"{username}.{check_server_name(server_name)}"
    return username
