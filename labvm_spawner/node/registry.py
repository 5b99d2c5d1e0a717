"""Heartbeats: each agent writes a signed record the hub reads for liveness and capacity.

Records live in a directory on the shared layer store (every node and the hub
mount it already), one JSON file per node, replaced atomically. A record holds the
node's inventory and the time, signed with the key of the certificate the node
enrolled with. Anyone who can write the store can write a file here, so the hub
trusts a record only when that signature checks out (``cluster``), and never takes
an address or a certificate from it. A node whose record is older than
``down_after_s`` is down.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..names import is_node_name
from . import auth

# Seconds without a heartbeat before a node counts as down (tests shorten it).
DOWN_AFTER_S = float(os.environ.get("LABVM_NODE_DOWN_AFTER_S", "15"))


def write_record(registry_dir: str | os.PathLike[str], record: dict,
                 key_path: str | os.PathLike[str] | None = None) -> None:
    """Write ``record`` with the time; signed by the certificate key ``key_path``."""
    d = Path(registry_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = record["name"]
    record = dict(record, t=time.time())
    if key_path is not None:
        record = auth.sign_record(key_path, record)
    tmp = d / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, d / f"{name}.json")


# What read_records adds to a record; not part of what the node signed.
DERIVED = ("up", "age_s")


def as_written(record: dict) -> dict:
    """A record from ``read_records`` as the node wrote (and signed) it."""
    return {k: v for k, v in record.items() if k not in DERIVED}


def read_records(registry_dir: str | os.PathLike[str],
                 down_after_s: float = DOWN_AFTER_S) -> dict[str, dict]:
    """Every registered node's last record, with ``up`` and ``age_s`` added."""
    d = Path(registry_dir)
    out: dict[str, dict] = {}
    if not d.is_dir():
        return out
    now = time.time()
    for p in d.glob("*.json"):
        name = p.name[: -len(".json")]
        if not is_node_name(name):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("name") != name:
            continue
        try:
            age = now - float(rec.get("t", 0))
        except (TypeError, ValueError):
            continue
        rec["age_s"] = age
        rec["up"] = age < down_after_s
        out[name] = rec
    return out
