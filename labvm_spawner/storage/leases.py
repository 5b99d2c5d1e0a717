"""Leases: which stored versions a mounted root uses as lowers, so that nothing deletes
or replaces them underneath it.

A node that mounts a key's root over version N writes ``<key>/leases/<node>.json``
({"versions": [N], "expires": ...}) and renews it with every heartbeat; stopping the
server releases it. A lease whose node stops renewing it (the node died) expires after
its grace period, so a dead node cannot pin versions forever. Prune, fsck and restore
read the live leases: prune and fsck skip leased versions and say so, and restore
refuses a root that runs somewhere.

``Leases`` is a part of ``LayerStore``: it uses the store's layout.
"""

from __future__ import annotations

import json
import os
import threading
import time

from ..names import is_node_name
from .errors import StoreError

DEFAULT_GRACE_S = 600.0  # how long a lease outlives its node's last renewal


class Leases:
    """The leases of each key (``<key>/leases/``)."""

    def lease(self, key: str, holder: str, versions: list[int],
              grace_s: float = DEFAULT_GRACE_S) -> None:
        """``holder`` (a node) uses ``versions`` of ``key`` until ``grace_s`` from now."""
        if not is_node_name(holder):
            raise StoreError(f"invalid lease holder {holder!r}")
        ldir = self.key_dir(key) / "leases"
        ldir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        tmp = ldir / f".{holder}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({"holder": holder, "versions": sorted(set(versions)),
                                   "renewed": now, "expires": now + grace_s}))
        os.replace(tmp, ldir / f"{holder}.json")

    def release(self, key: str, holder: str) -> None:
        if is_node_name(holder):
            (self.key_dir(key) / "leases" / f"{holder}.json").unlink(missing_ok=True)

    def leases(self, key: str, now: float | None = None) -> dict[str, dict]:
        """The live leases of ``key``: {holder: {"versions", "renewed", "expires"}}."""
        ldir = self.key_dir(key) / "leases"
        if not ldir.is_dir():
            return {}
        now = time.time() if now is None else now
        live: dict[str, dict] = {}
        for p in ldir.iterdir():
            holder = p.name.removesuffix(".json")
            if not p.name.endswith(".json") or not is_node_name(holder):
                continue
            try:
                rec = json.loads(p.read_text())
                versions = [int(v) for v in rec["versions"]]
                expires = float(rec["expires"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if expires > now:
                live[holder] = {"versions": versions, "renewed": float(rec.get("renewed", 0)),
                                "expires": expires}
        return live

    def leased_versions(self, key: str) -> dict[int, list[str]]:
        """{version: [holders]} of the versions some live lease holds."""
        held: dict[int, list[str]] = {}
        for holder, rec in sorted(self.leases(key).items()):
            for v in rec["versions"]:
                held.setdefault(v, []).append(holder)
        return held

    def refuse_if_leased(self, key: str, what: str) -> None:
        """Raise if ``key``'s root is mounted anywhere (a live lease): ``what`` would
        change what a running server sees."""
        live = self.leases(key)
        if live:
            holder, rec = sorted(live.items())[0]
            ago = max(0, int(time.time() - rec["renewed"]))
            raise StoreError(f"{key} is running on node {holder} (its lease was renewed "
                             f"{ago} s ago): stop it before {what}")
