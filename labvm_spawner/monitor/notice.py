"""Warnings a user really sees: a file at the top of their home directory, which is
where JupyterLab's file browser opens, written into their running container.

Idle GPUs (removed again if the GPUs get busy before the stop) and a disk quota 90%
full (removed when usage drops back). The file goes through the overlay into the
user's upper, like any file they make.
"""

from __future__ import annotations

import logging
import time

import docker
import docker.errors

from ..form import format_bytes

log = logging.getLogger(__name__)

NOTICE_NAME = "LABVM-IDLE-GPU-WARNING.txt"
DISK_NOTICE_NAME = "LABVM-DISK-QUOTA-WARNING.txt"

_TEXT = """Your GPUs on this server have been idle since {since}.

To give them to someone who needs them, this server will be STOPPED at {stop} (UTC)
unless your GPUs are used before then.

Your files are kept: everything in this server's file system is still there when you
start it again from the hub's home page. Delete this file whenever you like; it is
removed by itself if your GPUs become busy again.
"""

_DISK_TEXT = """Your server's disk is {pct:.0f}% full: {used} of your {limit} quota.

When it is full, writing any file fails with "Disk quota exceeded". Delete what you no
longer need (conda caches, checkpoints, downloaded data sets), or ask your admin for a
bigger quota. This file goes away by itself when you are back under 85%.
"""

# Runs as root in the container: the home of $LABVM_USER (set by the spawner) gets the file.
_WRITE = 'h=$(getent passwd "$LABVM_USER" | cut -d: -f6); printf "%s" "$LABVM_NOTICE" ' \
         '> "$h/{name}" && chown "$LABVM_USER": "$h/{name}"'
_REMOVE = 'h=$(getent passwd "$LABVM_USER" | cut -d: -f6); rm -f "$h/{name}"'


def running_container(client: docker.DockerClient, key: str, node: str):  # type: ignore[no-untyped-def]
    """The running container of ``key`` on ``node`` (this service's node), or None."""
    found = client.containers.list(filters={"label": [f"labvm.key={key}",
                                                      f"labvm.node={node}"]})
    return found[0] if found else None


def text(idle_since: float, stop_at: float) -> str:
    fmt = "%Y-%m-%d %H:%M"
    return _TEXT.format(since=time.strftime(fmt, time.gmtime(idle_since)),
                        stop=time.strftime(fmt, time.gmtime(stop_at)))


def disk_text(used: int, limit: int) -> str:
    return _DISK_TEXT.format(pct=100 * used / limit, used=format_bytes(used),
                             limit=format_bytes(limit))


NAMES = (NOTICE_NAME, DISK_NOTICE_NAME)  # the only notices a node writes on request


def put(client: docker.DockerClient, key: str, node: str, name: str, body: str) -> bool:
    """Write the notice ``name`` into the home of ``key``'s user; False if not running."""
    c = running_container(client, key, node)
    if c is None:
        return False
    try:
        r = c.exec_run(["sh", "-c", _WRITE.format(name=name)], user="0",
                       environment={"LABVM_NOTICE": body})
    except docker.errors.APIError as e:
        log.warning("could not write %s for %s: %s", name, key, e)
        return False
    if r.exit_code != 0:
        log.warning("could not write %s for %s: %s", name, key, r.output[-300:])
    return r.exit_code == 0


def drop(client: docker.DockerClient, key: str, node: str, name: str) -> None:
    c = running_container(client, key, node)
    if c is None:
        return
    try:
        c.exec_run(["sh", "-c", _REMOVE.format(name=name)], user="0")
    except docker.errors.APIError as e:
        log.warning("could not remove %s of %s: %s", name, key, e)
