"""Cheaper packet handling for the gateway's connections, on top of asyncssh.

Every byte of a user's scp crosses the gateway's Python, so two of asyncssh's habits
cost a lot there:

- It cuts each packet off the front of its receive buffer by slicing, so a 256 KiB read
  holding eight 32 KiB packets is copied over and over (quadratic in the packets per
  read). Here each step of the parser is handed exactly the bytes it needs, cut once.
- It sends an empty SSH_MSG_IGNORE before every packet once encrypted: a guard for CBC
  ciphers, whose next IV the peer could predict. The gateway offers only AES-GCM, which
  has no such IV, so those packets (an encryption and a write each, one per small SFTP
  reply on the way back) are dropped.

Both reach into asyncssh's private attributes, so ``tune`` first checks that they are
there and leaves the connection as it is otherwise; ``tuned`` tells which it did (the
tests assert that the pinned asyncssh is tuned).
"""

from __future__ import annotations

import logging
from typing import Any

from asyncssh.constants import MSG_IGNORE
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("labvm.ssh")

_NEEDED = ("_inpbuf", "_recv_handler", "_recv_pkthdr", "_recv_packet", "_recv_version",
           "_recv_blocksize", "_recv_macsize", "_pktlen", "_recv_data", "send_packet",
           "_send_encryption", "_recv_encryption", "_reset_keepalive_timer", "internal_error")
_warned = False


def tune(conn: Any) -> bool:
    """Install the cheaper receive and send paths on one asyncssh connection."""
    global _warned
    if not all(hasattr(conn, a) for a in _NEEDED):
        if not _warned:
            log.warning("asyncssh %s lacks what the gateway's fast path needs: using its "
                        "own packet handling", _asyncssh_version())
            _warned = True
        return False
    stock_recv, stock_send = conn._recv_data, conn.send_packet

    def recv_data() -> None:
        try:
            _recv_by_step(conn)
        except Exception:  # what asyncssh's own loop does with what escapes it
            conn.internal_error()

    def send_packet(pkttype: int, *args: bytes, **kw: Any) -> None:
        if pkttype == MSG_IGNORE and _is_aead(conn._send_encryption):
            return
        stock_send(pkttype, *args, **kw)

    conn._recv_data, conn.send_packet = recv_data, send_packet
    conn._labvm_stock = (stock_recv, stock_send)
    return True


def tuned(conn: Any) -> bool:
    return hasattr(conn, "_labvm_stock")


def _recv_by_step(conn: Any) -> None:
    """asyncssh's ``_recv_data`` loop, with the buffer walked by offset: each handler
    sees exactly the bytes of its step, and whatever it leaves goes back in front."""
    from asyncssh.misc import DisconnectError

    conn._reset_keepalive_timer()
    buf: bytes = conn._inpbuf
    off = 0
    try:
        while off < len(buf):
            handler = conn._recv_handler
            if handler == conn._recv_pkthdr:
                need = conn._recv_blocksize
            elif handler == conn._recv_packet:
                need = 4 + conn._pktlen + conn._recv_macsize - conn._recv_blocksize
                enc = conn._recv_encryption
                if enc is not None and not hasattr(enc, "_labvm_fast"):
                    _fast_gcm(enc)
            elif handler == conn._recv_version:
                need = len(buf) - off
            else:  # a packet is being handled asynchronously: wait for it
                break
            if len(buf) - off < need:
                break
            conn._inpbuf = buf[off:off + need] if (off or need < len(buf)) else buf
            off += need
            more = handler()
            if conn._inpbuf:  # not all taken (the version line, or a stop)
                buf, off = conn._inpbuf + buf[off:], 0
            if not more:
                break
    except DisconnectError as exc:
        conn._inpbuf = buf[off:]
        conn._send_disconnect(exc.code, exc.reason, exc.lang)
        conn._force_close(exc)
        return
    conn._inpbuf = buf[off:] if off else buf


def _fast_gcm(enc: Any) -> None:
    """Decrypt AES-GCM packets with one AESGCM per key and one join of the ciphertext
    and tag, where asyncssh builds a new AESGCM and concatenates twice per packet."""
    cipher = getattr(enc, "_cipher", None)
    enc._labvm_fast = False
    if type(enc).__name__ != "GCMEncryption" or not all(
            hasattr(cipher, a) for a in ("_key", "_iv", "_update_iv")):
        return
    aes = AESGCM(cipher._key)

    def decrypt_packet(seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        try:
            out: bytes | None = aes.decrypt(cipher._iv, b"".join(
                (first[header_len:], rest, mac)), first[:header_len])
        except InvalidTag:
            out = None
        cipher._update_iv()
        return out

    enc.decrypt_packet = decrypt_packet
    enc._labvm_fast = True


def _is_aead(enc: Any) -> bool:
    return enc is not None and type(enc).__name__ in ("GCMEncryption", "ChachaEncryption")


def _asyncssh_version() -> str:
    import asyncssh
    return getattr(asyncssh, "__version__", "?")
