"""The monitor as a hub-managed JupyterHub service: one tornado app per node.

It samples the node every ``interval_s`` seconds, keeps recent samples in memory and a
downsampled history in a database, runs the idle-GPU reclaim policy, and serves the
admin pages, each user's own page and /metrics under the service's prefix. It also shows
the cluster's nodes (from their heartbeats) and runs migrations between them, through
the same database the hub places servers with.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import ioloop, web
from traitlets import Float, Int, Unicode, default
from traitlets.config import Application

from .. import db, names
from ..cluster import Cluster
from ..migration import Migrator
from ..node import asides, housekeeping
from ..node.client import NodeRefused
from ..node.secrets import write_keys
from ..ssh import clientconfig
from ..ssh import service as ssh_service
from ..storage import StoreError, open_store
from ..storage.store import LayerStore
from . import handlers, notice
from .collector import Collector, Sample
from .history import History, RecentSamples
from .hubapi import HubApi
from .metrics import exposition
from .reclaim import Decision, IdleReclaim
from .restarts import restart_interrupted
from .state import DISK_CLEAR, DISK_WARN, cluster_node_view, gpu_view, node_view, user_view

HERE = Path(__file__).resolve().parent
KEYS_CHECK_S = 60.0  # seconds between checks of SSH keys against the hub's users


class MonitorService(Application):
    name = "labvm-monitor"
    description = "LabVM monitoring: admin pages, users' own usage, /metrics, idle GPU reclaim"
    classes = [Collector, IdleReclaim]
    aliases = {"config": "MonitorService.config_file"}

    config_file = Unicode("", help="A traitlets config file (Python) to load.").tag(config=True)
    interval_s = Float(5.0, help="Seconds between samples of this node.").tag(config=True)
    recent_minutes = Float(
        30.0, help="Minutes of full-resolution samples kept in memory."
    ).tag(config=True)
    history_db_url = Unicode(
        "", help="SQLAlchemy URL of the history database; empty means sqlite:///<state_dir>/"
        "monitor.sqlite (separate from the allocations, so writes never contend)."
    ).tag(config=True)
    history_step_s = Int(60, help="Seconds averaged into one stored history point.").tag(
        config=True)
    retention_days = Float(8.0, help="Days of history kept in the database (>= 7).").tag(
        config=True)
    metrics_token = Unicode(
        help="Bearer token a Prometheus scraper sends to read /metrics (header "
        "'Authorization: Bearer <token>'). Empty: only logged-in hub admins may read it. "
        "Defaults to $LABVM_METRICS_TOKEN."
    ).tag(config=True)
    bind_url = Unicode(
        help="Where to listen; defaults to $JUPYTERHUB_SERVICE_URL (set by the hub)."
    ).tag(config=True)
    prefix = Unicode(help="URL prefix; defaults to $JUPYTERHUB_SERVICE_PREFIX.").tag(config=True)
    hub_prefix = Unicode("/hub/", help="The hub's URL prefix, for links back to it.").tag(
        config=True)
    cluster_db_url = Unicode(
        "", help="SQLAlchemy URL of LabVM's database, where placements, pins, drained nodes "
        "and migrations are kept: the hub's LabVMSpawner.db_url. Empty means Collector.db_url "
        "if set, else sqlite:///<Collector.state_dir>/labvm.sqlite (the spawner's default)."
    ).tag(config=True)
    registry_dir = Unicode(
        "", help="LabVMSpawner.registry_dir: the shared directory where node agents write "
        "their heartbeat records. Empty: no registered nodes are shown or migrated to."
    ).tag(config=True)
    node_key_file = Unicode(
        "", help="LabVMSpawner.node_key_file: the hub's node key, which a migration needs to "
        "ask the source node to sync. Empty: only evacuations of down nodes can run."
    ).tag(config=True)
    restart_max_age_h = Float(
        24.0, help="Hours after which a server its node's going down stopped is no longer "
        "started again by itself (LabVMSpawner.restart_interrupted), even if its node is "
        "still away."
    ).tag(config=True)
    migration_timeout_s = Float(
        300.0, help="Seconds a migration waits for the server to stop, or to start again."
    ).tag(config=True)

    @default("metrics_token")
    def _metrics_token_default(self) -> str:
        return os.environ.get("LABVM_METRICS_TOKEN", "")

    @default("bind_url")
    def _bind_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8089")

    @default("prefix")
    def _prefix_default(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/labvm-monitor/")

    @default("hub_prefix")
    def _hub_prefix_default(self) -> str:
        return os.environ.get("JUPYTERHUB_BASE_URL", "/").rstrip("/") + "/hub/"

    def initialize(self, argv: list[str] | None = None) -> None:
        self.parse_command_line(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
            self.parse_command_line(argv)  # the command line wins over the file
        self.collector = Collector(parent=self)
        self.reclaim = IdleReclaim(parent=self)
        url = self.history_db_url or f"sqlite:///{Path(self.collector.state_dir)}/monitor.sqlite"
        self.history = History(url, self.history_step_s, self.retention_days)
        self.recent = RecentSamples(int(self.recent_minutes * 60 / self.interval_s))
        self.hub = HubApi()
        self.cluster = Cluster(self.cluster_url, self.registry_dir, self.node_key_file,
                               local=None)
        # This service runs the migrations: any still marked running died with it.
        self.cluster.fail_interrupted()
        self.migrator = Migrator(self.cluster, self.hub, self.migration_timeout_s)
        self.warnings: dict[str, dict[str, Any]] = {}  # key -> the warning its user sees
        self.disk_warned: set[str] = set()  # keys whose disk notice is in their home
        self.remote_recent: dict[str, RecentSamples] = {}  # node -> its agent's recent ones
        self.reclaims: dict[str, IdleReclaim] = {}  # node -> its idle-GPU bookkeeping
        self.histories: dict[str, History] = {}  # node -> the writer of its history
        self._aside_sizes: dict[str, int | None] = {}
        self.reclaimed: list[dict[str, Any]] = []
        self._keys_checked = 0.0  # monotonic time of the last forget_departed_keys

    @property
    def node_name(self) -> str:
        return self.collector.node_name

    @property
    def store_root(self) -> str:
        return self.collector.store_path

    @property
    def cluster_url(self) -> str:
        return (self.cluster_db_url or self.collector.db_url
                or db.default_url(self.collector.state_dir))

    # ---- sampling ------------------------------------------------------------

    async def tick(self) -> None:
        try:
            sample = await asyncio.to_thread(self.collector.sample)
        except Exception:
            self.log.exception("sampling failed")
            return
        self.recent.add(sample)
        await asyncio.to_thread(self.history.add, sample)
        await self.act_on(sample)
        if self.cluster.enrolled():
            for s in await self.sample_nodes():
                await asyncio.to_thread(self._history_of(s.node).add, s)
                await self.act_on(s)
        try:
            await restart_interrupted(self.cluster, self.hub, self.restart_max_age_h * 3600,
                                      log=self.log)
        except Exception:
            self.log.exception("restarting interrupted servers failed")
        if time.monotonic() - self._keys_checked > KEYS_CHECK_S:
            self._keys_checked = time.monotonic()
            try:
                await self.forget_departed_keys()
            except Exception:
                self.log.exception("checking SSH keys against the hub's users failed")

    async def forget_departed_keys(self) -> None:
        """A deleted user's SSH keys go with them: a new account of the same name must not
        let the old one's keys in."""
        users = {u["name"]: u.get("created") for u in await self.hub.users()}
        for user, fingerprint in await asyncio.to_thread(self.cluster.ssh_keys.forget_departed,
                                                         users):
            self.log.warning("deleted SSH key %s of %s: the hub no longer has that account",
                             fingerprint, user)

    def _history_of(self, node: str) -> History:
        # One writer per node: a History averages one node's samples per step.
        if node not in self.histories:
            self.histories[node] = History(self.history.engine.url.render_as_string(False),
                                           self.history_step_s, self.retention_days)
        return self.histories[node]

    async def act_on(self, sample: Sample) -> None:
        """Idle reclaim and disk warnings for the servers of the node ``sample`` is of."""
        if sample.node not in self.reclaims:
            self.reclaims[sample.node] = (self.reclaim if sample.node == self.node_name
                                          else IdleReclaim(parent=self))
        for d in self.reclaims[sample.node].decide(sample):
            await self.carry_out(d, sample.node)
        await self.disk_notices(sample)

    async def put_notice(self, node: str, key: str, name: str, text: str | None) -> bool:
        """Write (or, with None, remove) a notice file in the home of ``key``'s user, on
        this service's node directly, on another through its agent."""
        if node == self.node_name:
            if text is None:
                await asyncio.to_thread(notice.drop, self.collector.docker, key, node, name)
                return True
            return await asyncio.to_thread(notice.put, self.collector.docker, key, node,
                                           name, text)
        try:
            return bool((await self.cluster.client(node).notice(key, name, text)).get("done"))
        except Exception:
            self.log.exception("could not leave %s for %s on node %s", name, key, node)
            return False

    async def disk_notices(self, sample: Sample) -> None:
        """A notice in the user's home at 90% of their disk quota, gone again under 85%."""
        running = {c.key for c in sample.containers}
        for key, (used, limit) in sample.disk.items():
            if key not in running:
                self.disk_warned.discard(key)
            elif limit and used >= DISK_WARN * limit and key not in self.disk_warned:
                self.log.info("warning %s: disk %d%% of its quota", key, 100 * used // limit)
                if await self.put_notice(sample.node, key, notice.DISK_NOTICE_NAME,
                                         notice.disk_text(used, limit)):
                    self.disk_warned.add(key)
            elif key in self.disk_warned and (not limit or used < DISK_CLEAR * limit):
                await self.put_notice(sample.node, key, notice.DISK_NOTICE_NAME, None)
                self.disk_warned.discard(key)

    async def carry_out(self, d: Decision, node: str | None = None) -> None:
        node = node or self.node_name
        if d.action == "warn":
            self.warnings[d.key] = {"idle_since": d.idle_since, "stop_at": d.stop_at}
            self.log.info("warning %s on node %s: idle GPUs, stop at %s", d.key, node,
                          time.ctime(d.stop_at))
            await self.put_notice(node, d.key, notice.NOTICE_NAME,
                                  notice.text(d.idle_since, d.stop_at))
        elif d.action == "clear":
            self.warnings.pop(d.key, None)
            await self.put_notice(node, d.key, notice.NOTICE_NAME, None)
        elif d.action == "stop":
            self.log.warning("reclaiming the idle GPUs of %s: stopping its server", d.key)
            try:
                await self.hub.stop_server(d.user, d.server)
            except Exception:
                self.log.exception("could not stop %s", d.key)
                return
            self.warnings.pop(d.key, None)
            self.reclaimed.append({"key": d.key, "t": time.time()})

    def latest(self) -> Sample | None:
        return self.recent.latest()

    @property
    def remote(self) -> dict[str, Sample]:
        """node -> its agent's latest sample."""
        return {n: r.samples[-1] for n, r in self.remote_recent.items() if r.samples}

    def recent_samples(self) -> list[Sample]:
        """The samples in memory of every node: this service's own and each agent's."""
        return [*self.recent, *(s for r in self.remote_recent.values() for s in r)]

    def all_latest(self) -> list[Sample]:
        """The latest sample of every node: this service's own, then each agent's."""
        own = self.latest()
        return ([own] if own else []) + [self.remote[n] for n in sorted(self.remote)]

    def merged(self) -> Sample | None:
        """Every node's latest containers, GPUs and disks in one sample (this node's host
        figures): what the users' views look a root up in, wherever it runs."""
        samples = self.all_latest()
        if not samples:
            return None
        own = samples[0]
        disk: dict[str, tuple[int, int]] = {}
        for s in samples:
            disk.update(s.disk)
        return Sample(t=own.t, node=own.node, host=own.host,
                      gpus=[g for s in samples for g in s.gpus],
                      containers=[c for s in samples for c in s.containers], disk=disk)

    def metrics(self) -> bytes:
        return exposition(self.all_latest)

    async def sample_nodes(self) -> list[Sample]:
        """Pull each up node's own sample over its authenticated agent channel; the new
        ones. A node that does not answer keeps its last sample (the pages show how old
        it is)."""
        nodes = await self.cluster.nodes()
        fresh: list[Sample] = []

        async def one(name: str) -> None:
            try:
                data = await asyncio.wait_for(self.cluster.client(name).sample(), 10)
                sample = Sample.from_dict(data)
                self.remote_recent.setdefault(
                    name, RecentSamples(self.recent.samples.maxlen or 1)).add(sample)
                fresh.append(sample)
            except Exception as e:  # a report, not a crash (a timeout too)
                self.log.debug("node %s gave no sample: %s", name, e)

        await asyncio.gather(*(one(n) for n, v in nodes.items()
                               if v.up and not v.local and n != self.node_name))
        return fresh

    # ---- views ---------------------------------------------------------------

    async def admin_state(self) -> dict[str, Any]:
        sample = self.latest()
        users = await self.hub.users()
        cluster = self.cluster
        nodes = await cluster.nodes()
        placements = cluster.placements()
        root = await self.answering_store()
        merged = self.merged()
        views = await asyncio.to_thread(lambda: [
            user_view(u, merged, root, self.warnings, placements) for u in users])
        return {
            # "nodes" is this service's own, sampled node; "cluster_nodes" every
            # registered one, from its heartbeat.
            "nodes": [dict(node_view(sample, self.node_name, self.node_name in cluster.drained()),
                           housekeeping=housekeeping.load(Path(self.collector.state_dir)),
                           up=True)] + [
                dict(node_view(s, name, name in cluster.drained()),
                     up=bool(nodes.get(name) and nodes[name].up))
                for name, s in sorted(self.remote.items())],
            "cluster_nodes": [cluster_node_view(nodes[n]) for n in sorted(nodes)],
            "enrolled_nodes": [{k: v for k, v in n.items() if k != "cert_pem"}
                               for n in cluster.enrolled(revoked=True).values()],
            "node_warnings": cluster.warnings,
            "placements": placements,
            "pins": cluster.pins(),
            "migrations": cluster.migrations(),
            "gpus": [dict(g, node=s.node) for s in self.all_latest() for g in gpu_view(s)],
            "users": views,
            "reclaim": {"idle_hours": self.reclaim.idle_hours,
                        "warn_hours": self.reclaim.warn_hours, "reclaimed": self.reclaimed},
            "restore_supported": root is not None,
            "asides": await self.asides(nodes),
        }

    async def asides(self, nodes: dict[str, Any]) -> list[dict[str, Any]]:
        """Set-aside uppers on every node: this service's own, read here; the others',
        from their heartbeats."""
        found = await asyncio.to_thread(asides.listing, Path(self.collector.state_dir),
                                        self.node_name, self._aside_sizes)
        for name, view in sorted(nodes.items()):
            if name != self.node_name:
                found += [dict(a, node=name) for a in view.info.asides]
        return found

    async def aside(self, node: str, aside_id: str, action: str, by: str) -> dict[str, Any]:
        """An admin restores (as a new version) or deletes a set-aside upper."""
        if node == self.node_name:
            state = Path(self.collector.state_dir)
            if action == "restore":
                store = await self.require_store()
                result = {"id": aside_id, "version": await asyncio.to_thread(
                    asides.restore, state, store, aside_id)}
            else:
                result = {"id": aside_id, "key": await asyncio.to_thread(
                    asides.delete, state, aside_id)}
        else:
            result = await self.cluster.client(node).aside(aside_id, action)
        self.log.info("%s: %s of set-aside upper %s on node %s", by, action, aside_id, node)
        return result

    async def user_state(self, name: str) -> dict[str, Any]:
        users = {u["name"]: u for u in await self.hub.users()}
        user = users.get(name, {"name": name})
        root, merged, placements = await self.answering_store(), self.merged(), \
            self.cluster.placements()
        return await asyncio.to_thread(user_view, user, merged, root, self.warnings, placements)

    async def answering_store(self) -> str | None:
        """The layer store's root, or None while it does not answer (never wait on it)."""
        state = await asyncio.to_thread(self.collector.store_state)
        return self.store_root if state.reachable else None

    async def require_store(self) -> LayerStore:
        root = await self.answering_store()
        if root is None:
            raise web.HTTPError(503, "the layer store does not answer; nothing was changed. "
                                "Try again once it is back")
        return open_store(root)

    async def restore(self, key: str, version: int) -> int:
        store = await self.require_store()
        sample = self.latest()
        if sample and any(c.key == key for c in sample.containers):
            raise web.HTTPError(409, f"stop the server of {key} before restoring its root")
        if version not in store.versions(key):
            raise web.HTTPError(404, f"{key} has no version {version}")
        try:
            return await asyncio.to_thread(store.restore, key, version)
        except StoreError as e:  # running on a node (its lease): nothing changed
            raise web.HTTPError(409, "%s", str(e)) from None

    async def set_disk_quota(self, key: str, disk_bytes: int | None, by: str) -> dict[str, Any]:
        """An admin's disk quota for ``key``: applied live where its upper is, then kept
        for its next starts. Below what it uses: refused, and nothing changes."""
        node = self.cluster.placement(key) or self.node_name
        applied: dict[str, Any] | None = None
        if node == self.node_name:  # this service's own node: its uppers are right here
            quotas = self.collector.quotas
            if await asyncio.to_thread(quotas.usage, key) is not None:
                u = await asyncio.to_thread(quotas.change, key, disk_bytes)
                applied = {"used_bytes": u.used_bytes, "limit_bytes": u.limit_bytes}
        else:
            try:
                applied = await self.cluster.client(node).set_quota(key, disk_bytes)
            except NodeRefused as e:
                if "has no disk quota on this node" not in str(e):
                    raise
        self.cluster.set_disk_quota(key, disk_bytes, by)
        return {"key": key, "node": node, "disk_bytes": disk_bytes, "applied": applied}

    # ---- SSH keys ------------------------------------------------------------

    async def ssh_view(self, user: str) -> dict[str, Any]:
        """The user's keys, the gateway's address and host key, and their ssh config."""
        keys = await asyncio.to_thread(self.cluster.ssh_keys.keys, user)
        gw = ssh_service.info(self.collector.state_dir)
        view: dict[str, Any] = {"keys": keys, "gateway": None}
        if gw:
            model = await self.hub.user(user) or {}
            servers = [s for s in (model.get("servers") or {}) if s]
            pub = " ".join(gw.get("public_key") or [])
            view["gateway"] = {
                "host": gw["host"], "port": gw["port"], "fingerprint": gw["fingerprint"],
                "known_hosts": clientconfig.known_hosts_line(gw["host"], gw["port"], pub),
                "config": clientconfig.ssh_config(user, gw["host"], gw["port"], servers),
            }
        return view

    async def push_ssh_keys(self, user: str) -> int:
        """Give the user's running servers their current keys; how many got them."""
        lines = [k.line for k in await asyncio.to_thread(self.cluster.ssh_keys.public_keys,
                                                         user)]
        model = await self.hub.user(user) or {}
        done = 0
        for server, srv in (model.get("servers") or {}).items():
            if not srv.get("ready"):
                continue
            key = names.root_key(user, server)
            node = self.cluster.placement(key) or self.node_name
            try:
                if node == self.node_name:
                    done += await asyncio.to_thread(self._local_keys, key, lines)
                else:
                    done += bool((await self.cluster.client(node).set_ssh_keys(key, lines))
                                 .get("running"))
            except Exception:
                self.log.exception("could not give %s its new SSH keys", key)
        return done

    def _local_keys(self, key: str, lines: list[str]) -> bool:
        # This service's own node: the secrets directory is the container's bind mount.
        c = notice.running_container(self.collector.docker, key, self.node_name)
        for m in (c.attrs.get("Mounts") or []) if c is not None else []:
            if m.get("Destination") == "/.labvm/secrets" and m.get("Type") == "bind":
                write_keys(Path(m["Source"]), lines)
                return True
        return False

    # ---- the web app ---------------------------------------------------------

    def make_app(self) -> web.Application:
        p = self.prefix
        H = handlers
        routes = [
            (p, H.RootHandler),
            (p + r"admin/(nodes|gpus|users)", H.AdminPageHandler),
            (p + "me", H.UserPageHandler),
            (p + "api/admin/state", H.AdminStateHandler),
            (p + "api/admin/history", H.HistoryHandler, {"admin": True}),
            (p + "api/admin/stop", H.StopHandler),
            (p + "api/admin/drain", H.DrainHandler),
            (p + "api/admin/restore", H.RestoreHandler),
            (p + "api/admin/quota", H.QuotaHandler),
            (p + "api/admin/aside", H.AsideHandler),
            (p + "api/admin/migrate", H.MigrateHandler),
            (p + "api/admin/migrations", H.MigrationsHandler),
            (p + r"api/admin/migrations/(\d+)", H.MigrationHandler),
            (p + "api/admin/pin", H.PinHandler),
            (p + "api/admin/nodes/join-token", H.JoinTokenHandler),
            (p + "api/admin/nodes/revoke", H.RevokeHandler),
            (p + "api/nodes/enroll", H.EnrollHandler),
            (p + "api/me", H.UserStateHandler),
            (p + "api/me/history", H.HistoryHandler, {"admin": False}),
            (p + "api/me/ssh", H.SSHKeysHandler),
            (p + r"api/me/ssh/keys/(\d+)", H.SSHKeyHandler),
            (p + "metrics", H.MetricsHandler),
            (p + "oauth_callback", HubOAuthCallbackHandler),
        ]
        return web.Application(
            routes,
            monitor=self,
            template_path=str(HERE / "templates"),
            static_path=str(HERE / "static"),
            static_url_prefix=url_path_join(p, "static/"),
            cookie_secret=secrets.token_bytes(32),
            # No tornado-wide xsrf check: it would run before token auth and refuse API
            # clients. HubOAuth itself accepts the login cookie on a POST (or a fetch)
            # only with a valid xsrf token, which is the protection that matters.
        )

    async def serve(self) -> None:
        app = self.make_app()
        url = urlparse(self.bind_url)
        app.listen(url.port or 80, url.hostname or "127.0.0.1")
        self.log.info("LabVM monitor on %s%s (node %s)", self.bind_url, self.prefix,
                      self.node_name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.tick()
        timer = ioloop.PeriodicCallback(self.tick, self.interval_s * 1000)
        timer.start()
        await stop.wait()
        timer.stop()
        self.history.close()
        self.cluster.close()
        self.collector.close()

    def start(self) -> None:
        asyncio.run(self.serve())


def hub_service(name: str = "labvm-monitor", port: int = 8089,
                args: list[str] | None = None, command: list[str] | None = None,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The entry for c.JupyterHub.services and the roles for c.JupyterHub.load_roles.

    ``args`` are the service's traitlets options (e.g. ``--Collector.node_name=n1``),
    appended to ``command`` (default: this Python running ``-m labvm_spawner.monitor``).
    The service's role lets it list users and their servers and stop servers, nothing
    more. The default ``user`` role gains access to this one service (JupyterHub grants
    none by default), so every user can open their own page; it stays "self" otherwise.
    """
    service = {
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "command": (command or [sys.executable, "-m", "labvm_spawner.monitor"]) + list(args or []),
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "LabVM: nodes, GPUs, users and your own usage"},
    }
    roles = [
        {"name": f"{name}-service", "services": [name],
         "scopes": ["list:users", "read:users", "read:servers", "admin:servers"]},
        {"name": "user", "scopes": ["self", f"access:services!service={name}"]},
    ]
    return service, roles


def main(argv: list[str] | None = None) -> None:
    app = MonitorService.instance()
    app.initialize(argv)
    app.start()
