"""The views the pages show, assembled from the latest sample, the hub's users,
GPU allocations, the layer store and the cluster's records. Plain dicts, ready for JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..cluster import NodeView
from ..names import root_key
from ..storage import open_store
from .collector import Sample

DISK_WARN = 0.9  # a user is warned at this share of their disk quota
DISK_CLEAR = 0.85  # and the notice goes under this one


def disk_fields(sample: Sample | None, key: str) -> dict[str, Any]:
    used, limit = (sample.disk.get(key) if sample else None) or (None, 0)
    return {"disk": None if used is None else {"used": used, "limit": limit or None},
            "disk_warning": bool(used is not None and limit and used >= DISK_WARN * limit)}


def _keys_of(user: dict[str, Any], known_keys: list[str]) -> list[str]:
    """The user's roots: their servers', and any key the store or a placement knows."""
    name = user["name"]
    keys = {root_key(name, s) for s in (user.get("servers") or {})}
    keys.update(k for k in known_keys if k == name or k.startswith(name + "."))
    return sorted(keys)


def _store_fields(store: Any, key: str) -> dict[str, Any]:
    """A root's versions and its last sync, as the store has them."""
    fields = {"versions": store.versions(key), "current_version": store.current_version(key),
              **_last_sync_fields(store, key)}
    fields["sync_progress"] = store.sync_progress(key)
    fields["store_quota"] = store.quota(key)
    fields["store_used"] = store.quota_usage(key)
    fields["store_refused"] = store.quota_refusal(key)  # a commit over the quota
    return fields


def _last_sync_fields(store: Any, key: str) -> dict[str, Any]:
    synced = store.last_sync(key)
    if synced is None:
        return {"last_sync": "never", "last_synced": None, "last_synced_node": "",
                "last_sync_errors": 0, "last_sync_quota_errors": 0}
    iso = datetime.fromtimestamp(synced["t"], UTC).isoformat(timespec="seconds")
    return {"last_sync": iso, "last_synced": synced["t"], "last_synced_node": synced["node"],
            "last_sync_errors": synced["errors"],
            "last_sync_quota_errors": synced["quota_errors"]}


# What a root shows of the store while the store does not answer.
_STORE_UNKNOWN = {"versions": [], "current_version": None, "last_sync": "unknown: the layer "
                  "store does not answer", "last_synced": None, "last_synced_node": "",
                  "last_sync_errors": 0, "last_sync_quota_errors": 0, "sync_progress": None,
                  "store_quota": None, "store_used": None, "store_refused": None}


def user_view(user: dict[str, Any], sample: Sample | None, store_root: str | None,
              warnings: dict[str, dict[str, Any]],
              placements: dict[str, str] | None = None) -> dict[str, Any]:
    """One user: each root (server) with its node, container figures, GPUs, layer versions
    and last sync. ``placements`` (key -> node) come from the cluster's records.
    ``store_root`` None: the store does not answer, and is not asked (it would hang)."""
    store = open_store(store_root) if store_root is not None else None
    placements = placements or {}
    containers = {c.key: c for c in sample.containers} if sample else {}
    servers = user.get("servers") or {}
    roots = []
    for key in _keys_of(user, (store.keys() if store else []) + list(placements)):
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
            # The placement says where the root lives, running or not; a container
            # sampled here without one is a server started before placements existed.
            "node": placements.get(key) or (sample.node if c is not None and sample else ""),
            "last_activity": srv.get("last_activity"),
            "container": c.__dict__ if c else None,
            "gpus": gpus,
            "warning": warnings.get(key),
            **disk_fields(sample, key),
            **(_store_fields(store, key) if store else _STORE_UNKNOWN),
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
        # What the running servers' limits take of the node (as placement counts it):
        # the one place a one-node hub, which sends no heartbeat, shows it.
        "cpus_committed": round(sum(c.cpu_limit for c in sample.containers), 3)
        if sample else 0.0,
        "mem_committed": sum(c.mem_limit for c in sample.containers) if sample else 0,
    }


def cluster_node_view(node: NodeView) -> dict[str, Any]:
    """A registered node from its heartbeat: up or down, GPUs by model, committed CPU/memory."""
    info = node.info
    models = info.by_model()
    return {
        "name": node.name, "up": node.up, "age_s": node.age_s, "drained": node.drained,
        "local": node.local,
        "gpus": [{"model": k, **v} for k, v in sorted(models.items())],
        "gpus_total": sum(v["total"] for v in models.values()),
        "gpus_free": sum(v["free"] for v in models.values()),
        "cpus": info.cpus, "cpus_committed": info.cpus_committed,
        "mem_bytes": info.mem_bytes, "mem_committed": info.mem_committed,
        "servers": len(info.servers),
        "housekeeping": info.housekeeping,
    }
