"""The views the pages show, assembled from the latest sample, the hub's users,
GPU allocations and the layer store. Plain dicts, ready for JSON."""

from __future__ import annotations

from typing import Any

from ..names import root_key
from ..storage import open_store
from .collector import Sample


def _keys_of(user: dict[str, Any], store_keys: list[str]) -> list[str]:
    name = user["name"]
    keys = {root_key(name, s) for s in (user.get("servers") or {})}
    keys.update(k for k in store_keys if k == name or k.startswith(name + "."))
    return sorted(keys)


def user_view(user: dict[str, Any], sample: Sample | None, store_root: str,
              warnings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One user: each root (server) with its container figures, GPUs and layer versions."""
    store = open_store(store_root)
    containers = {c.key: c for c in sample.containers} if sample else {}
    servers = user.get("servers") or {}
    roots = []
    for key in _keys_of(user, store.keys()):
        server = key.split(".", 1)[1] if "." in key else ""
        srv = servers.get(server) or {}
        c = containers.get(key)
        gpus = [
            {"index": g.index, "uuid": g.uuid, "name": g.name, "util": g.util,
             "mem_used": g.mem_used, "mem_total": g.mem_total,
             "processes": [p.__dict__ for p in g.processes if p.key == key]}
            for g in (sample.gpus if sample else []) if g.holder == key
        ]
        roots.append({
            "key": key, "server": server,
            "running": bool(srv.get("ready")) or c is not None,
            "node": sample.node if c is not None and sample else "",
            "last_activity": srv.get("last_activity"),
            "container": c.__dict__ if c else None,
            "gpus": gpus,
            "versions": store.versions(key),
            "current_version": store.current_version(key),
            "last_sync": "never",  # the background sync is another issue
            "warning": warnings.get(key),
        })
    return {"name": user["name"], "admin": bool(user.get("admin")), "roots": roots}


def gpu_view(sample: Sample | None) -> list[dict[str, Any]]:
    if sample is None:
        return []
    users = {c.key: c.user for c in sample.containers}
    out = []
    for g in sample.gpus:
        d = dict(g.__dict__)
        d["processes"] = [p.__dict__ for p in g.processes]
        d["holder_user"] = users.get(g.holder or "") or (g.holder or "").split(".", 1)[0]
        out.append(d)
    return out


def node_view(sample: Sample | None, node: str, drained: bool) -> dict[str, Any]:
    return {
        "name": node, "drained": drained,
        "t": sample.t if sample else None,
        "host": sample.host.__dict__ if sample else None,
        "gpus": len(sample.gpus) if sample else 0,
        "gpus_held": sum(1 for g in sample.gpus if g.holder) if sample else 0,
        "containers": len(sample.containers) if sample else 0,
    }
