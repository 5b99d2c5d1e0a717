"""Nodes as the hub knows them, without a test bed: enrolled in LabVM's database with a
real certificate and join token, and heartbeat records signed by that certificate."""

from __future__ import annotations

import json
import time
from pathlib import Path

from labvm_spawner.cluster import Cluster
from labvm_spawner.node import auth, registry

_CERTS: dict[str, tuple[Path, Path]] = {}


def cert(base: Path, name: str, address: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate, key) for node ``name``, as the agent makes them."""
    return auth.ensure_cert(base / f"tls-{name}", name, address)


def enroll(db_url: str, reg: Path, name: str, info: dict, up: bool = True,
           url: str = "https://127.0.0.1:1") -> tuple[Path, Path]:
    """Enroll ``name`` with a join token and write its signed heartbeat; returns its
    (certificate, key). ``up=False``: the record is an hour old."""
    crt, key = cert(reg.parent, name)
    c = Cluster(db_url)
    try:
        token = c.make_join_token(name, "boss")["token"]
        c.enroll(name, url, crt.read_text(), token)
    finally:
        c.close()
    registry.write_record(reg, {"name": name, "url": url, "info": info}, key)
    if not up:
        age(reg, name, 3600, key)
    return crt, key


def age(reg: Path, name: str, seconds: float, key: Path) -> None:
    """Re-sign ``name``'s record as if written ``seconds`` ago (a replayed old one)."""
    path = reg / f"{name}.json"
    rec = json.loads(path.read_text())
    rec["t"] = time.time() - seconds
    path.write_text(json.dumps(auth.sign_record(key, rec)))
