"""Every name rule of LabVM: users, servers, root keys and nodes, checked before any use.

A username ends up in host paths (``uppers/<key>``), overlay mount options
(where ``,`` and ``:`` are separators) and a Linux account inside the container
(at most 32 bytes). So only a small, safe alphabet is accepted, and a refused
name fails before anything is created. The layer store, the node agent's routes,
the registry, the spawner and the admin service all take their rules from here
(plain ``re``, no JupyterHub import: the storage library uses it too).
"""

from __future__ import annotations

import re

from .errors import LabVMError

USER = r"[a-z_][a-z0-9_-]{0,31}"
SERVER = r"[a-z0-9][a-z0-9_-]{0,63}"
KEY = rf"{USER}(?:\.{SERVER})?"  # a root key: user, or user.server
NODE = r"[a-z0-9][a-z0-9_.-]{0,62}"
_USER = re.compile(USER)
_SERVER = re.compile(SERVER)
_KEY = re.compile(KEY)
_NODE = re.compile(NODE)


def is_key(key: object) -> bool:
    """True when ``key`` is a root key (``str.fullmatch``: a trailing newline is no key)."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def parse_key(key: str) -> tuple[str, str]:
    """(user, server) of a root key; LabVMError if it is none."""
    if not is_key(key):
        raise LabVMError(f"{str(key)[:80]!r} is not a LabVM root key (user or user.server)")
    user, _, server = key.partition(".")
    return user, server


def is_node_name(name: object) -> bool:
    return isinstance(name, str) and _NODE.fullmatch(name) is not None


def check_node_name(name: object) -> str:
    if not is_node_name(name):
        raise LabVMError(f"invalid node name {str(name)[:70]!r}: use 1 to 63 characters from "
                         "lower-case ASCII letters, digits, '_', '.' and '-', starting with a "
                         "letter or digit")
    return name  # type: ignore[return-value]


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
    if not isinstance(name, str) or not _SERVER.fullmatch(name):
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
