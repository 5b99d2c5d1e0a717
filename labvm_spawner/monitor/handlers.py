"""HTTP handlers. Every page and API needs a hub login (HubOAuth); admin ones need an
admin, user ones show only the caller's own roots. /metrics takes an admin or the
configured metrics token, never an anonymous request."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated
from tornado import web

from ..errors import LabVMError
from ..names import check_username, is_key, is_node_name, root_key
from ..node import auth
from ..node.protocol import MIN_DISK
from ..policy import parse_size
from ..ssh.keys import BadKey
from ..storage import StoreError


def refused(status: int, message: str) -> web.HTTPError:
    """An error whose message may hold user input: passed as an argument, so a '%' in it
    is never taken for a format by tornado's logging."""
    return web.HTTPError(status, "%s", message)


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    @property
    def monitor(self):  # type: ignore[no-untyped-def]
        return self.settings["monitor"]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json")
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            reason = exc.log_message % exc.args if exc.args else exc.log_message
        # "error" too: the migration API's refusals are documented as {"error": ...}.
        self.finish(json.dumps({"status": status_code, "message": reason, "error": reason}))

    def login_user(self) -> dict[str, Any]:
        user = self.current_user
        if not user:
            raise web.HTTPError(403, "log in to the hub first")
        return user

    def admin_user(self) -> dict[str, Any]:
        user = self.login_user()
        if not user.get("admin"):
            raise web.HTTPError(403, "admins only")
        return user

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise web.HTTPError(400, "body must be JSON") from e
        if not isinstance(body, dict):
            raise web.HTTPError(400, "body must be a JSON object")
        return body

    def text_field(self, body: dict[str, Any], name: str, required: bool = True) -> str:
        value = body.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise web.HTTPError(400, f"{name!r} must be a non-empty string")
        return value

    def page(self, template: str, **ns: Any) -> None:
        token = self.xsrf_token  # JupyterHub's xsrf token, which HubOAuth checks on POST
        self.render(template, prefix=self.monitor.prefix, hub_prefix=self.monitor.hub_prefix,
                    interval_s=self.monitor.interval_s,
                    xsrf=token.decode() if isinstance(token, bytes) else token, **ns)


class RootHandler(BaseHandler):
    @web.authenticated
    def get(self) -> None:
        admin = self.login_user().get("admin")
        self.redirect(self.monitor.prefix + ("admin/gpus" if admin else "me"))


class AdminPageHandler(BaseHandler):
    @web.authenticated
    def get(self, tab: str) -> None:
        user = self.admin_user()
        self.page("admin.html", tab=tab, user=user)


class UserPageHandler(BaseHandler):
    @web.authenticated
    def get(self) -> None:
        self.page("user.html", tab="me", user=self.login_user())


class AdminStateHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.admin_user()
        self.write(await self.monitor.admin_state())


class UserStateHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        user = self.login_user()
        self.write(await self.monitor.user_state(user["name"]))


class SSHKeysHandler(BaseHandler):
    """The user's own SSH keys: GET lists them (with the gateway's address, host key and
    a ready ssh config), POST {"key": "<one .pub line>"} adds one."""

    @web.authenticated
    async def get(self) -> None:
        self.write(await self.monitor.ssh_view(self.login_user()["name"]))

    @web.authenticated
    async def post(self) -> None:
        user = self.login_user()["name"]
        body = self.json_body()
        try:
            added = await asyncio.to_thread(self.monitor.cluster.ssh_keys.add, user,
                                            body.get("key"))
        except BadKey as e:
            raise refused(400, str(e)) from None
        reached = await self.monitor.push_ssh_keys(user)
        self.monitor.log.info("%s added SSH key %s", user, added["fingerprint"])
        self.set_status(201)
        self.write({**added, "servers_updated": reached})


class SSHKeyHandler(BaseHandler):
    """DELETE one of the user's own keys (another user's id is simply not found)."""

    @web.authenticated
    async def delete(self, key_id: str) -> None:
        user = self.login_user()["name"]
        if not await asyncio.to_thread(self.monitor.cluster.ssh_keys.delete, user,
                                       int(key_id)):
            raise refused(404, f"you have no SSH key {key_id}")
        reached = await self.monitor.push_ssh_keys(user)
        self.monitor.log.info("%s deleted SSH key %s", user, key_id)
        self.write({"deleted": int(key_id), "servers_updated": reached})


