"""Exclusive (or, when allowed, shared) GPU allocation, recorded in a database.

Every change runs in one transaction that first updates this node's row in
``labvm_gpu_nodes``. That write takes SQLite's write lock (a row lock elsewhere) before
anything is read, so allocators in any thread or process on the node are serialised and
check-then-insert is atomic. A unique constraint on (node, uuid) for exclusive rows backs
this up at the schema level. A process that dies mid-transaction leaves nothing: the
database rolls the transaction back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    String,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .. import db
from ..errors import LabVMError
from .nvml import Gpu
from .protocol import are_free as _are_free
from .protocol import gpus_phrase as _gpus


class GpuUnavailable(LabVMError):
    """Not enough GPUs (of the requested model) are free on this node."""

    status = 409


class _Base(DeclarativeBase):
    pass


class GpuNode(_Base):
    """One row per node, updated at the start of every change to serialise them."""

    __tablename__ = "labvm_gpu_nodes"
    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)


class GpuAllocation(_Base):
    __tablename__ = "labvm_gpu_allocations"
    __table_args__ = (
        # NULLs never collide, so shared rows (exclusive_uuid NULL) may repeat a uuid
        # while an exclusive row can exist only once per GPU; portable, unlike a partial index.
        UniqueConstraint("node", "exclusive_uuid", name="uq_gpu_exclusive"),
        UniqueConstraint("node", "owner", "uuid", name="uq_gpu_owner"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(255), index=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    uuid: Mapped[str] = mapped_column(String(64))
    exclusive_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpu_index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    exclusive: Mapped[bool] = mapped_column(Boolean)
    allocated_at: Mapped[datetime] = mapped_column(DateTime)  # naive UTC


@dataclass(frozen=True)
class AllocationRecord:
    owner: str
    uuid: str
    gpu_index: int
    model: str
    exclusive: bool
    allocated_at: datetime  # UTC


_T = GpuAllocation.__table__


class GpuAllocator:
    """GPU allocations of one node, shared by every hub process using the same database."""

    def __init__(self, db_url: str, node: str = "local", sharing: bool = False) -> None:
        self.node = node
        self.sharing = sharing
        self.engine = db.engine(db_url, file_only=True)
        self._create_schema()

    def close(self) -> None:
        self.engine.dispose()

    def _create_schema(self) -> None:
        # Several hub processes may start at once and race to create the tables.
        for attempt in range(5):
            try:
                _Base.metadata.create_all(self.engine)
                with self.engine.begin() as conn:
                    if conn.scalar(select(GpuNode.node).where(GpuNode.node == self.node)) is None:
                        conn.execute(insert(GpuNode).values(node=self.node, generation=0))
                return
            except (OperationalError, IntegrityError):
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _locked(self, conn: Connection) -> None:
        """Take this node's lock; must be the transaction's first statement."""
        done = conn.execute(
            update(GpuNode)
            .where(GpuNode.node == self.node)
            .values(generation=GpuNode.generation + 1)
        )
        if done.rowcount == 0:  # row deleted behind our back: recreate (also a write lock)
            conn.execute(insert(GpuNode).values(node=self.node, generation=1))

    def _rows(self, conn: Connection, owner: str | None = None) -> list:
        q = select(_T).where(_T.c.node == self.node)
        if owner is not None:
            q = q.where(_T.c.owner == owner)
        return list(conn.execute(q.order_by(_T.c.owner, _T.c.gpu_index)))

    def allocate(
        self,
        owner: str,
        inventory: list[Gpu],
        count: int,
        model: str | None = None,
        sharing: bool | None = None,
    ) -> list[Gpu]:
        """Give ``owner`` ``count`` GPUs (of ``model``, if given) from ``inventory``.

        Lowest-index free GPUs first. If the owner already holds a matching set it is
        returned unchanged; otherwise it is replaced. On refusal (``GpuUnavailable``) the
        owner keeps whatever it held before. ``sharing`` overrides the allocator default:
        a sharing owner may get GPUs other sharing owners hold, never exclusive ones.
        """
        if count < 0:
            raise ValueError(f"GPU count must be >= 0, got {count}")
        sharing = self.sharing if sharing is None else sharing
        pool = sorted({g.uuid: g for g in inventory}.values(), key=lambda g: g.index)
        if model is not None:
            models = sorted({g.name for g in pool})
            pool = [g for g in pool if g.name == model]
            if not pool and count > 0:
                have = ", ".join(repr(m) for m in models) or "none"
                raise GpuUnavailable(
                    f"No GPU of model {model!r} on this node (models here: {have})"
                )

        try:
            return self._allocate(owner, pool, count, model, sharing)
        except IntegrityError as e:
            # Only reachable if something bypassed the node lock; the schema still held.
            raise GpuUnavailable(
                "The GPUs were taken by another user at the same moment; please try again"
            ) from e

    def _allocate(
        self, owner: str, pool: list[Gpu], count: int, model: str | None, sharing: bool
    ) -> list[Gpu]:
        by_uuid = {g.uuid: g for g in pool}
        with self.engine.begin() as conn:
            self._locked(conn)
            rows = self._rows(conn)
            mine = [r for r in rows if r.owner == owner]
            others = [r for r in rows if r.owner != owner]

            held = {r.uuid for r in mine}
            if (
                count > 0
                and len(held) == count
                and held <= by_uuid.keys()
                and all(r.exclusive != sharing for r in mine)
            ):
                return sorted((by_uuid[u] for u in held), key=lambda g: g.index)

            if mine:
                conn.execute(delete(_T).where(_T.c.node == self.node, _T.c.owner == owner))
            if count == 0:
                return []

            chosen = self._choose(pool, others, count, model, sharing)
            now = datetime.now(UTC).replace(tzinfo=None)
            conn.execute(
                insert(_T),
                [
                    {
                        "node": self.node,
                        "owner": owner,
                        "uuid": g.uuid,
                        "exclusive_uuid": None if sharing else g.uuid,
                        "gpu_index": g.index,
                        "model": g.name,
                        "exclusive": not sharing,
                        "allocated_at": now,
                    }
                    for g in chosen
                ],
            )
        return chosen

    @staticmethod
    def _choose(
        pool: list[Gpu], others: list, count: int, model: str | None, sharing: bool
    ) -> list[Gpu]:
        what = f"{_gpus(count)} of model {model!r}" if model else _gpus(count)
        if count > len(pool):
            raise GpuUnavailable(f"{what} requested but this node has only {len(pool)}")
        sharers: dict[str, int] = {}
        exclusive: set[str] = set()
        for r in others:
            sharers[r.uuid] = sharers.get(r.uuid, 0) + 1
            if r.exclusive:
                exclusive.add(r.uuid)
        if sharing:
            # Spread shared users: untouched GPUs first, then the least shared.
            free = sorted(
                (g for g in pool if g.uuid not in exclusive),
                key=lambda g: (sharers.get(g.uuid, 0), g.index),
            )
        else:
            free = [g for g in pool if g.uuid not in sharers]
        if len(free) < count:
            busy = len(pool) - len(free)
            raise GpuUnavailable(
                f"{what} requested but {_are_free(len(free))} on this node "
                f"({busy} held by other users)"
            )
        return sorted(free[:count], key=lambda g: g.index)

    def release(self, owner: str) -> list[str]:
        """Release everything ``owner`` holds; the uuids released."""
        with self.engine.begin() as conn:
            self._locked(conn)
            uuids = [r.uuid for r in self._rows(conn, owner)]
            conn.execute(delete(_T).where(_T.c.node == self.node, _T.c.owner == owner))
        return uuids

    def held(self, owner: str) -> list[str]:
        """UUIDs ``owner`` holds, by GPU index."""
        with self.engine.connect() as conn:
            return [r.uuid for r in self._rows(conn, owner)]

    def holders(self) -> dict[str, list[str]]:
        """Owner -> UUIDs held, for every owner holding GPUs on this node."""
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for r in self._rows(conn):
                out.setdefault(r.owner, []).append(r.uuid)
        return out

    def records(self, owner: str | None = None) -> list[AllocationRecord]:
        """Allocation details (with allocation time) for one owner or all."""
        with self.engine.connect() as conn:
            return [
                AllocationRecord(
                    owner=r.owner,
                    uuid=r.uuid,
                    gpu_index=r.gpu_index,
                    model=r.model,
                    exclusive=r.exclusive,
                    allocated_at=r.allocated_at.replace(tzinfo=UTC),
                )
                for r in self._rows(conn, owner)
            ]

    def reconcile(self, live_owners: Iterable[str]) -> dict[str, list[str]]:
        """Release every allocation whose owner is not in ``live_owners``; what was released.

        Call at hub start with the servers that are really running, so allocations of
        servers that died with a crashed hub go back to the pool.
        """
        live = set(live_owners)
        released: dict[str, list[str]] = {}
        with self.engine.begin() as conn:
            self._locked(conn)
            for r in self._rows(conn):
                if r.owner not in live:
                    released.setdefault(r.owner, []).append(r.uuid)
            if released:
                conn.execute(
                    delete(_T).where(_T.c.node == self.node, _T.c.owner.in_(list(released)))
                )
        return released
