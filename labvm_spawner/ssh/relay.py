"""What carries a jump's channel to the container's sshd: a socket on the gateway's own
node, or a node agent's websocket tunnel for a container elsewhere. Both keep flow
control both ways (a slow side pauses the other).

asyncssh's own ``forward_connection`` is not used: it drops whatever the socket sends
before the channel is open, and sshd sends its version line the moment it accepts, so
a busy gateway lost it now and then (the client then read sshd's key exchange as its
banner: "banner line contains invalid characters").
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import asyncssh

# A channel the client gave up on while it was being opened never gets its session
# started: its socket is closed after this long.
OPEN_TIMEOUT_S = 60.0


class SocketSession(asyncssh.SSHTCPSession):
    """A direct-tcpip channel carried to a TCP socket. What the socket sends before the
    channel is open is kept (and the socket not read further) until it is."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel | None = None
        self.transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._out: list[bytes] = []  # channel data for the socket, written once per turn
        self._socket_eof = self._chan_eof = False
        self._closed = False

    @classmethod
    async def connect(cls, host: str, port: int) -> SocketSession:
        session = cls()
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: _Socket(session), host, port)
        loop.call_later(OPEN_TIMEOUT_S, session._unopened)
        return session

    # ---- the channel's side -------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHTCPChannel) -> None:
        self.chan = chan
        for data in self._early:
            chan.write(data)
        self._early.clear()
        if self._socket_eof:
            chan.write_eof()
        if self._closed:
            chan.close()
        elif self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        # One read of the client's connection holds several packets: one writev for
        # them all, not a send per packet.
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self.transport is not None and self._out:
            self.transport.writelines(self._out)
        self._out.clear()

    def eof_received(self) -> bool:
        self._chan_eof = True
        self._flush()
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        return not self._socket_eof  # both halves done: close the channel

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _unopened(self) -> None:
        if self.chan is None:
            self.connection_lost(None)


class _Socket(asyncio.Protocol):
    """The socket's side of a ``SocketSession``."""

    def __init__(self, session: SocketSession) -> None:
        self.s = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.s.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.s._closed:
            self.s.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.s.chan is None:  # sshd's version line, sent the moment it accepted
            self.s._early.append(data)
            self.s.transport.pause_reading()  # the rest waits in the kernel
        else:
            self.s.chan.write(data)

    def eof_received(self) -> bool:
        self.s._socket_eof = True
        if self.s.chan is not None:
            self.s.chan.write_eof()
        # Half open while the client may still be sending; closed once both are done.
        return not self.s._chan_eof

    def pause_writing(self) -> None:
        if self.s.chan is not None:
            self.s.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.s.chan is not None:
            self.s.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.s._closed = True
        if self.s.chan is not None:
            self.s.chan.close()


class TunnelSession(asyncssh.SSHTCPSession):
    """A direct-tcpip channel carried over a node agent's websocket tunnel."""

    HIGH = 1 << 20

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.chan: asyncssh.SSHTCPChannel | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._pending = 0
        self._task: asyncio.Task | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel) -> None:
        self.chan = chan
        self._task = asyncio.ensure_future(self._from_tunnel())

    async def _from_tunnel(self) -> None:
        assert self.chan is not None
        try:
            while (msg := await self.ws.read_message()) is not None:
                if isinstance(msg, str):
                    msg = msg.encode()
                await self._writable.wait()
                self.chan.write(msg)
            self.chan.write_eof()
        except Exception:  # the channel went away first
            pass
        finally:
            self.chan.close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        assert self.chan is not None
        n = len(data)
        fut = self.ws.write_message(data, binary=True)
        self._pending += n
        if self._pending > self.HIGH:
            self.chan.pause_reading()
        fut.add_done_callback(lambda _f: self._sent(n))

    def _sent(self, n: int) -> None:
        self._pending -= n
        if self._pending <= self.HIGH // 2 and self.chan is not None:
            self.chan.resume_reading()

    def eof_received(self) -> bool:
        self.ws.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.close()
        if self._task is not None:
            self._task.cancel()
