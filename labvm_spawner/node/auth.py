"""Credentials between the hub and node agents.

The hub holds one key (a root-only file). Each node's token is derived from it
(HMAC of the node name), so the hub stores no per-node secret; a node stores
only the SHA-256 of its token, enough to check a request and useless to forge one.
Requests travel over TLS, and the hub pins each node's self-signed certificate,
which the node publishes with its heartbeats.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl
import stat
import subprocess
from pathlib import Path

from ..errors import LabVMError


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The hub's node key; refused if others could read it."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise LabVMError(
            f"the node key {p} does not exist (make it: labvm-node make-key {p})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LabVMError(f"the node key {p} is readable by others; chmod 600 it")
    key = p.read_bytes().strip()
    if len(key) < 32:
        raise LabVMError(f"the node key {p} is too short (at least 32 bytes)")
    return key


def make_key(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def node_token(key: bytes, node: str) -> str:
    return hmac.new(key, f"labvm-node:{node}".encode(), hashlib.sha256).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_ok(header: str | None, expected_hash: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(token_hash(header[len("Bearer "):].strip()), expected_hash)


def ensure_cert(tls_dir: str | os.PathLike[str], name: str, address: str) -> tuple[Path, Path]:
    """The node's certificate and key (made once, self-signed, for its address)."""
    d = Path(tls_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = d / "node.crt", d / "node.key"
    if cert.exists() and key.exists():
        return cert, key
    try:
        ipaddress.ip_address(address)
        san = f"IP:{address}"
    except ValueError:
        san = f"DNS:{address}"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
         "-subj", f"/CN=labvm-node-{name}", "-addext", f"subjectAltName={san}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise LabVMError(f"making the node certificate failed: {proc.stderr.strip()}")
    key.chmod(0o600)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly this one node certificate."""
    ctx = ssl.create_default_context(cadata=cert_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
