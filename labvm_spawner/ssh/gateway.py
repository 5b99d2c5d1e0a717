"""The SSH gateway (``labvm-ssh``): one port on the hub, through which each user reaches
the sshd in their own containers, and nothing else.

A user jumps through it (``ssh -J alice@hub:2222 alice@default``): the gateway checks
alice's registered public key, then opens the jump's one channel (direct-tcpip) only
to port 22 of a server of alice's, by its name (``default`` for the default server).
The session inside is end to end between alice's client and her container's sshd,
which checks the same keys (delivered with the server's secrets). So scp, sftp,
rsync, ``-L``/``-R``, agent forwarding and VS Code Remote-SSH all work unchanged,
and the gateway never sees a byte of them in clear.

The gateway reaches a container on the hub's own node at its bridge address, and a
container on another node through that node's agent (an authenticated websocket
tunnel over its pinned TLS), never through a port opened on the node.

Logging in to the gateway itself (no ``-J``) gives a short status and, with
``start``, starts a server and prints its progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from .. import names
from ..errors import LabVMError
from ..node.protocol import SSHD_PORT
from . import fastpath
from .keystore import KeyStore
from .relay import SocketSession, TunnelSession
from .throttle import Throttle

log = logging.getLogger("labvm.ssh")


# AES-GCM only: OpenSSL does it in hardware, and every byte of a user's scp is decrypted
# here. The OpenSSH client picks the first of its own list the server offers, so with
# chacha20-poly1305 or aes-ctr (and asyncssh's UMAC) on offer it would take a slow one.
# Every OpenSSH since 6.2 (2013) and PuTTY since 0.76 has AES-GCM.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
WINDOW, MAX_PACKET = 8 << 20, 256 << 10


class Refused(Exception):
    """Why a channel is refused, in the one line the user's ssh prints."""


@dataclass
class Route:
    """How to reach one running server's sshd."""

    key: str
    node: str
    ip: str | None = None  # on the gateway's own node: the container's bridge address
    tunnel: Callable[[], Awaitable[Any]] | None = None  # elsewhere: the agent's tunnel
    port: int = SSHD_PORT


def target_server(host: str, port: int) -> str:
    """The server a jump names: ``default`` (the default server) or a named server's
    name, on port 22. Anything else is refused."""
    if port != SSHD_PORT:
        raise Refused(f"only port {SSHD_PORT} of your own servers can be reached "
                      f"(asked for {host[:64]}:{port})")
    if host == "default":
        return ""
    try:
        return names.check_server_name(host)
    except LabVMError:
        raise Refused(f"{host[:64]!r} is not one of your servers: use 'default' or the "
                      "name of a named server") from None


