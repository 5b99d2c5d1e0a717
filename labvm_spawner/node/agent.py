"""The node agent: ``NodeOps`` served over HTTPS to the hub (``labvm-node serve``, whose
command line is ``cli/node.py``).

Every request needs ``Authorization: Bearer <token>``; the agent knows only the
token's SHA-256. A request without it gets 401 and changes nothing. Besides
serving requests the agent writes its heartbeat record (``registry``) and syncs
every running server's upper to the layer store in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tornado import web, websocket

from .. import names
from ..errors import LabVMError
from ..ssh.keys import check_lines
from ..storage import StoreError
from . import auth, registry
from .allocations import GpuUnavailable
from .ops import NodeOps
from .protocol import MIN_DISK, SSHD_PORT, StartRequest
from .quota import QuotaError

log = logging.getLogger("labvm.node")
KEY = f"({names.KEY})"


class _Handler(web.RequestHandler):
    def initialize(self, ops: NodeOps, token_hash: str, pool: ThreadPoolExecutor) -> None:
        self.ops = ops
        self.token_hash = token_hash
        self.pool = pool

    def prepare(self) -> None:
        if not auth.bearer_ok(self.request.headers.get("Authorization"), self.token_hash):
            raise web.HTTPError(401)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        msg = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else None
        self.finish({"error": msg or self._reason})

    def json_body(self) -> dict:
        """The request's body, which must be one JSON object."""
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return body

    async def call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.pool, fn, *args)
        except (GpuUnavailable, QuotaError, StoreError) as e:
            raise web.HTTPError(409, str(e)) from e
        except LabVMError as e:
            raise web.HTTPError(400, str(e)) from e
        self.finish(result)


class InfoHandler(_Handler):
    async def get(self) -> None:
        await self.call(self.ops.info)


class SampleHandler(_Handler):
    async def get(self) -> None:
        await self.call(self.ops.sample)


class ServerHandler(_Handler):
    async def get(self, key: str) -> None:
        await self.call(self.ops.status, key)


class ActionHandler(_Handler):
    async def post(self, key: str, action: str) -> None:
        if action == "start":
            body = self.json_body()
            if body.get("key") != key:
                raise web.HTTPError(400, "the body must be a start request for this key")
            try:
                req = StartRequest.from_json(body)
            except LabVMError as e:
                raise web.HTTPError(400, str(e)) from e
            await self.call(self.ops.start, req)
        elif action == "ssh-keys":
            body = self.json_body()
            try:
                if set(body) != {"keys"}:
                    raise LabVMError("the body must be {\"keys\": [key lines]}")
                keys = check_lines(body["keys"])
            except LabVMError as e:
                raise web.HTTPError(400, str(e)) from None
            await self.call(self.ops.set_ssh_keys, key, keys)
        elif action == "notice":
            body = self.json_body()
            text = body.get("text")
            if set(body) != {"name", "text"} or not isinstance(body["name"], str) or not (
                    text is None or (isinstance(text, str) and len(text) <= 8192)):
                raise web.HTTPError(400, 'the body must be {"name": ..., "text": str or null}')
            await self.call(self.ops.notice, key, body["name"], text)
        elif action == "quota":
            body = self.json_body()
            disk = body.get("disk_bytes")
            if set(body) != {"disk_bytes"} or not (
                    disk is None or (type(disk) is int and MIN_DISK <= disk <= 1 << 60)):
                raise web.HTTPError(400, "the body must be {\"disk_bytes\": bytes (at least "
                                    f"{MIN_DISK >> 20} MiB) or null}}")
            await self.call(self.ops.set_quota, key, disk)
        else:
            await self.call(getattr(self.ops, action), key)


class AsideHandler(_Handler):
    """POST /v1/asides/<id>/(restore|delete): an admin's decision on a set-aside upper."""

    async def post(self, aside_id: str, action: str) -> None:
        fn = self.ops.restore_aside if action == "restore" else self.ops.delete_aside
        await self.call(fn, aside_id)


