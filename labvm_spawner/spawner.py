"""LabVMSpawner: one persistent root container per user (or named server), with its own GPUs.

The control flow lives here; the container's shape is built by
``containerspec``, the root's layers by ``overlay`` and ``storage``, and GPU
bookkeeping by ``allocations``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import asdict, replace
from urllib.parse import urlsplit

from jupyterhub.spawner import Spawner
from tornado import web
from tornado.ioloop import PeriodicCallback
from traitlets import (
    Bool,
    Dict,
    Unicode,
    default,
)

from . import form
from .cluster import Cluster, NodeView
from .db import default_url as default_db_url
from .errors import LabVMError
from .migration import STOPPING
from .names import root_key
from .node.client import NodeUnreachable
from .node.protocol import SERVER_PORT, Limits, NodeConfig, NodeInfo, StartRequest
from .node.settings import NodeSettings
from .placement import choose_node
from .policy import resolve_policy, validate_config

# One cluster view (and in-process node) per process, shared by all spawners.
_clusters: dict[tuple, Cluster] = {}


class LabVMSpawner(NodeSettings, Spawner):
    """Spawn each user's server in a Docker container whose root is a persistent overlay."""

    image = Unicode(
        "labvm/user:latest",
        help="Docker image whose root filesystem is the bottom, shared layer of every root.",
    ).tag(config=True)

    policy = Dict(
        {"cpus": 2, "mem": "4G", "pids": 2048, "max_gpus": 1},
        help="Default policy for every user. Keys: cpus, mem, pids, blkio_weight, "
        "io_read_bps, io_write_bps (on the disk of the uppers), disk (a quota on the user's "
        "writable layer, e.g. '50G'; None: none; needs the node's uppers on a btrfs with quotas, "
        "scripts/upperfs.sh), store (the most one stored version of a root may hold), "
        "max_gpus, gpu_models.",
    ).tag(config=True)

    group_policy = Dict(
        help="Policy overrides per JupyterHub group name; a user in several groups gets "
        "the most generous value of each key.",
    ).tag(config=True)

    admin_policy = Dict(help="Policy overrides for JupyterHub admins.").tag(config=True)

    user_policy = Dict(help="Policy overrides per username, applied last.").tag(config=True)

    local_node = Bool(
        True,
        help="Run a node inside the hub process (named node_name, using this host's Docker, "
        "disks and GPUs). Turn it off when every node runs its own labvm-node agent.",
    ).tag(config=True)

    registry_dir = Unicode(
        "",
        help="Shared directory (on the layer store's MooseFS) where labvm-node agents write "
        "their heartbeat records. Empty: no remote nodes.",
    ).tag(config=True)

    node_key_file = Unicode(
        "",
        help="Root-only file with the hub's node key (made by `labvm-node make-key FILE`); "
        "each node's token is derived from it, and `labvm-node join` gets its hash.",
    ).tag(config=True)

    restart_interrupted = Bool(
        False,
        help="Start again, by themselves, the servers that were running when their node went "
        "down (a reboot, a crash of its engine or agent). The monitor service starts each "
        "once its node is back, with the user's last options; off: they stay stopped until "
        "their users start them.",
    ).tag(config=True)

    @default("options_form")
    def _options_form_default(self):
        return self._render_options_form

    @default("apply_user_options")
    def _apply_user_options_default(self):
        return _check_user_options

    @default("cmd")
    def _cmd_default(self):
        return ["jupyterhub-singleuser"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # A mistyped policy should stop the hub with a clear message, not one user's start.
        validate_config(self.policy, self.group_policy, self.admin_policy, self.user_policy)
        self.container_id = ""
        self.root_key = ""
        self.node = ""
        self._events: list[dict] = []
        self._starting = False

    # ---- helpers -----------------------------------------------------------

    def local_node_config(self) -> NodeConfig:
        """This hub's own node, when it runs one (``local_node``)."""
        return self.node_config(hub_api=[self._hub_api_endpoint()])

    def _hub_api_endpoint(self) -> str:
        """HOST:PORT of the hub's API as containers reach it (the only hub port they may)."""
        url = urlsplit(self.hub.api_url)
        host = socket.gethostbyname(url.hostname or "127.0.0.1")
        return f"{host}:{url.port or (443 if url.scheme == 'https' else 80)}"

    @property
    def cluster(self) -> Cluster:
        db = self.db_url or default_db_url(self.state_dir)
        cache_key = (db, self.registry_dir, self.local_node, self.node_name)
        if cache_key not in _clusters:
            local = None
            if self.local_node:
                # Only here does the hub load the node engine (and the Docker SDK).
                from .node.ops import NodeOps

                local = NodeOps(self.local_node_config())
            cluster = Cluster(db, self.registry_dir, self.node_key_file, local)
            if local is not None:
                _start_background_sync(local, self.log)
            _clusters[cache_key] = cluster
        return _clusters[cache_key]

    @property
    def key(self) -> str:
        return self.root_key or root_key(self.user.name, self.name)

    def _resolve_policy(self):
        groups = [g.name for g in getattr(self.user, "groups", [])]
        limits, gpu = resolve_policy(
            self.user.name, groups, bool(getattr(self.user, "admin", False)), self.policy,
            self.group_policy, self.admin_policy, self.user_policy,
        )
        # A disk quota an admin set for this root on the Users page outlasts the policy.
        is_set, disk = self.cluster.disk_quota(self.key)
        if is_set:
            limits = replace(limits, disk_bytes=disk)
        return limits, gpu

    @staticmethod
    def _gpu_models(nodes: dict[str, NodeView]) -> list[str]:
        """GPU models an option may name: those of the nodes that are up."""
        return sorted({m for n in nodes.values() if n.up for m in n.info.models()})

    def _gpu_counts(self, nodes: dict[str, NodeView], sharing: bool
                    ) -> tuple[dict[str, int], dict[str, int]]:
        """Free GPUs per model on the node this server would use, and all per model."""
        key = self.key
        home = self.cluster.placement(key) or self.cluster.pin(self.user.name)
        free: dict[str, int] = {}
        total: dict[str, int] = {}
        for node in nodes.values():
            if not node.up:
                continue
            for model, counts in node.info.by_model().items():
                total[model] = total.get(model, 0) + counts["total"]
            here = {m: node.info.usable_gpus(m, key, sharing) for m in node.info.models()}
            if home is None and node.drained:
                continue
            if home is None or home == node.name:
                for model, n in here.items():
                    free[model] = max(free.get(model, 0), n)
        return free, total

    async def _render_options_form(self, spawner=None) -> str:
        limits, gpu_policy = self._resolve_policy()
        nodes = await self.cluster.nodes()
        limits, caps = self._capped(limits, nodes)
        free, total = self._gpu_counts(nodes, self._sharing(gpu_policy))
        return form.render_form(limits, gpu_policy, free, total, caps)

    def _capped(self, limits: Limits, nodes: dict[str, NodeView]) -> tuple[Limits, list[str]]:
        """``limits`` lowered to what the node this server would use can give (its home
        node if it has one, else the biggest node that is up), and a note per cap."""
        home = self.cluster.placement(self.key) or self.cluster.pin(self.user.name)
        if home in nodes:
            node = nodes[home]
        else:
            up = [n for n in nodes.values() if n.up and not n.drained] or list(nodes.values())
            if not up:
                return limits, []
            node = max(up, key=lambda n: (n.info.mem_bytes, n.info.cpus))
        info, caps = node.info, []
        if info.mem_bytes and limits.mem_bytes > info.mem_bytes:
            caps.append(f"Memory is {form.format_bytes(info.mem_bytes)}, not the "
                        f"{form.format_bytes(limits.mem_bytes)} of your policy: node "
                        f"{node.name} has no more.")
            limits = replace(limits, mem_bytes=info.mem_bytes)
        if info.cpus and limits.cpus > info.cpus:
            caps.append(f"CPUs are {info.cpus}, not the {limits.cpus:g} of your policy: node "
                        f"{node.name} has no more.")
            limits = replace(limits, cpus=float(info.cpus))
        return limits, caps

    def options_from_form(self, formdata):
        return form.parse_form(formdata)

    def _sharing(self, gpu_policy) -> bool:
        return self.gpu_sharing or gpu_policy.sharing

    def _checked_request(self, models: list[str]):
        """Key, limits and GPU request of this start; refusals raise LabVMError."""
        key = root_key(self.user.name, self.name)
        limits, gpu_policy = self._resolve_policy()
        count, model = form.validate_options(dict(self.user_options or {}), gpu_policy, models)
        return key, limits, count, model, self._sharing(gpu_policy)

    def _emit(self, progress: int, message: str) -> None:
        self._events.append({"progress": progress, "message": message})
        self.log.info("%s: %s", self._log_name, message)

    # ---- state -------------------------------------------------------------

    def get_state(self):
        state = super().get_state()
        if self.container_id:
            state["container_id"] = self.container_id
        if self.root_key:
            state["root_key"] = self.root_key
        if self.node:
            state["node"] = self.node
        return state

    def load_state(self, state):
        super().load_state(state)
        self.container_id = state.get("container_id", "")
        self.root_key = state.get("root_key", "")
        self.node = state.get("node", "")

    def clear_state(self):
        super().clear_state()
        self.container_id = ""

    # ---- lifecycle ---------------------------------------------------------

    async def progress(self):
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if not self._starting:
                return
            await asyncio.sleep(0.2)

    async def start(self):
        self._events = []
        self._starting = True
        try:
            return await self._start()
        except LabVMError as e:
            # Our sentence, on the spawn page and in the REST API: never "Internal Server
            # Error" for a refusal we understand (the form handler passes HTTPErrors on).
            raise SpawnRefused(e) from e
        finally:
            self._starting = False

    async def _start(self):
        # Everything that can be refused is checked before anything is created.
        nodes = await self.cluster.nodes()
        self.cluster.require_registry()
        key, limits, count, model, sharing = self._checked_request(self._gpu_models(nodes))
        limits, caps = self._capped(limits, nodes)
        for cap in caps:
            self._emit(2, cap)
        self.root_key = key
        cluster = self.cluster
        placed = cluster.placement(key)
        pinned = cluster.pin(self.user.name)
        try:
            node_name = choose_node(nodes, key, count, model, limits, sharing, placed=placed,
                                    pinned=pinned)
        except LabVMError:
            # Heartbeats lag a few seconds (GPUs released just now look held): ask the
            # nodes themselves once before refusing.
            await self._refresh(nodes)
            node_name = choose_node(nodes, key, count, model, limits, sharing, placed=placed,
                                    pinned=pinned)
        moving = cluster.active_migration(key)
        stopped_at = None
        if moving and moving["target"] == node_name:
            self._emit(5, f"Moving your server from node {moving['source']} to node "
                       f"{node_name} (started by {moving['by']})")
            # What happened before this start, so the user sees the whole move.
            for t, step in cluster.migration_steps(moving["id"]):
                if step.startswith(STOPPING):
                    stopped_at = t
                self._emit(5, f"{time.strftime('%H:%M:%S', time.localtime(t))} {step}")
        elif len(nodes) > 1:
            self._emit(5, f"Starting on node {node_name}")
        if placed is None:
            cluster.set_placement(key, node_name)
        node = cluster.client(node_name)

        # One environment, split: tokens go to the node's tmpfs file, the rest to Docker.
        self.ip = "0.0.0.0"
        self.port = SERVER_PORT
        env = self.get_env()
        secrets = {k: env.pop(k) for k in list(env) if _is_secret(k)}
        req = StartRequest(
            key=key, username=self.user.name, server=self.name or "", image=self.image,
            cmd=self.cmd + self.get_args(), env=env, secrets=secrets, limits=asdict(limits),
            gpus=count, model=model, sharing=sharing, timeout_s=self.http_timeout,
            ssh_keys=[k.line for k in await asyncio.to_thread(
                self.cluster.ssh_keys.public_keys, self.user.name)],
        )
        self.node = node_name
        try:
            result = await node.start(req, self._emit)
        except NodeUnreachable as e:
            raise NodeUnreachable(f"Node {node_name} did not answer; try again soon. ({e})") from e
        self.container_id = result.container_id
        await asyncio.to_thread(cluster.drop_restart, key)
        if stopped_at is not None:
            self._emit(95, f"Moved to node {node_name}: your server was down "
                       f"{time.time() - stopped_at:.1f} s")
        return (result.ip, result.port)

    async def _refresh(self, nodes: dict[str, NodeView]) -> None:
        """Replace the heartbeat inventory of every up node by what it says now."""

        async def one(view: NodeView) -> None:
            try:
                view.info = NodeInfo.from_json(await self.cluster.client(view.name).info())
            except LabVMError as e:
                self.log.warning("node %s did not answer (%s); using its heartbeat",
                                 view.name, e)

        await asyncio.gather(*(one(v) for v in nodes.values() if v.up))

    async def poll(self):
        if self._starting:
            return None
        cluster = self.cluster
        node_name = self.node or (self.node_name if self.local_node else "")
        if not node_name:
            return 0
        try:
            node = cluster.client(node_name)
            st = await node.status(self.key)
        except (NodeUnreachable, LabVMError):
            nodes = await cluster.nodes()
            if node_name in nodes and nodes[node_name].up:
                return None  # a blip: the node heartbeats, so its servers are presumed fine
            self.log.warning("%s: node %s is down; its server counts as stopped",
                             self._log_name, node_name)
            await self._ask_restart(node_name, f"node {node_name} went down")
            return 1
        if st.state == "running":
            return None
        if st.interrupted is not None:
            self.log.warning("%s: node %s restarted while the server ran", self._log_name,
                             node_name)
            await self._ask_restart(node_name, f"node {node_name} restarted")
        # The hub calls stop() only for servers that poll as running, so a server that
        # died on its own is cleaned up here: no container, mount or GPU left held. That
        # includes a start cut short by a hub crash, before its state was saved.
        await node.stop(self.key)
        self.container_id = ""
        return st.exit_code or 0

    async def _ask_restart(self, node_name: str, reason: str) -> None:
        if self.restart_interrupted:
            await asyncio.to_thread(self.cluster.request_restart, self.key, self.user.name,
                                    self.name or "", node_name, reason,
                                    dict(self.user_options or {}))

    async def stop(self, now=False):
        node_name = self.node or (self.node_name if self.local_node else "")
        if not node_name:
            return
        # The hub calls stop() only for a server it polled as running: someone stops it on
        # purpose (its user, an admin, a migration), so no earlier ask to restart it holds.
        await asyncio.to_thread(self.cluster.drop_restart, self.key)
        try:
            result = await self.cluster.client(node_name).stop(self.key)
        except (NodeUnreachable, LabVMError) as e:
            # A dead node cannot be stopped; its root is recovered from the last sync.
            self.log.warning("%s: could not stop on node %s: %s", self._log_name, node_name, e)
            return
        finally:
            self.container_id = ""
        if not result.get("synced"):
            self.log.warning("%s: the final sync on node %s did not run", self._log_name,
                             node_name)


async def _check_user_options(spawner: LabVMSpawner, user_options: dict) -> None:
    """The hub's apply_user_options hook: refuse bad names and options with a 400."""
    nodes = await spawner.cluster.nodes()
    try:
        spawner._checked_request(spawner._gpu_models(nodes))
    except LabVMError as e:
        raise web.HTTPError(400, str(e)) from e


class SpawnRefused(web.HTTPError, LabVMError):
    """A refusal of ``start`` as JupyterHub shows one: its status, and our own message."""

    def __init__(self, error: LabVMError) -> None:
        status = error.status if 400 <= error.status < 600 else 400
        super().__init__(status, "%s", str(error))
        self.message = str(error)

    @property
    def jupyterhub_message(self) -> str:
        return self.message

    def __str__(self) -> str:
        return self.message


def _is_secret(name: str) -> bool:
    return any(w in name for w in ("TOKEN", "SECRET", "PASSWORD"))


def _start_background_sync(ops, log) -> None:  # ops: node.ops.NodeOps
    """The in-process node's background sync, on the hub's event loop."""

    async def tick() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(ops.pool, ops.sync_running)
        except Exception:
            log.exception("background sync of node %s failed", ops.config.name)

    PeriodicCallback(tick, ops.config.sync_interval_s * 1000).start()


