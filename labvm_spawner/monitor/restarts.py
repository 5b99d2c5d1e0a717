"""Starting again the servers a node going down stopped (``LabVMSpawner.restart_interrupted``).

The spawner asks for a restart (a row in LabVM's database) when its poll finds the server
gone because its node went down or restarted. This service, which holds a hub token that
may start servers, starts each through the hub's REST API once its node is back, with the
user's last options. A start that fails is tried again a few times; an ask older than
``max_age_s`` is dropped: a server that was down for a day does not come back by surprise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tornado.httpclient import HTTPClientError

from ..cluster import Cluster
from .hubapi import HubApi

_log = logging.getLogger("labvm.monitor.restarts")

MAX_ATTEMPTS = 3


async def restart_interrupted(cluster: Cluster, hub: HubApi, max_age_s: float,
                              now: float | None = None, log: logging.Logger = _log,
                              ) -> list[dict[str, Any]]:
    """Start the servers whose restart is due; returns the asks acted on."""
    asks = await asyncio.to_thread(cluster.restarts)
    if not asks:
        return []
    now = time.time() if now is None else now
    nodes = await cluster.nodes()
    done: list[dict[str, Any]] = []
    for ask in asks:
        what = f"{ask['user']}:{ask['server']}" if ask["server"] else ask["user"]
        if now - ask["t"] > max_age_s or ask["attempts"] >= MAX_ATTEMPTS:
            log.warning("not restarting the server of %s (%s at %s): %s", what, ask["reason"],
                        time.ctime(ask["t"]), "too long ago" if ask["attempts"] <
                        MAX_ATTEMPTS else f"{ask['attempts']} starts failed")
            await asyncio.to_thread(cluster.drop_restart, ask["key"])
            continue
        model = await hub.user(ask["user"])
        if model is None:
            await asyncio.to_thread(cluster.drop_restart, ask["key"])
            continue
        server = (model.get("servers") or {}).get(ask["server"]) or {}
        if server.get("ready") or server.get("pending"):
            continue  # started (or starting) already; its start drops the ask
        if await asyncio.to_thread(cluster.active_migration, ask["key"]):
            continue  # the migration starts it where it moves it
        view = nodes.get(ask["node"])
        if view is not None and not view.up:
            continue  # its upper is there: wait for the node to come back
        await asyncio.to_thread(cluster.restart_attempted, ask["key"])
        log.warning("restarting the server of %s on node %s (%s)", what, ask["node"],
                    ask["reason"])
        try:
            await hub.start_server(ask["user"], ask["server"], ask["options"])
        except HTTPClientError as e:
            body = e.response.body.decode(errors="replace") if e.response else ""
            log.warning("the restart of %s was refused: %s %s", what, e.code, body[:300])
        done.append(ask)
    return done