class SSHTunnelHandler(websocket.WebSocketHandler):
    """``GET /v1/servers/<key>/ssh`` (websocket): a byte stream to the sshd of that
    server's container, for the hub's SSH gateway. Bearer token as everywhere; the only
    address it ever connects to is the container's own, port 22."""

    def initialize(self, ops: NodeOps, token_hash: str, pool: ThreadPoolExecutor) -> None:
        self.ops = ops
        self.token_hash = token_hash
        self.pool = pool
        self.writer: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task | None = None

    async def get(self, key: str) -> None:  # type: ignore[override]
        if not auth.bearer_ok(self.request.headers.get("Authorization"), self.token_hash):
            raise web.HTTPError(401)
        loop = asyncio.get_running_loop()
        try:
            ip = await loop.run_in_executor(self.pool, self.ops.ssh_address, key)
            reader, self.writer = await asyncio.open_connection(ip, SSHD_PORT)
        except (LabVMError, OSError) as e:
            self.set_status(404 if isinstance(e, LabVMError) else 502)
            self.finish({"error": str(e)})
            return
        self.reader = reader
        log.info("ssh tunnel to %s (%s) opened", key, ip)
        await super().get(key)

    def open(self, key: str) -> None:  # type: ignore[override]
        self.pump = asyncio.ensure_future(self._to_gateway())

    async def _to_gateway(self) -> None:
        try:
            while data := await self.reader.read(1 << 16):
                await self.write_message(data, binary=True)
        except (OSError, websocket.WebSocketClosedError):
            pass
        self.close()

    async def on_message(self, message: str | bytes) -> None:
        assert self.writer is not None
        self.writer.write(message if isinstance(message, bytes) else message.encode())
        await self.writer.drain()

    def on_close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.pump is not None:
            self.pump.cancel()


def make_app(ops: NodeOps, token_hash: str, pool: ThreadPoolExecutor) -> web.Application:
    args = {"ops": ops, "token_hash": token_hash, "pool": pool}
    return web.Application([
        (r"/v1/info", InfoHandler, args),
        (r"/v1/sample", SampleHandler, args),
        (rf"/v1/servers/{KEY}", ServerHandler, args),
        (rf"/v1/servers/{KEY}/ssh", SSHTunnelHandler, args),
        (r"/v1/asides/([a-z0-9_.-]{1,100}-[0-9]{9,12})/(restore|delete)", AsideHandler, args),
        (rf"/v1/servers/{KEY}/(start|stop|sync|discard|quota|ssh-keys|notice)", ActionHandler,
         args),
    ])


async def serve(ops: NodeOps, listen: str, url: str, token_hash: str, tls_dir: str,
                registry_dir: str, heartbeat_s: float) -> None:
    host, _, port = listen.rpartition(":")
    address = url.split("//", 1)[-1].rsplit(":", 1)[0]
    cert, key = auth.ensure_cert(tls_dir, ops.config.name, address)
    pool = ops.pool
    app = make_app(ops, token_hash, pool)
    server = app.listen(int(port), host or "0.0.0.0",
                        ssl_options=auth.server_context(cert, key))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def heartbeats() -> None:
        while True:
            try:
                info = await loop.run_in_executor(pool, ops.info)
                await loop.run_in_executor(pool, registry.write_record, registry_dir,
                                           {"name": ops.config.name, "url": url,
                                            "info": info}, key)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(heartbeat_s)

    async def syncs() -> None:
        while True:
            await asyncio.sleep(ops.config.sync_interval_s)
            try:
                await loop.run_in_executor(pool, ops.sync_running)
            except Exception:
                log.exception("background sync failed")

    tasks = [asyncio.create_task(heartbeats()), asyncio.create_task(syncs())]
    log.info("labvm-node %s listening on %s (advertised %s)", ops.config.name, listen, url)
    await stop.wait()
    for t in tasks:
        t.cancel()
    server.stop()
    pool.shutdown(wait=True, cancel_futures=True)
    ops.close()
