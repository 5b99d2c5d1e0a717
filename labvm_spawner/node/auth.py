"""Credentials between the hub and node agents.

The hub holds one key (a root-only file). Each node's token is derived from it
(HMAC of the node name), so the hub stores no per-node secret; a node stores
only the SHA-256 of its token, enough to check a request and useless to forge one.
Requests travel over TLS, and the hub pins the self-signed certificate each node
presented when it enrolled. A node signs its heartbeat records with that
certificate's key, so a record on the shared store that someone else wrote is
recognised and ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


# ---- certificates and signed records ------------------------------------------------------

def load_cert(pem: str) -> x509.Certificate:
    """A node's certificate; LabVMError if ``pem`` is not one we can pin."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, TypeError) as e:
        raise LabVMError(f"not a PEM certificate: {e}") from e
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        raise LabVMError("the node certificate must have an EC key (labvm-node makes one)")
    return cert


def cert_fingerprint(pem: str) -> str:
    """SHA-256 of the certificate (DER), as admins compare it: hex pairs."""
    digest = load_cert(pem).fingerprint(hashes.SHA256()).hex()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def cert_names(pem: str) -> set[str]:
    """The addresses and host names a certificate is valid for."""
    try:
        san = load_cert(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    names = {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)}
    return names | set(san.value.get_values_for_type(x509.DNSName))


def _payload(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_record(key_path: str | os.PathLike[str], record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``sig``: an ECDSA signature by the node's certificate key."""
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sig = key.sign(_payload(record), ec.ECDSA(hashes.SHA256()))
    return dict(record, sig=base64.b64encode(sig).decode())


def record_signed_by(cert_pem: str, record: dict[str, Any]) -> bool:
    """True when ``record`` carries a valid signature by this certificate's key."""
    sig = record.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        pub = load_cert(cert_pem).public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(base64.b64decode(sig, validate=True), _payload(record),
                   ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, LabVMError, TypeError):
        return False
