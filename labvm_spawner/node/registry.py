"""Node registration: each agent writes a heartbeat record the hub reads.

Records live in a directory on the shared layer store (every node and the hub
mount it already), one JSON file per node, replaced atomically. A record holds the
agent's URL, its certificate (which the hub pins) and its inventory. A node whose
record is older than ``down_after_s`` is down.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# Seconds without a heartbeat before a node counts as down (tests shorten it).
DOWN_AFTER_S = float(os.environ.get("LABVM_NODE_DOWN_AFTER_S", "15"))


def write_record(registry_dir: str | os.PathLike[str], record: dict) -> None:
    d = Path(registry_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = record["name"]
    tmp = d / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dict(record, t=time.time())))
    os.replace(tmp, d / f"{name}.json")


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
        if not NODE_NAME.fullmatch(name):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("name") != name:
            continue
        age = now - float(rec.get("t", 0))
        rec["age_s"] = age
        rec["up"] = age < down_after_s
        out[name] = rec
    return out