class AuditLog:
    """One JSON line per login, refusal and forwarding request (root-only file), also
    sent to the service's log."""

    def __init__(self, path: Path, max_bytes: int = 64 << 20, keep: int = 3) -> None:
        """Past ``max_bytes`` the log moves to ``<path>.1`` (and so on, ``keep`` of them):
        failed logins from many addresses must not fill the hub's disk."""
        self.path = path
        self.max_bytes, self.keep = max_bytes, keep
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)

    def __call__(self, event: str, **fields: Any) -> None:
        rec = {"t": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(rec, sort_keys=True)
        log.info("%s", line)
        if os.fstat(self._fd).st_size >= self.max_bytes:
            self._rotate()
        os.write(self._fd, (line + "\n").encode())

    def _rotate(self) -> None:
        os.close(self._fd)
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()

    def close(self) -> None:
        os.close(self._fd)


class Gateway:
    """What the SSH server needs from the rest of LabVM, gathered in one place."""

    def __init__(self, keys: KeyStore, locate: Callable[[str, str], Awaitable[Route]],
                 audit: AuditLog, throttle: Throttle, hub_url: str,
                 check_token: Callable[[str, str], Awaitable[bool]] | None = None,
                 start: Callable[[str, str, Callable[[str], None]], Awaitable[None]] | None
                 = None, start_on_connect: bool = False, public_host: str = "hub",
                 port: int = 2222) -> None:
        self.keys = keys
        self.locate = locate
        self.audit = audit
        self.throttle = throttle
        self.hub_url = hub_url
        self.check_token = check_token  # hub API tokens as passwords, when turned on
        self.start = start
        self.start_on_connect = start_on_connect
        self.public_host = public_host
        self.port = port

    async def listen(self, host: str, port: int, host_key: asyncssh.SSHKey) -> Any:
        return await asyncssh.create_server(
            lambda: _Server(self), host, port, server_host_keys=[host_key],
            process_factory=self._process, sftp_factory=None, allow_scp=False,
            agent_forwarding=False, x11_forwarding=False, login_timeout=30,
            keepalive_interval=30, keepalive_count_max=4, encryption_algs=CIPHERS)

    async def route(self, user: str, server: str, source: str,
                    say: Callable[[str], None] | None = None) -> Route:
        """The route to ``user``'s ``server``, starting it first when so set."""
        try:
            return await self.locate(user, server)
        except Stopped as e:
            if not (self.start_on_connect and self.start):
                raise Refused(str(e)) from None
        self.audit("start", user=user, server=server or "default", source=source)
        await self.start(user, server, say or (lambda _m: None))
        return await self.locate(user, server)

    # ---- the gateway's own sessions ---------------------------------------------------

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        user = process.get_extra_info("username")
        source = (process.get_extra_info("peername") or ("?",))[0]
        argv = shlex.split(process.command or "")
        self.audit("session", user=user, source=source, command=(process.command or "")[:200])
        try:
            if argv[:1] == ["start"] and len(argv) <= 2 and self.start is not None:
                server = target_server(argv[1] if len(argv) == 2 else "default", SSHD_PORT)
                await self._start_command(process, user, server)
            elif not argv or argv == ["status"]:
                process.stdout.write(await self._status(user))
                process.exit(0)
            else:
                process.stderr.write("This is the LabVM SSH gateway: it runs no commands. "
                                     f"Use: ssh -J {user}@{self.public_host}:{self.port} "
                                     f"{user}@default\r\n")
                process.exit(2)
        except Refused as e:
            process.stderr.write(f"{e}\r\n")
            process.exit(1)
        except Exception as e:  # the user reads one sentence, the log has the rest
            log.exception("session of %s", user)
            process.stderr.write(f"LabVM: {e}\r\n")
            process.exit(1)

    async def _status(self, user: str) -> str:
        lines = [f"LabVM SSH gateway at {self.public_host}:{self.port}, for {user}."]
        try:
            route = await self.locate(user, "")
            lines.append(f"Your default server is running on node {route.node}.")
        except (Stopped, Refused) as e:
            lines.append(str(e))
        lines += ["Reach it with:",
                  f"  ssh -J {user}@{self.public_host}:{self.port} {user}@default",
                  f"Start a server here with: ssh -p {self.port} {user}@{self.public_host} "
                  "start [NAME]", ""]
        return "\r\n".join(lines)

    async def _start_command(self, process: asyncssh.SSHServerProcess, user: str,
                             server: str) -> None:
        source = (process.get_extra_info("peername") or ("?",))[0]
        try:
            route = await self.locate(user, server)
            process.stdout.write(f"{_label(server)} is already running on node "
                                 f"{route.node}.\r\n")
            process.exit(0)
            return
        except Stopped:
            pass
        self.audit("start", user=user, server=server or "default", source=source)
        await self.start(user, server, lambda m: process.stdout.write(m + "\r\n"))
        process.stdout.write(f"{_label(server)} is ready: ssh -J {user}@{self.public_host}:"
                             f"{self.port} {user}@{server or 'default'}\r\n")
        process.exit(0)


class Stopped(Refused):
    """The server exists but is not running (or is still starting)."""


def _label(server: str) -> str:
    return f"Server {server!r}" if server else "Your default server"


class _Server(asyncssh.SSHServer):
    """One client connection to the gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.user: str | None = None
        self.fingerprints: set[str] = set()
        self.attempts = 0
        self.blocked: str | None = None
        self.authed = False
        self.method: dict[str, str] = {}

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.source = (conn.get_extra_info("peername") or ("?",))[0]
        fastpath.tune(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection that asked to log in and left without: one failed login.
        if not self.authed and self.user is not None and not self.blocked:
            self.gw.throttle.failed(self.source, self.user)
            self.gw.audit("login-refused", user=self.user, source=self.source,
                          reason="no registered key matched" if self.attempts else
                          "no key offered (password and keyboard-interactive logins are off)")

    async def begin_auth(self, username: str) -> bool:
        self.user = username
        self.blocked = self.gw.throttle.blocked(self.source, username)
        if self.blocked:
            self.gw.audit("login-refused", user=username, source=self.source,
                          reason=self.blocked)
            return True
        try:
            names.check_username(username)
            keys = await asyncio.to_thread(self.gw.keys.public_keys, username)
        except LabVMError:
            keys = []
        self.fingerprints = {k.fingerprint for k in keys}
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self.attempts += 1
        if self.blocked:
            return False
        fp = key.get_fingerprint("sha256")
        if fp in self.fingerprints:
            # Asked once without and once with the signature: logged at auth_completed.
            self.method = {"method": "publickey", "fingerprint": fp}
            return True
        return False

    def password_auth_supported(self) -> bool:
        return self.gw.check_token is not None

    async def validate_password(self, username: str, password: str) -> bool:
        self.attempts += 1
        if self.blocked or self.gw.check_token is None:
            return False
        if await self.gw.check_token(username, password):
            self.method = {"method": "hub-token"}
            return True
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def auth_completed(self) -> None:
        self.authed = True
        self.gw.audit("login", user=self.user, source=self.source, **self.method)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        # -R on the gateway itself would open a port on the hub: never.
        self.gw.audit("forward-refused", user=self.user, source=self.source,
                      kind="remote", target=f"{listen_host[:64]}:{listen_port}",
                      reason="remote forwarding on the gateway is not allowed")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.gw.audit("forward-refused", user=self.user, source=self.source,
                      kind="unix", target=dest_path[:100],
                      reason="only port 22 of your own servers can be reached")
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int):  # type: ignore[no-untyped-def]
        # A wide window and big packets: fewer, larger writes through this process.
        assert self.conn is not None
        chan = self.conn.create_tcp_channel(window=WINDOW, max_pktsize=MAX_PACKET)
        return chan, self._open(dest_host, dest_port)

    async def _open(self, dest_host: str, dest_port: int) -> asyncssh.SSHTCPSession:
        user = self.user or "?"
        target = f"{dest_host[:64]}:{dest_port}"
        try:
            server = target_server(dest_host, dest_port)
            try:
                route = await self.gw.route(user, server, self.source)
            except Refused:
                raise
            except Exception as e:  # the hub or a node did not answer: say so, log the rest
                log.exception("finding %s's server %r", user, server)
                raise Refused(f"LabVM cannot find your server just now ({e}); try again in "
                              "a moment") from None
        except Refused as e:
            self.gw.audit("forward-refused", user=user, source=self.source, kind="direct",
                          target=target, reason=str(e))
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            str(e)) from None
        self.gw.audit("forward", user=user, server=server or "default", node=route.node,
                      source=self.source, target=target)
        try:
            if route.ip is not None:
                return await SocketSession.connect(route.ip, route.port)
            assert route.tunnel is not None
            return TunnelSession(await route.tunnel())
        except (OSError, LabVMError) as e:
            log.warning("%s: cannot reach %s on node %s: %s", user, route.key, route.node, e)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                f"the server's sshd on node {route.node} does not answer ({e})") from None