class HistoryHandler(BaseHandler):
    """?kind=node|gpu|user&subject=...&hours=N; users may only ask for their own roots."""

    def initialize(self, admin: bool) -> None:
        self.admin_only = admin

    @web.authenticated
    async def get(self) -> None:
        user = self.login_user()
        kind = self.get_argument("kind")
        subject = self.get_argument("subject")
        hours = float(self.get_argument("hours", "1"))
        if self.admin_only:
            self.admin_user()
        elif kind != "user" or not _owns(user["name"], subject):
            raise web.HTTPError(403, "only your own usage")
        points = self.monitor.history.series(kind, subject, time.time() - hours * 3600,
                                             self.monitor.recent_samples())
        self.write({"kind": kind, "subject": subject, "points": points})


def _owns(name: str, key: str) -> bool:
    return key == root_key(name) or key.startswith(name + ".")


class StopHandler(BaseHandler):
    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        user, server = str(body.get("user", "")), str(body.get("server", ""))
        if not user:
            raise web.HTTPError(400, "user is required")
        await self.monitor.hub.stop_server(user, server)
        self.monitor.log.info("%s stopped the server %r of %s", admin["name"], server, user)
        self.write({"stopped": True})


class DrainHandler(BaseHandler):
    """Drain flags live in the cluster's database, which the hub's placement reads."""

    @web.authenticated
    def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        node = str(body.get("node") or self.monitor.node_name)
        if not is_node_name(node):
            raise refused(400, f"invalid node name {node[:70]!r}")
        drained = bool(body.get("drained", True))
        self.monitor.cluster.set_drained(node, drained, admin["name"])
        self.monitor.log.info("%s %s node %s", admin["name"],
                              "drained" if drained else "undrained", node)
        self.write({"node": node, "drained": drained})


class MigrateHandler(BaseHandler):
    """{"user", "server"?, "node"} -> 202 {"id"}; a refusal -> 400 {"error"}."""

    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        user = self.text_field(body, "user")
        server = self.text_field(body, "server", required=False)
        node = self.text_field(body, "node")
        try:
            mid = await self.monitor.migrator.start(user, server, node, admin["name"])
        except LabVMError as e:
            raise refused(400, str(e)) from e
        self.monitor.log.info("%s started migration %d of %s to node %s", admin["name"], mid,
                              root_key(user, server), node)
        self.set_status(202)
        self.write({"id": mid})


class MigrationsHandler(BaseHandler):
    @web.authenticated
    def get(self) -> None:
        self.admin_user()
        self.write({"migrations": self.monitor.cluster.migrations()})


class MigrationHandler(BaseHandler):
    @web.authenticated
    def get(self, mid: str) -> None:
        self.admin_user()
        record = self.monitor.cluster.migration(int(mid))
        if record is None:
            raise refused(404, f"there is no migration {mid}")
        self.write(record)


class PinHandler(BaseHandler):
    """{"user", "node": name or null}: where the user's roots go when first placed."""

    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        user = self.text_field(body, "user")
        node = body.get("node")
        try:
            check_username(user)
        except LabVMError as e:
            raise refused(400, str(e)) from e
        if node is not None:
            if not isinstance(node, str):
                raise web.HTTPError(400, "'node' must be a node name or null")
            nodes = await self.monitor.cluster.nodes()
            if node not in nodes:
                known = ", ".join(sorted(nodes)) or "none"
                raise refused(400, f"there is no node {node[:70]!r} (nodes: {known})")
        self.monitor.cluster.set_pin(user, node)
        self.monitor.log.info("%s pinned %s to %s", admin["name"], user, node or "no node")
        self.write({"user": user, "node": node})


class RestoreHandler(BaseHandler):
    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        key, version = str(body.get("key", "")), body.get("version")
        if not key or not isinstance(version, int):
            raise web.HTTPError(400, "key and an integer version are required")
        new = await self.monitor.restore(key, version)
        self.monitor.log.info("%s restored %s version %d as %d", admin["name"], key, version,
                              new)
        self.write({"key": key, "restored": version, "current_version": new})


