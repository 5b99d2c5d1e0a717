"""The hub's view of its nodes, and the records placement and migration share.

Nodes come from the agents' heartbeat records (``node.registry``) plus, in the
one-node default, the node inside the hub process. Placements (which node holds
each root), pins, drained nodes and migrations are rows in LabVM's database, which
the hub and the admin service both open.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import LabVMError
from .node import auth, registry
from .node.client import LocalNode, Node, RemoteNode
from .node.ops import NodeOps


class _Base(DeclarativeBase):
    pass


class Placement(_Base):
    """The node whose upper holds a root (``key``); a user stays there until moved."""

    __tablename__ = "labvm_placements"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))


class Pin(_Base):
    """An admin's choice of node for every server of a user."""

    __tablename__ = "labvm_pins"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))


class NodeFlag(_Base):
    __tablename__ = "labvm_node_flags"
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_by: Mapped[str] = mapped_column(String(64), default="")


class Migration(_Base):
    __tablename__ = "labvm_migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100), index=True)
    user: Mapped[str] = mapped_column(String(64))
    server: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))
    by: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed
    step: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    downtime_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class MigrationLock(_Base):
    """At most one migration per root at a time: the primary key refuses a second."""

    __tablename__ = "labvm_migration_locks"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    migration: Mapped[int] = mapped_column(Integer)


@dataclass
class NodeView:
    name: str
    up: bool
    drained: bool
    info: dict = field(default_factory=dict)
    age_s: float | None = None
    local: bool = False

    def free_gpus(self, model: str | None = None, owner: str | None = None) -> list[dict]:
        return [g for g in self.info.get("gpus", [])
                if g.get("holder") in (None, owner) and (model is None or g["name"] == model)]

    def as_json(self) -> dict:
        return {"name": self.name, "up": self.up, "drained": self.drained,
                "age_s": self.age_s, "local": self.local, "info": self.info}


class Cluster:
    """Nodes and the shared records. One per process and database."""

    def __init__(self, db_url: str, registry_dir: str = "", key_file: str = "",
                 local: NodeOps | None = None,
                 down_after_s: float = registry.DOWN_AFTER_S) -> None:
        url = make_url(db_url)
        if url.get_backend_name() == "sqlite" and url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(db_url, connect_args={"timeout": 30}
                                    if url.get_backend_name() == "sqlite" else {})
        _Base.metadata.create_all(self.engine)
        self.registry_dir = registry_dir
        self.key_file = key_file
        self.local = LocalNode(local) if local is not None else None
        self.down_after_s = down_after_s
        self._key: bytes | None = None
        self._local_info: dict = {}
        self._local_info_t = 0.0

    # ---- nodes -------------------------------------------------------------------

    async def nodes(self) -> dict[str, NodeView]:
        drained = self.drained()
        views: dict[str, NodeView] = {}
        if self.registry_dir:
            records = await asyncio.to_thread(registry.read_records, self.registry_dir,
                                              self.down_after_s)
            for name, rec in records.items():
                views[name] = NodeView(name, rec["up"], name in drained, rec.get("info") or {},
                                       rec["age_s"])
        if self.local is not None:
            if time.monotonic() - self._local_info_t > 2:
                self._local_info = await self.local.info()
                self._local_info_t = time.monotonic()
            views[self.local.name] = NodeView(self.local.name, True,
                                              self.local.name in drained, self._local_info,
                                              0.0, local=True)
        return views

    def client(self, name: str) -> Node:
        if self.local is not None and name == self.local.name:
            return self.local
        rec = (registry.read_records(self.registry_dir, self.down_after_s).get(name)
               if self.registry_dir else None)
        if rec is None:
            raise LabVMError(f"unknown node {name!r}")
        if not self.key_file:
            raise LabVMError("LabVM has no node key file configured: cannot reach node "
                             f"{name!r}")
        if self._key is None:  # read once: client() runs on every poll
            self._key = auth.load_key(self.key_file)
        token = auth.node_token(self._key, name)
        return RemoteNode(name, rec["url"], token, rec["cert"])

    # ---- records ------------------------------------------------------------------

    def placement(self, key: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(Placement, key)
            return row.node if row else None

    def placements(self) -> dict[str, str]:
        with Session(self.engine) as s:
            return {p.key: p.node for p in s.scalars(select(Placement))}

    def set_placement(self, key: str, node: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(Placement, key)
            if row is None:
                s.add(Placement(key=key, node=node))
            else:
                row.node = node

    def pin(self, user: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(Pin, user)
            return row.node if row else None

    def pins(self) -> dict[str, str]:
        with Session(self.engine) as s:
            return {p.user: p.node for p in s.scalars(select(Pin))}

    def set_pin(self, user: str, node: str | None) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(delete(Pin).where(Pin.user == user))
            if node:
                s.add(Pin(user=user, node=node))

    def drained(self) -> set[str]:
        with Session(self.engine) as s:
            return set(s.scalars(select(NodeFlag.node).where(NodeFlag.drained)))

    def set_drained(self, node: str, drained: bool, by: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(NodeFlag, node)
            if row is None:
                s.add(NodeFlag(node=node, drained=drained, changed_by=by))
            else:
                row.drained, row.changed_by = drained, by

    # ---- migrations ----------------------------------------------------------------

    def begin_migration(self, key: str, user: str, server: str, source: str, target: str,
                        by: str) -> int:
        """Record a new migration; refused while another one of the same root runs."""
        try:
            with Session(self.engine) as s, s.begin():
                m = Migration(key=key, user=user, server=server, source=source, target=target,
                              by=by, started=time.time(), step="accepted")
                s.add(m)
                s.flush()
                s.add(MigrationLock(key=key, migration=m.id))
                return m.id
        except IntegrityError:
            raise LabVMError(f"{key} is already being migrated") from None

    def update_migration(self, mid: int, **changes: object) -> None:
        with Session(self.engine) as s, s.begin():
            m = s.get(Migration, mid)
            if m is None:
                return
            for k, v in changes.items():
                setattr(m, k, v)
            if changes.get("state") in ("done", "failed"):
                m.finished = time.time()
                s.execute(delete(MigrationLock).where(MigrationLock.migration == mid))

    def active_migration(self, key: str) -> dict | None:
        with Session(self.engine) as s:
            lock = s.get(MigrationLock, key)
            m = s.get(Migration, lock.migration) if lock else None
            return _migration_json(m) if m else None

    def migration(self, mid: int) -> dict | None:
        with Session(self.engine) as s:
            m = s.get(Migration, mid)
            return _migration_json(m) if m else None

    def migrations(self, limit: int = 50) -> list[dict]:
        with Session(self.engine) as s:
            rows = s.scalars(select(Migration).order_by(Migration.id.desc()).limit(limit))
            return [_migration_json(m) for m in rows]

    def fail_interrupted(self) -> None:
        """Migrations whose runner died (a restart) are failed, releasing their lock."""
        with Session(self.engine) as s:
            ids = list(s.scalars(select(MigrationLock.migration)))
        for mid in ids:
            self.update_migration(mid, state="failed", error="interrupted by a restart")

    def close(self) -> None:
        self.engine.dispose()


def _migration_json(m: Migration) -> dict:
    return {
        "id": m.id, "key": m.key, "user": m.user, "server": m.server, "source": m.source,
        "target": m.target, "by": m.by, "state": m.state, "step": m.step, "error": m.error,
        "started": m.started, "finished": m.finished, "downtime_s": m.downtime_s,
        "started_iso": datetime.fromtimestamp(m.started, UTC).isoformat(timespec="seconds"),
    }
