"""Moving a user's root (and server) from one node to another: sync, then merge.

The sequence, for a running server on a live source node:

1. sync the upper to the store while the server runs (most of the data);
2. stop the server through the hub (the node syncs once more after the stop);
3. check that final sync is complete (or run it);
4. point the root's placement at the target;
5. start through the hub: the target takes the root over, stacks the synced upper
   above the current version and starts with a fresh upper; it merges the stacked
   layer into a new version afterwards, off the critical path.

Any failure after the stop puts the placement back and starts the server on the
source again, from the same store contents, so nothing is lost. With the source node
down (an evacuation), steps 1-3 are skipped and the root starts from its last sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from .cluster import Cluster
from .errors import LabVMError
from .names import check_server_name, check_username, root_key
from .node.protocol import NodeInfo

log = logging.getLogger("labvm.migration")
STOPPING = "stopping"  # the step the downtime counts from (the spawn page shows it)


class Hub(Protocol):
    async def user(self, name: str) -> dict[str, Any] | None: ...
    async def stop_server(self, user: str, server: str = "") -> None: ...
    async def start_server(self, user: str, server: str = "",
                           options: dict[str, Any] | None = None) -> None: ...


class MigrationRefused(LabVMError):
    """The migration was refused before anything changed."""


def _server_model(user: dict[str, Any], server: str) -> dict[str, Any] | None:
    return (user.get("servers") or {}).get(server)


def _state(model: dict[str, Any] | None) -> str:
    if not model:
        return "stopped"
    if model.get("ready"):
        return "running"
    return model.get("pending") or ("stopped" if model.get("stopped") else "pending")


class Migrator:
    """Runs migrations; one per process, next to the admin pages and API."""

    def __init__(self, cluster: Cluster, hub: Hub, timeout_s: float = 300) -> None:
        self.cluster = cluster
        self.hub = hub
        self.timeout_s = timeout_s
        self.tasks: dict[int, asyncio.Task] = {}

    async def check(self, user: str, server: str, target: str) -> dict[str, Any]:
        """Everything a refusal depends on; raises MigrationRefused, changes nothing."""
        try:
            check_username(user)
            if server:
                check_server_name(server)
        except LabVMError as e:
            raise MigrationRefused(str(e)) from e
        model = await self.hub.user(user)
        if model is None:
            raise MigrationRefused(f"there is no user {user!r}")
        key = root_key(user, server)
        srv = _server_model(model, server)
        if server and srv is None:
            raise MigrationRefused(f"{user} has no server named {server!r}")
        nodes = await self.cluster.nodes()
        if target not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise MigrationRefused(f"there is no node {target!r} (nodes: {known})")
        if not nodes[target].up:
            raise MigrationRefused(f"node {target} is down")
        if nodes[target].drained:
            raise MigrationRefused(f"node {target} is drained; undrain it first")
        source = self.cluster.placement(key)
        if source is None:
            raise MigrationRefused(
                f"{key} has no root on any node yet; pin {user} to {target} instead")
        if source == target:
            raise MigrationRefused(f"{key} is already on node {target}")
        state = _state(srv)
        if state not in ("running", "stopped"):
            raise MigrationRefused(f"{key}'s server is busy ({state}); try again when it "
                                   "has started or stopped")
        src = nodes.get(source)
        source_up = bool(src and src.up)
        held: dict[str, int] = {}
        for g in src.info.held_by(key) if src is not None else []:
            held[g["name"]] = held.get(g["name"], 0) + 1
        if held:
            # Heartbeats lag by a few seconds; the target's agent knows its GPUs now.
            # If it does not answer now, its last heartbeat decides.
            try:
                nodes[target].info = NodeInfo.from_json(
                    await self.cluster.client(target).info())
            except LabVMError as e:
                log.warning("node %s did not answer (%s); using its heartbeat", target, e)
        for model_name, n in held.items():
            free = len(nodes[target].info.free_gpus(model_name, key))
            if free < n:
                raise MigrationRefused(
                    f"node {target} has {free} free {model_name} GPU(s); {key} holds {n}")
        if self.cluster.active_migration(key):
            raise MigrationRefused(f"{key} is already being migrated")
        return {"key": key, "source": source, "source_up": source_up, "state": state,
                "options": (srv or {}).get("user_options") or {}}

    async def start(self, user: str, server: str, target: str, by: str) -> int:
        """Check, record and launch a migration; returns its id."""
        plan = await self.check(user, server, target)
        try:
            mid = self.cluster.begin_migration(plan["key"], user, server, plan["source"],
                                               target, by)
        except LabVMError as e:
            raise MigrationRefused(str(e)) from e
        task = asyncio.create_task(self._run(mid, user, server, target, plan))
        self.tasks[mid] = task
        task.add_done_callback(lambda _: self.tasks.pop(mid, None))
        return mid

    async def wait(self, mid: int) -> dict[str, Any] | None:
        task = self.tasks.get(mid)
        if task is not None:
            await asyncio.shield(task)
        return self.cluster.migration(mid)

    def _step(self, mid: int, step: str) -> None:
        log.info("migration %d: %s", mid, step)
        self.cluster.update_migration(mid, step=step)

    async def _wait_state(self, user: str, server: str, want: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            model = await self.hub.user(user)
            srv = _server_model(model or {}, server)
            state = _state(srv)
            if state == want:
                return srv
            if want == "running" and state == "stopped":
                raise LabVMError("the server did not start (see the hub's log)")
            await asyncio.sleep(0.2)
        raise LabVMError(f"the server did not become {want} in {self.timeout_s:.0f} s")

    async def _run(self, mid: int, user: str, server: str, target: str,
                   plan: dict[str, Any]) -> None:
        key, source = plan["key"], plan["source"]
        running = plan["state"] == "running"
        src = None
        switched = False
        t_stop: float | None = None
        try:
            # Inside the try: a node that cannot be reached (no key file, say) must fail
            # the migration and release its lock, not leave it "running" for ever.
            src = self.cluster.client(source) if plan["source_up"] else None
            if src is not None and running:
                self._step(mid, f"syncing {key} on node {source} while it runs")
                await src.sync(key)
            if running:
                self._step(mid, f"{STOPPING} {key} on node {source}")
                t_stop = time.time()
                await self.hub.stop_server(user, server)
                await self._wait_state(user, server, "stopped")
            if src is not None:
                self._step(mid, f"final sync of {key} on node {source}")
                status = await src.status(key)
                if status.state == "running":
                    raise LabVMError(f"{key} still runs on node {source}")
                if not status.synced_clean:
                    result = await src.sync(key)
                    if not result.get("synced"):
                        raise LabVMError(f"the final sync of {key} on node {source} failed")
            else:
                self._step(mid, f"node {source} is down: evacuating {key} from its last "
                           "sync")
            self.cluster.set_placement(key, target)
            switched = True
            if running:
                self._step(mid, f"starting {key} on node {target}")
                await self.hub.start_server(user, server, plan["options"])
                await self._wait_state(user, server, "running")
            downtime = time.time() - t_stop if t_stop is not None else None
            if src is not None:
                self._step(mid, f"dropping the old upper of {key} on node {source}")
                try:
                    await src.discard(key)
                except LabVMError as e:
                    log.warning("migration %d: discard on %s failed: %s", mid, source, e)
            self.cluster.update_migration(mid, state="done", step="done", downtime_s=downtime)
        except Exception as e:
            log.exception("migration %d failed", mid)
            error = str(e) or type(e).__name__
            if switched and plan["source_up"]:
                self.cluster.set_placement(key, source)
            if running:
                try:
                    self._step(mid, f"failed ({error}); starting {key} again on node "
                               f"{self.cluster.placement(key)}")
                    model = await self.hub.user(user)
                    if _state(_server_model(model or {}, server)) == "stopped":
                        await self.hub.start_server(user, server, plan["options"])
                    await self._wait_state(user, server, "running")
                except Exception as e2:
                    error += f"; restarting it failed too: {e2}"
            self.cluster.update_migration(mid, state="failed", error=error)
