"""The idle-GPU warning a user really sees: a file at the top of their home directory,
which is where JupyterLab's file browser opens, written into their running container.

It goes through the overlay into the user's upper, like any file they make; it is
removed again if the GPUs get busy before the stop.
"""

from __future__ import annotations

import logging
import time

import docker
import docker.errors

log = logging.getLogger(__name__)

NOTICE_NAME = "LABVM-IDLE-GPU-WARNING.txt"

_TEXT = """Your GPUs on this server have been idle since {since}.

To give them to someone who needs them, this server will be STOPPED at {stop} (UTC)
unless your GPUs are used before then.

Your files are kept: everything in this server's file system is still there when you
start it again from the hub's home page. Delete this file whenever you like; it is
removed by itself if your GPUs become busy again.
"""

# Runs as root in the container: the home of $LABVM_USER (set by the spawner) gets the file.
_WRITE = 'h=$(getent passwd "$LABVM_USER" | cut -d: -f6); printf "%s" "$LABVM_NOTICE" ' \
         '> "$h/{name}" && chown "$LABVM_USER": "$h/{name}"'
_REMOVE = 'h=$(getent passwd "$LABVM_USER" | cut -d: -f6); rm -f "$h/{name}"'


def _container(client: docker.DockerClient, key: str, node: str):  # type: ignore[no-untyped-def]
    found = client.containers.list(filters={"label": [f"labvm.key={key}",
                                                      f"labvm.node={node}"]})
    return found[0] if found else None


def text(idle_since: float, stop_at: float) -> str:
    fmt = "%Y-%m-%d %H:%M"
    return _TEXT.format(since=time.strftime(fmt, time.gmtime(idle_since)),
                        stop=time.strftime(fmt, time.gmtime(stop_at)))


def write(client: docker.DockerClient, key: str, node: str, stop_at: float,
          idle_since: float | None = None) -> bool:
    c = _container(client, key, node)
    if c is None:
        return False
    body = text(idle_since if idle_since is not None else time.time(), stop_at)
    try:
        r = c.exec_run(["sh", "-c", _WRITE.format(name=NOTICE_NAME)], user="0",
                       environment={"LABVM_NOTICE": body})
    except docker.errors.APIError as e:
        log.warning("could not write the idle notice of %s: %s", key, e)
        return False
    if r.exit_code != 0:
        log.warning("could not write the idle notice of %s: %s", key, r.output[-300:])
    return r.exit_code == 0


def remove(client: docker.DockerClient, key: str, node: str) -> None:
    c = _container(client, key, node)
    if c is None:
        return
    try:
        c.exec_run(["sh", "-c", _REMOVE.format(name=NOTICE_NAME)], user="0")
    except docker.errors.APIError as e:
        log.warning("could not remove the idle notice of %s: %s", key, e)
