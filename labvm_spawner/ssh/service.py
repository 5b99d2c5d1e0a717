"""``labvm-ssh``: the SSH gateway as a hub-managed service (see ``gateway``).

It finds a user's servers through the hub's REST API (with the service's own token),
where each root runs from LabVM's database, and reaches the container's sshd on its
own node directly and on other nodes through their agents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import asyncssh
import docker
import uvloop
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Bool, Float, Int, Unicode, default
from traitlets.config import Application

from .. import db, names
from ..cluster import Cluster
from ..monitor.hubapi import HubApi
from ..monitor.notice import running_container
from . import hostkey
from .gateway import AuditLog, Gateway, Refused, Route, Stopped
from .throttle import Throttle

INFO_FILE = "gateway.json"  # what the user's page shows: address and host key fingerprint


class SSHService(Application):
    name = "labvm-ssh"
    description = "LabVM's SSH gateway: users reach their own containers' sshd through it."

    config_file = Unicode("", help="A traitlets config file (Python) to load.").tag(config=True)
    ip = Unicode("0.0.0.0", help="The address the gateway listens on.").tag(config=True)
    port = Int(2222, help="The port the gateway listens on.").tag(config=True)
    public_host = Unicode(
        help="The host name users put in their ssh config (shown on their page); "
        "defaults to the host of the hub's public URL, else this machine's name.",
    ).tag(config=True)
    public_hub_url = Unicode(
        help="The hub's address, in the message for a server that is not running; "
        "defaults to $JUPYTERHUB_PUBLIC_HUB_URL.",
    ).tag(config=True)
    state_dir = Unicode(
        os.environ.get("LABVM_STATE_DIR", "/var/lib/labvm"),
        help="LabVM's state directory; the host key and the audit log go in its ssh/.",
    ).tag(config=True)
    db_url = Unicode(
        help="LabVM's database (users' keys, placements); default "
        "sqlite:///<state_dir>/labvm.sqlite, as the spawner's.",
    ).tag(config=True)
    registry_dir = Unicode("", help="As LabVMSpawner.registry_dir (for other nodes).").tag(
        config=True)
    node_key_file = Unicode("", help="As LabVMSpawner.node_key_file (to reach nodes' "
                            "agents).").tag(config=True)
    local_node = Unicode(
        "local", help="The hub's own node (LabVMSpawner.node_name), whose containers the "
        "gateway reaches on their bridge; empty when the hub runs no node.",
    ).tag(config=True)
    docker_url = Unicode("", help="The local node's Docker engine; empty: the default.").tag(
        config=True)
    token_passwords = Bool(
        False, help="Accept a hub API token of the user as a password (off: keys only).",
    ).tag(config=True)
    start_on_connect = Bool(
        False, help="A jump to a stopped server starts it (and waits) instead of refusing.",
    ).tag(config=True)
    start_timeout_s = Float(300, help="How long a start from the gateway may take.").tag(
        config=True)
    max_failures_per_source = Int(10, help="Failed logins from one address within "
                                  "failure_window_s before it is refused.").tag(config=True)
    max_failures_per_user = Int(20, help="Failed logins as one user within "
                                "failure_window_s before that user is refused.").tag(config=True)
    failure_window_s = Float(300, help="The window of the failed-login limits.").tag(
        config=True)

    @default("public_hub_url")
    def _hub_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL", "") or "the hub's web page"

    @default("public_host")
    def _public_host_default(self) -> str:
        url = os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL", "")
        if "//" in url:
            return url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        return os.uname().nodename

    def initialize(self, argv: list[str] | None = None) -> None:
        self.parse_command_line(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
            self.parse_command_line(argv)
        logging.basicConfig(level=logging.INFO, format="[labvm-ssh %(levelname)s] %(message)s")
        url = self.db_url or db.default_url(self.state_dir)
        self.cluster = Cluster(url, self.registry_dir, self.node_key_file, local=None)
        self.keys = self.cluster.ssh_keys
        self.hub = HubApi()
        self._docker: docker.DockerClient | None = None
        self.ssh_dir = Path(self.state_dir) / "ssh"
        self.audit = AuditLog(self.ssh_dir / "audit.log")
        self.gateway = Gateway(
            self.keys, self.locate, self.audit,
            Throttle(self.max_failures_per_source, self.max_failures_per_user,
                     self.failure_window_s),
            self.public_hub_url, check_token=self.check_token if self.token_passwords
            else None, start=self.start_server, start_on_connect=self.start_on_connect,
            public_host=self.public_host, port=self.port)

    # ---- where a server is -------------------------------------------------------------

    async def locate(self, user: str, server: str) -> Route:
        label = f"server {server!r}" if server else "your default server"
        model = await self.hub.user(user)
        if model is None:
            raise Refused(f"{user} has no account on this hub")
        srv = (model.get("servers") or {}).get(server)
        if srv is None and server:
            raise Refused(f"you have no server named {server!r}")
        if srv is None or not srv.get("ready"):
            if srv is not None and srv.get("pending") == "spawn":
                raise Stopped(f"LabVM: {label} is still starting; try again in a moment "
                              f"(progress: {self.public_hub_url})")
            raise Stopped(f"LabVM: {label} is not running. Start it at {self.public_hub_url} "
                          f"or with: ssh -p {self.port} {user}@{self.public_host} start"
                          + (f" {server}" if server else ""))
        key = names.root_key(user, server)
        node = self.cluster.placement(key) or self.local_node
        if not node:
            raise Refused(f"LabVM: {label} has no node on record; ask your admin")
        if node == self.local_node:
            ip = await asyncio.to_thread(self._local_ip, key)
            return Route(key, node, ip=ip)
        client = self.cluster.client(node)
        return Route(key, node, tunnel=lambda: client.ssh_tunnel(key))

    def _local_ip(self, key: str) -> str:
        if self._docker is None:
            self._docker = (docker.DockerClient(base_url=self.docker_url) if self.docker_url
                            else docker.from_env())
        c = running_container(self._docker, key, self.local_node)
        for net in ((c.attrs["NetworkSettings"].get("Networks") or {}).values()
                    if c is not None else []):
            if net.get("IPAddress"):
                return net["IPAddress"]
        raise Stopped(f"LabVM: the container of {key} is not running on node "
                      f"{self.local_node}")

    # ---- the hub ---------------------------------------------------------------------

    async def check_token(self, user: str, token: str) -> bool:
        """Whether ``token`` is a hub API token that belongs to ``user``."""
        if not token or len(token) > 200:
            return False
        req = HTTPRequest(self.hub.api_url + "/user",
                          headers={"Authorization": f"token {token}"}, request_timeout=20)
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except (HTTPClientError, OSError):
            return False
        model = json.loads(resp.body)
        return model.get("kind") == "user" and model.get("name") == user

    async def start_server(self, user: str, server: str, say) -> None:  # type: ignore[no-untyped-def]
        try:
            await self.hub.start_server(user, server)
        except HTTPClientError as e:
            body = e.response.body if e.response is not None else b""
            try:
                msg = json.loads(body).get("message") or str(e)
            except ValueError:
                msg = str(e)
            if "already running" not in msg and "pending" not in msg:
                raise Refused(f"LabVM: the start was refused: {msg}") from None
        last = None

        async def follow() -> None:
            nonlocal last
            async for event in self.hub.progress(user, server):
                msg = event.get("message") or ""
                if msg and msg != last:
                    say(f"[{event.get('progress', '')}%] {msg}")
                    last = msg
                if event.get("failed"):
                    raise Refused(f"LabVM: the start failed: {msg}")
                if event.get("ready"):
                    return

        try:
            await asyncio.wait_for(follow(), self.start_timeout_s)
        except TimeoutError:
            raise Refused(f"LabVM: the server did not start in {self.start_timeout_s:.0f} s; "
                          f"see {self.public_hub_url}") from None
        for _ in range(50):  # the hub marks it ready just after the last event
            model = await self.hub.user(user)
            if ((model or {}).get("servers") or {}).get(server, {}).get("ready"):
                return
            await asyncio.sleep(0.2)

    # ---- running -------------------------------------------------------------------

    def write_info(self, key: asyncssh.SSHKey) -> None:
        info = {"host": self.public_host, "port": self.port,
                "fingerprint": key.get_fingerprint("sha256"),
                "public_key": key.export_public_key().decode().split()[:2]}
        tmp = self.ssh_dir / f".{INFO_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.ssh_dir / INFO_FILE)

    async def run(self) -> None:
        key = hostkey.load_or_make(self.ssh_dir / "ssh_host_ed25519_key")
        fp = key.get_fingerprint("sha256")
        self.write_info(key)
        server = await self.gateway.listen(self.ip, self.port, key)
        logging.getLogger("labvm.ssh").info("listening on %s:%d, host key %s", self.ip,
                                            self.port, fp)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        self.audit.close()

    def start(self) -> None:
        # uvloop's C transports: the relay spends about a fifth less CPU per GiB.
        uvloop.run(self.run())


def info(state_dir: str | Path) -> dict[str, Any] | None:
    """What the gateway published about itself ({host, port, fingerprint}), if it runs."""
    try:
        return json.loads((Path(state_dir) / "ssh" / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def hub_service(name: str = "labvm-ssh", args: list[str] | None = None,
                command: list[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The entry for c.JupyterHub.services and its role for c.JupyterHub.load_roles. The
    role reads users and their servers and starts servers (for ``start``), nothing more."""
    service = {
        "name": name,
        "command": (command or [sys.executable, "-m", "labvm_spawner.ssh"]) + list(args or []),
    }
    roles = [{"name": f"{name}-service", "services": [name],
              "scopes": ["read:users", "read:servers", "servers"]}]
    return service, roles


def main(argv: list[str] | None = None) -> None:
    app = SSHService.instance()
    app.initialize(argv)
    app.start()


__all__ = ["SSHService", "hub_service", "info", "main"]
