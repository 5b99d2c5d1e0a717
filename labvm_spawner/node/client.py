"""How the hub reaches a node: in-process (the one-node default) or over HTTPS.

Both kinds expose the same coroutines, and both end in the same ``NodeOps`` methods.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, TypeVar

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ..errors import LabVMError
from .auth import pinned_context
from .protocol import Emit, StartRequest, StartResult, Status

if TYPE_CHECKING:
    from .ops import NodeOps


T = TypeVar("T")


class NodeUnreachable(LabVMError):
    """The node's agent did not answer."""

    status = 503


class NodeRefused(LabVMError):
    """The node's agent answered with an error (its message is ours to show)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LocalNode:
    """The node inside the hub process."""

    remote = False

    def __init__(self, ops: NodeOps) -> None:
        self.ops = ops
        self.name = ops.config.name

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        # The node's own pool: starts waiting for Jupyter never starve the hub's other
        # threaded calls, nor each other.
        return await asyncio.get_running_loop().run_in_executor(self.ops.pool, fn, *args)

    async def info(self) -> dict:
        return await self._run(self.ops.info)

    async def start(self, req: StartRequest, emit: Emit | None = None) -> StartResult:
        return StartResult.from_json(await self._run(self.ops.start, req, emit))

    async def status(self, key: str) -> Status:
        return Status.from_json(await self._run(self.ops.status, key))

    async def stop(self, key: str) -> dict:
        return await self._run(self.ops.stop, key)

    async def sync(self, key: str) -> dict:
        return await self._run(self.ops.sync, key)

    async def discard(self, key: str) -> dict:
        return await self._run(self.ops.discard, key)

    async def set_quota(self, key: str, disk_bytes: int | None) -> dict:
        return await self._run(self.ops.set_quota, key, disk_bytes)

    async def set_ssh_keys(self, key: str, ssh_keys: list[str]) -> dict:
        return await self._run(self.ops.set_ssh_keys, key, ssh_keys)

    async def aside(self, aside_id: str, action: str) -> dict:
        fn = self.ops.restore_aside if action == "restore" else self.ops.delete_aside
        return await self._run(fn, aside_id)


class RemoteNode:
    """A node's ``labvm-node`` agent, over TLS with its pinned certificate."""

    remote = True

    def __init__(self, name: str, url: str, token: str, cert_pem: str,
                 timeout_s: float = 300) -> None:
        if not url.startswith("https://"):
            # The token must never travel in clear, and never to a certificate we did not pin.
            raise LabVMError(f"node {name}: refusing a URL that is not HTTPS ({url[:100]!r})")
        self.name = name
        self.url = url.rstrip("/")
        self._token = token
        self._ssl = pinned_context(cert_pem)
        self.timeout_s = timeout_s

    async def _call(self, method: str, path: str, body: dict | None = None,
                    timeout_s: float | None = None) -> dict:
        req = HTTPRequest(
            f"{self.url}{path}", method=method,
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (None if method == "GET" else "{}"),
            ssl_options=self._ssl, connect_timeout=5,
            request_timeout=timeout_s or self.timeout_s,
        )
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as e:
            if e.code == 599 or e.response is None:
                raise NodeUnreachable(f"node {self.name} did not answer ({e})") from e
            try:
                msg = json.loads(e.response.body).get("error") or str(e)
            except ValueError:
                msg = str(e)
            raise NodeRefused(f"node {self.name}: {msg}", e.code) from e
        except OSError as e:
            raise NodeUnreachable(f"node {self.name} did not answer ({e})") from e
        return json.loads(resp.body)

    async def info(self) -> dict:
        return await self._call("GET", "/v1/info", timeout_s=20)

    async def notice(self, key: str, name: str, text: str | None) -> dict:
        """Leave (or remove) one of the admin service's notices in the user's home."""
        return await self._call("POST", f"/v1/servers/{key}/notice",
                                {"name": name, "text": text}, timeout_s=30)

    async def sample(self) -> dict:
        """The node's usage now: GPUs with their processes' users, containers, the node."""
        return await self._call("GET", "/v1/sample", timeout_s=10)

    async def start(self, req: StartRequest, emit: Emit | None = None) -> StartResult:
        if emit:
            emit(40, f"Starting on node {self.name}")
        return StartResult.from_json(await self._call(
            "POST", f"/v1/servers/{req.key}/start", asdict(req), timeout_s=req.timeout_s + 600))

    async def status(self, key: str) -> Status:
        return Status.from_json(await self._call("GET", f"/v1/servers/{key}", timeout_s=20))

    async def stop(self, key: str) -> dict:
        return await self._call("POST", f"/v1/servers/{key}/stop")

    async def sync(self, key: str) -> dict:
        return await self._call("POST", f"/v1/servers/{key}/sync")

    async def discard(self, key: str) -> dict:
        return await self._call("POST", f"/v1/servers/{key}/discard")

    async def set_quota(self, key: str, disk_bytes: int | None) -> dict:
        return await self._call("POST", f"/v1/servers/{key}/quota", {"disk_bytes": disk_bytes})

    async def set_ssh_keys(self, key: str, ssh_keys: list[str]) -> dict:
        return await self._call("POST", f"/v1/servers/{key}/ssh-keys", {"keys": ssh_keys},
                                timeout_s=20)

    async def aside(self, aside_id: str, action: str) -> dict:
        """Restore (as a new version) or delete a set-aside upper on this node."""
        return await self._call("POST", f"/v1/asides/{aside_id}/{action}", {},
                                timeout_s=3600)

    async def ssh_tunnel(self, key: str) -> WebSocketClientConnection:
        """A websocket carrying a byte stream to the sshd of ``key``'s container."""
        req = HTTPRequest(
            "wss://" + self.url.split("://", 1)[1] + f"/v1/servers/{key}/ssh",
            headers={"Authorization": f"Bearer {self._token}"},
            ssl_options=self._ssl, connect_timeout=5, request_timeout=20)
        try:
            return await websocket_connect(req, max_message_size=1 << 24)
        except HTTPClientError as e:
            try:
                msg = json.loads(e.response.body).get("error") if e.response else None
            except ValueError:
                msg = None
            raise NodeRefused(f"node {self.name}: {msg or e}", e.code) from e
        except OSError as e:
            raise NodeUnreachable(f"node {self.name} did not answer ({e})") from e


Node = LocalNode | RemoteNode
__all__ = ["LocalNode", "RemoteNode", "Node", "NodeUnreachable", "NodeRefused"]