class QuotaHandler(BaseHandler):
    """{"key", "disk": "50G" | null (no quota)} -> the quota in force; a refusal -> 400/409."""

    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        key = self.text_field(body, "key")
        if not is_key(key):
            raise refused(400, f"not a server's root: {key[:80]!r}")
        if "disk" not in body:
            raise refused(400, "'disk' is required: a size such as \"50G\", or null for none")
        try:
            disk = None if body["disk"] is None else parse_size(body["disk"])
        except ValueError as e:
            raise refused(400, f"disk quota: {e}") from None
        if disk is not None and disk < MIN_DISK:
            raise refused(400, f"a disk quota must be at least {MIN_DISK >> 20} MiB")
        try:
            result = await self.monitor.set_disk_quota(key, disk, admin["name"])
        except LabVMError as e:  # below usage (409), or the node could not
            raise refused(409 if getattr(e, "status", 400) == 409 else 400, str(e)) from e
        self.monitor.log.info("%s set the disk quota of %s to %s", admin["name"], key,
                              "none" if disk is None else f"{disk >> 20} MiB")
        self.write(result)


class AsideHandler(BaseHandler):
    """{"node", "id", "action": "restore" | "delete"}: restore turns a set-aside upper
    into a new version of its root (refused while that root runs); delete removes it."""

    @web.authenticated
    async def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        node, aside_id = self.text_field(body, "node"), self.text_field(body, "id")
        action = body.get("action")
        if action not in ("restore", "delete") or not is_node_name(node):
            raise refused(400, "give a node, the id of a set-aside upper, and an action: "
                          "restore or delete")
        try:
            self.write(await self.monitor.aside(node, aside_id, action, admin["name"]))
        except (LabVMError, StoreError) as e:
            raise refused(409, str(e)) from None


class JoinTokenHandler(BaseHandler):
    """{"node", "ttl_s"?} -> a one-time join token for that node, shown only this once."""

    @web.authenticated
    def post(self) -> None:
        admin = self.admin_user()
        body = self.json_body()
        node = self.text_field(body, "node")
        ttl = body.get("ttl_s", 3600)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise web.HTTPError(400, "'ttl_s' must be a number of seconds")
        try:
            made = self.monitor.cluster.make_join_token(node, admin["name"], float(ttl))
        except LabVMError as e:
            raise refused(400, str(e)) from e
        self.monitor.log.info("%s made a join token for node %s", admin["name"], node)
        self.write(made)


class RevokeHandler(BaseHandler):
    """{"node"}: the hub stops using that node at once."""

    @web.authenticated
    def post(self) -> None:
        admin = self.admin_user()
        node = self.text_field(self.json_body(), "node")
        try:
            self.monitor.cluster.revoke(node, admin["name"])
        except LabVMError as e:
            raise refused(400, str(e)) from e
        self.monitor.log.warning("%s revoked node %s", admin["name"], node)
        self.write({"node": node, "revoked": True})


class EnrollHandler(BaseHandler):
    """A new node presents its join token and certificate, once: {"name", "url", "cert",
    "token"} -> {"node", "url", "fingerprint", "token_hash"}. No hub login: the one-time
    token is the credential. ``token_hash`` is what the node checks the hub's calls by."""

    async def post(self) -> None:
        body = self.json_body()
        fields = {k: self.text_field(body, k) for k in ("name", "url", "cert", "token")}
        cluster = self.monitor.cluster
        try:
            token_hash = auth.token_hash(cluster.node_token(fields["name"]))
            done = await asyncio.to_thread(cluster.enroll, fields["name"], fields["url"],
                                           fields["cert"], fields["token"])
        except LabVMError as e:
            self.monitor.log.warning("refused to enroll node %r from %s: %s",
                                     fields["name"][:70], self.request.remote_ip, e)
            raise refused(400, str(e)) from e
        self.monitor.log.info("enrolled node %s at %s (certificate %s)", done["node"],
                              done["url"], done["fingerprint"])
        self.write(dict(done, token_hash=token_hash))


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        token = self.monitor.metrics_token
        header = self.request.headers.get("Authorization", "")
        if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
            pass  # a Prometheus scraper with the configured token
        else:
            user = self.get_current_user()
            if not user:
                raise web.HTTPError(401, "a metrics token or an admin login is required")
            if not user.get("admin"):
                raise web.HTTPError(403, "admins only")
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.write(self.monitor.metrics())
