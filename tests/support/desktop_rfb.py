"""A minimal RFB (VNC) client over a websocket, for the desktop test and benchmark.

It speaks just enough of RFB 3.8 to count FramebufferUpdate messages and bytes:
security type None, encodings ZRLE, CopyRect and Raw (each rectangle's size is known
without decoding), DesktopSize. It asks for the next update after each one, as
noVNC does, so the update rate measures the whole round trip of the chain.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

ENC_RAW, ENC_COPYRECT, ENC_ZRLE, ENC_DESKTOP_SIZE = 0, 1, 16, -223


class RfbError(RuntimeError):
    pass


@dataclass
class Stats:
    updates: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


class RfbClient:
    """RFB over an open websocket (``websockets.sync`` connection)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.buf = bytearray()
        self.received = 0
        self.width = self.height = 0
        self.bpp = 32
        self.cut_text: list[bytes] = []

    def _read(self, n: int, timeout: float = 30) -> bytes:
        while len(self.buf) < n:
            frame = self.ws.recv(timeout=timeout)
            if isinstance(frame, str):
                raise RfbError("text frame on an RFB websocket")
            self.received += len(frame)
            self.buf += frame
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def handshake(self) -> None:
        version = self._read(12)
        if not version.startswith(b"RFB 003."):
            raise RfbError(f"not an RFB server: {version!r}")
        self.ws.send(b"RFB 003.008\n")
        types = self._read(self._read(1)[0])
        if 1 not in types:  # None: the socket, not a password, is the access control
            raise RfbError(f"server wants authentication: types {list(types)}")
        self.ws.send(b"\x01")
        if struct.unpack(">I", self._read(4))[0] != 0:
            raise RfbError("security handshake failed")
        self.ws.send(b"\x01")  # shared: do not disconnect the browser
        self.width, self.height = struct.unpack(">HH", self._read(4))
        pixel_format = self._read(16)
        self.bpp = pixel_format[0]
        self._read(struct.unpack(">I", self._read(4))[0])  # desktop name
        encodings = [ENC_ZRLE, ENC_COPYRECT, ENC_RAW, ENC_DESKTOP_SIZE]
        self.ws.send(struct.pack(">BxH", 2, len(encodings))
                     + b"".join(struct.pack(">i", e) for e in encodings))

    def request(self, incremental: bool = True) -> None:
        self.ws.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    def read_message(self, timeout: float = 30) -> int:
        """Read one server message; returns its type."""
        kind = self._read(1, timeout)[0]
        if kind == 0:  # FramebufferUpdate
            (count,) = struct.unpack(">xH", self._read(3))
            for _ in range(count):
                _x, _y, w, h, enc = struct.unpack(">HHHHi", self._read(12))
                if enc == ENC_RAW:
                    self._read(w * h * self.bpp // 8)
                elif enc == ENC_COPYRECT:
                    self._read(4)
                elif enc == ENC_ZRLE:
                    self._read(struct.unpack(">I", self._read(4))[0])
                elif enc == ENC_DESKTOP_SIZE:
                    self.width, self.height = w, h
                else:
                    raise RfbError(f"unexpected encoding {enc}")
        elif kind == 1:  # SetColourMapEntries
            _first, n = struct.unpack(">xHH", self._read(5))
            self._read(6 * n)
        elif kind == 2:  # Bell
            pass
        elif kind == 3:  # ServerCutText (negative length: extended clipboard)
            (length,) = struct.unpack(">3xi", self._read(7))
            self.cut_text.append(self._read(abs(length)))
        else:
            raise RfbError(f"unexpected server message {kind}")
        return kind

    def next_update(self, timeout: float = 30) -> None:
        while self.read_message(timeout) != 0:
            pass

    def first_frame(self) -> None:
        """A full frame, as a client that just connected asks for."""
        self.request(incremental=False)
        self.next_update()

    def measure(self, seconds: float) -> Stats:
        """Updates and bytes received while asking for each next update in turn."""
        start_bytes = self.received
        stats = Stats()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.request(incremental=True)
            self.next_update()
            stats.updates += 1
        stats.seconds = time.perf_counter() - t0
        stats.bytes = self.received - start_bytes
        return stats
